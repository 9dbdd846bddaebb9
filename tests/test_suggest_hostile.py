"""--suggest under hostile input: a rule comes only from what a flow really reached, and
nothing in the always-denied set is ever opened by anything but an explicit exact --allow.

TLS SNI and HTTP Host are whatever the client writes; a DNS name is whatever the sandbox
asked for. Neither may turn into a wildcard, an address rule or a door to the metadata
service once the suggested file is fed back with --allow-file.
"""

import pytest

from corral.policy import ConnectRequest, Policy, Rule, decide_connect, load_allow_file
from corral.events.report import build_report, render_allowlist

from test_report import Tool


def suggested(tmp_path, events):
    text = render_allowlist(build_report(events))
    path = tmp_path / "allow.txt"
    path.write_text(text)
    return text, load_allow_file(path)


def flow(dst, port=80, *, names=(), sni=None, host=None):
    return ConnectRequest(id=1, proto="tcp", src_ip="10.0.2.100", src_port=40000, dst_ip=dst, dst_port=port,
                          names=names, sni=sni, http_host=host)


def test_suggest_host_header_metadata_address_is_no_rule(tmp_path):
    """curl -H 'Host: 169.254.169.254' http://allowed.test/ used to suggest 169.254.169.254:80/tcp."""
    t = Tool(Policy(mode="audit"))
    t.dns("allowed.test", answers=["203.0.113.10"])
    t.connect("203.0.113.10", 80, names=("allowed.test",), host="169.254.169.254", up=1)
    text, rules = suggested(tmp_path, t.events)
    assert [r.label for r in rules] == ["allowed.test:80/tcp"]
    assert "169.254.169.254" in text  # as a comment only
    strict = Policy(allow=rules)
    assert not decide_connect(strict, flow("169.254.169.254", names=("allowed.test",))).allowed


@pytest.mark.parametrize(("sni", "host"), [
    (None, "*.test"), ("*.com", None), ("*.test", "*.test"), (None, "203.0.113.0/24"), (None, "[2001:db8::1]:80"),
    ("198.51.100.7", None), ("other.test", None), (None, "OTHER.test:80"),
])
def test_suggest_claimed_names_never_become_rules(tmp_path, sni, host):
    t = Tool(Policy(mode="audit"))
    t.connect("203.0.113.10", 80, names=("allowed.test",), sni=sni, host=host, up=1)
    text, rules = suggested(tmp_path, t.events)
    assert [r.label for r in rules] == ["allowed.test:80/tcp"], text
    assert all(r.kind == "domain" for r in rules)


def test_suggest_claimed_name_equal_to_dns_name_is_kept(tmp_path):
    t = Tool(Policy(mode="audit"))
    t.connect("203.0.113.10", 443, names=("allowed.test",), sni="Allowed.Test", up=1)
    _, rules = suggested(tmp_path, t.events)
    assert [r.label for r in rules] == ["allowed.test:443/tcp"]
    assert decide_connect(Policy(allow=rules), flow("203.0.113.10", 443, names=("allowed.test",),
                                                    sni="allowed.test")).allowed


def test_suggest_nameless_flow_with_wildcard_sni_gets_its_address_only(tmp_path):
    t = Tool(Policy(mode="audit"))
    t.connect("203.0.113.5", 443, sni="*.com", host="*.test", up=1)
    _, rules = suggested(tmp_path, t.events)
    assert [r.label for r in rules] == ["203.0.113.5:443/tcp"]


@pytest.mark.parametrize("qname", ["*.test", "*.com.", "169.254.169.254", "203.0.113.0/24"])
def test_suggest_hostile_dns_name_is_no_wildcard_or_address(tmp_path, qname):
    """The sandbox chooses its DNS query names too: a wildcard answer to '*.test' is no '*.test' rule."""
    t = Tool(Policy(mode="audit"))
    t.connect("203.0.113.10", 443, names=(qname,), up=1)
    _, rules = suggested(tmp_path, t.events)
    assert [r.label for r in rules] == ["203.0.113.10:443/tcp"]


def test_suggest_opened_metadata_flow_is_a_note_not_a_rule(tmp_path):
    """A run that opened the metadata address with --allow must not hand it to a rule file."""
    t = Tool(Policy(mode="audit", allow=["169.254.169.254"]))
    req, d = t.connect("169.254.169.254", 80, up=1)
    assert d.allowed
    text, rules = suggested(tmp_path, t.events)
    assert rules == []
    assert "--allow 169.254.169.254" in text


# -- the always-denied set: only an explicit exact --allow names an address -----------------

METADATA = "169.254.169.254"


@pytest.mark.parametrize("line", [METADATA, f"{METADATA}:80", f"{METADATA}:80/tcp", "169.254.0.0/16",
                                  "169.254.169.254/32", "::ffff:169.254.169.254"])
def test_allow_file_never_opens_metadata(tmp_path, line):
    path = tmp_path / "allow.txt"
    path.write_text(line + "\n")
    d = decide_connect(Policy(allow=load_allow_file(path)), flow(METADATA))
    assert not d.allowed and d.rule == "always-denied:metadata"


@pytest.mark.parametrize(("rule", "dst"), [
    ("169.254.0.0/16", "169.254.1.1"), ("169.254.0.0/16", METADATA), ("fe80::/10", "fe80::1"),
    ("127.0.0.0/8", "127.0.0.1"), ("fd00:ec2::/32", "fd00:ec2::254"), ("224.0.0.0/4", "224.0.0.1"),
])
def test_allow_network_never_opens_always_denied(rule, dst):
    assert not decide_connect(Policy(allow=[rule]), flow(dst)).allowed


@pytest.mark.parametrize("rule", ["localhost", "*.internal", "metadata.google.internal"])
def test_allow_domain_never_opens_always_denied(rule):
    d = decide_connect(Policy(allow=[rule]), flow(METADATA, names=("metadata.google.internal", "localhost")))
    assert not d.allowed and not d.by_default  # final: no callback is ever asked


@pytest.mark.parametrize(("rule", "dst"), [
    (METADATA, METADATA), (f"{METADATA}:80/tcp", METADATA), ("fe80::1", "fe80::1"), ("127.0.0.1:80", "127.0.0.1"),
])
def test_explicit_exact_allow_opens_always_denied(rule, dst):
    d = decide_connect(Policy(allow=[rule]), flow(dst))
    assert d.allowed and d.rule == rule
    assert decide_connect(Policy(allow=[Rule.parse(rule)]), flow(dst)).allowed


def test_suggested_file_round_trip_never_opens_metadata(tmp_path):
    """The whole attack: audit, --suggest, then run --allow-file with the suggestion."""
    t = Tool(Policy(mode="audit"))
    t.dns("allowed.test", answers=["203.0.113.10"])
    t.connect("203.0.113.10", 80, names=("allowed.test",), host="169.254.169.254", up=1)
    t.connect("169.254.169.254", 80, host="allowed.test")
    _, rules = suggested(tmp_path, t.events)
    replay = Tool(Policy(allow=rules))
    replay.dns("allowed.test", answers=["203.0.113.10"])
    _, ok = replay.connect("203.0.113.10", 80, names=("allowed.test",), host="allowed.test")
    _, meta = replay.connect("169.254.169.254", 80, host="169.254.169.254")
    assert ok.allowed and not meta.allowed
