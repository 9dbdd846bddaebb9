"""Rule parsing: every accepted form, every rejected form, round trips, allow files."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.policy import Rule, load_allow_file
from corral.errors import ConfigError

N = ipaddress.ip_network


@pytest.mark.parametrize(
    ("text", "fields", "canonical", "kind"),
    [
        ("example.com", {"domain": "example.com"}, "example.com", "domain"),
        ("Example.COM.", {"domain": "example.com"}, "example.com", "domain"),
        ("*.example.com", {"domain": "example.com", "wildcard": True}, "*.example.com", "wildcard"),
        ("example.com:443", {"domain": "example.com", "port": 443}, "example.com:443", "domain"),
        ("example.com:443/tcp", {"domain": "example.com", "port": 443, "proto": "tcp"}, "example.com:443/tcp", "domain"),
        ("example.com/UDP", {"domain": "example.com", "proto": "udp"}, "example.com/udp", "domain"),
        ("_acme.example.com", {"domain": "_acme.example.com"}, "_acme.example.com", "domain"),
        ("bücher.example", {"domain": "xn--bcher-kva.example"}, "xn--bcher-kva.example", "domain"),
        ("localhost", {"domain": "localhost"}, "localhost", "domain"),
        ("203.0.113.7", {"network": N("203.0.113.7/32")}, "203.0.113.7", "address"),
        ("203.0.113.7:80", {"network": N("203.0.113.7/32"), "port": 80}, "203.0.113.7:80", "address"),
        ("203.0.113.0/24", {"network": N("203.0.113.0/24")}, "203.0.113.0/24", "network"),
        ("203.0.113.0/24:443/tcp", {"network": N("203.0.113.0/24"), "port": 443, "proto": "tcp"},
         "203.0.113.0/24:443/tcp", "network"),
        ("2001:db8::1", {"network": N("2001:db8::1/128")}, "2001:db8::1", "address"),
        ("[2001:db8::1]", {"network": N("2001:db8::1/128")}, "2001:db8::1", "address"),
        ("[2001:db8::1]:53/udp", {"network": N("2001:db8::1/128"), "port": 53, "proto": "udp"},
         "[2001:db8::1]:53/udp", "address"),
        ("2001:db8::/32", {"network": N("2001:db8::/32")}, "2001:db8::/32", "network"),
        ("[2001:db8::/32]:443", {"network": N("2001:db8::/32"), "port": 443}, "[2001:db8::/32]:443", "network"),
        ("2001:DB8::/32/tcp", {"network": N("2001:db8::/32"), "proto": "tcp"}, "2001:db8::/32/tcp", "network"),
        # IPv4-mapped rules are the IPv4 rule: flows are normalized the same way
        ("::ffff:203.0.113.7", {"network": N("203.0.113.7/32")}, "203.0.113.7", "address"),
        ("::ffff:203.0.113.0/120", {"network": N("203.0.113.0/24")}, "203.0.113.0/24", "network"),
        ("  example.com  ", {"domain": "example.com"}, "example.com", "domain"),
    ],
)
def test_parse_accepts(text, fields, canonical, kind):
    rule = Rule.parse(text, "allow")
    for key, value in fields.items():
        assert getattr(rule, key) == value, key
    assert str(rule) == canonical
    assert rule.kind == kind
    assert rule.text == text.strip()
    assert Rule.parse(str(rule), "allow") == rule


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("example.com:0", "out of range"),
        ("example.com:65536", "out of range"),
        ("example.com:https", "not a number"),
        ("example.com:443/icmp", "unknown suffix"),
        ("example.com/sctp", "unknown suffix"),
        ("exa mple.com", "spaces"),
        ("ex*ample.com", "'*'"),
        ("*example.com", "'*'"),
        ("a.*.example.com", "'*'"),
        ("*", "'*'"),
        ("-bad-.example.com", "not a valid DNS label"),
        ("a..b", "not a valid DNS label"),
        ("x" * 64 + ".com", "not a valid DNS label"),
        (("a" * 60 + ".") * 5 + "com", "longer than 253"),
        ("203.0.113.256", "not a valid IP"),
        ("203.0.113", "neither a valid IP address nor a domain"),
        ("1.2.3.4.5", "neither a valid IP address nor a domain"),
        ("203.0.113.7/24", "host bits set (the network is 203.0.113.0/24)"),
        ("203.0.113.0/33", "not a valid IP network"),
        ("2001:db8::1/32", "host bits set"),
        ("[2001:db8::1", "missing ']'"),
        ("[2001:db8::1]53", "expected :PORT"),
        ("[203.0.113.7]:53", "brackets are for IPv6"),
        ("fe80::1%eth0", "scope"),
        (":443", "no host"),
        ("example.com:", "not a number"),
        ("gggg::1", "not a valid IP network"),
    ],
)
def test_parse_rejects_with_clear_error(text, problem):
    with pytest.raises(ConfigError) as info:
        Rule.parse(text, "deny", origin="--deny")
    msg = str(info.value)
    assert problem in msg
    assert repr(text) in msg, "the error names the bad text"
    assert "--deny: invalid deny rule" in msg
    assert "*.example.com" in msg and "[2001:db8::1]:53" in msg, "the error shows the valid forms"


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        Rule.parse("nope..", "allow")


def test_wildcard_matches_subdomains_at_any_depth_but_not_the_apex():
    rule = Rule.parse("*.example.com", "allow")
    assert rule.matches_name("www.example.com")
    assert rule.matches_name("a.b.c.example.com")
    assert not rule.matches_name("example.com")
    assert not rule.matches_name("badexample.com")
    assert not rule.matches_name("example.com.evil.net")


def test_exact_domain_matches_only_itself():
    rule = Rule.parse("example.com", "allow")
    assert rule.matches_name("example.com")
    assert not rule.matches_name("www.example.com")
    assert not rule.matches_name("ample.com")


@pytest.mark.parametrize(
    ("text", "proto", "port", "expected"),
    [
        ("example.com", "tcp", 443, True),
        ("example.com", "udp", 53, True),
        ("example.com", "icmp", 0, True),
        ("example.com:443", "tcp", 443, True),
        ("example.com:443", "udp", 443, True),
        ("example.com:443", "tcp", 80, False),
        ("example.com:443", "icmp", 0, False),
        ("example.com/tcp", "tcp", 22, True),
        ("example.com/tcp", "udp", 22, False),
        ("example.com/tcp", "icmp", 0, False),
        ("example.com:53/udp", "udp", 53, True),
        ("example.com:53/udp", "tcp", 53, False),
    ],
)
def test_endpoint_matching(text, proto, port, expected):
    assert Rule.parse(text, "allow").matches_endpoint(proto, port) is expected


def test_equality_ignores_text_and_origin():
    a = Rule.parse("Example.com", "allow", origin="a:1")
    b = Rule.parse("example.com.", "allow", origin="--allow")
    assert a == b and hash(a) == hash(b)
    assert a.label == "Example.com"
    assert Rule.parse("example.com", "deny") != a


def test_allow_file(tmp_path):
    path = tmp_path / "allow.txt"
    path.write_text(
        "# package hosts\n"
        "pypi.org\n"
        "\n"
        "   *.pythonhosted.org:443   # files\n"
        "[2001:db8::1]:53/udp\n"
    )
    rules = load_allow_file(path)
    assert [str(r) for r in rules] == ["pypi.org", "*.pythonhosted.org:443", "[2001:db8::1]:53/udp"]
    assert [r.origin for r in rules] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert all(r.action == "allow" for r in rules)


def test_allow_file_error_names_file_and_line(tmp_path):
    path = tmp_path / "allow.txt"
    path.write_text("pypi.org\n\nexample.com:99999\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: invalid allow rule 'example.com:99999'"):
        load_allow_file(path)


def test_allow_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="cannot read rule file .*nope.txt"):
        load_allow_file(tmp_path / "nope.txt")


# -- properties -------------------------------------------------------------------
label = st.from_regex(r"[a-z0-9_](?:[a-z0-9_-]{0,10}[a-z0-9_])?", fullmatch=True)
domains = st.lists(label, min_size=1, max_size=4).map(".".join).filter(lambda d: not d.split(".")[-1].isdigit())
ports = st.none() | st.integers(1, 65535)
protos = st.sampled_from([None, "tcp", "udp"])


@st.composite
def rules(draw):
    action = draw(st.sampled_from(["allow", "deny"]))
    kind = draw(st.sampled_from(["domain", "v4", "v6"]))
    if kind == "domain":
        fields = {"domain": draw(domains), "wildcard": draw(st.booleans())}
    elif kind == "v4":
        addr = draw(st.ip_addresses(v=4))
        fields = {"network": ipaddress.ip_network((addr, draw(st.integers(0, 32))), strict=False)}
    else:
        addr = draw(st.ip_addresses(v=6))
        net = ipaddress.ip_network((addr, draw(st.integers(0, 128))), strict=False)
        if net.prefixlen >= 96 and net.subnet_of(N("::ffff:0:0/96")):
            net = N("2001:db8::/32")
        fields = {"network": net}
    return Rule(action=action, port=draw(ports), proto=draw(protos), **fields)


@given(rules())
def test_str_parse_round_trip(rule):
    assert Rule.parse(str(rule), rule.action) == rule


@given(st.text(max_size=80))
@settings(max_examples=500)
def test_no_text_crashes_the_parser(text):
    try:
        rule = Rule.parse(text, "allow")
    except ConfigError:
        return
    assert Rule.parse(str(rule), "allow") == rule


@given(st.text(alphabet="0123456789abcdef:./[]*-tcpu%", max_size=40))
@settings(max_examples=500)
def test_no_address_like_text_crashes_the_parser(text):
    try:
        Rule.parse(text, "deny")
    except ConfigError:
        pass


def test_policy_and_dnsmsg_are_sans_io():
    import subprocess
    import sys

    code = (
        "import sys, corral.policy, corral.net.dnsmsg; "
        "bad = [m for m in ('trio', 'cffi', 'corral.bindings', 'pyroute2') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
