"""`corral run` end to end on the network (issue 3, item 9), as a user sees it.

Every sandbox here runs inside the test world (tests/world.py), so corral's upstream
resolver is the world's DNS and its dials reach the world's servers on documentation
addresses.  A module-scoped fixture runs one sandbox per rule set with many client
probes (tests/net_probe.py); each test asserts one user-visible point on its results:
exit codes, bytes received, errno and how fast it came, the `--events` records, and,
for denials, that the world's servers never saw the request.
"""

import json
import os
import subprocess
import time

import pytest

from net_support import (
    HERE as HERE_TESTS,
    IMMEDIATE,
    PROBE,
    PY,
    corral_argv,
    curl,
    dns_queries_for,
    host_loopback_server,
    http_requests_with,
    probe,
    read_events,
    token,
)
from world import (
    CLOSE_AFTER_WRITE_MESSAGE,
    DNS_V4,
    DNS_V6,
    ECHO_V4,
    ECHO_V6,
    HELLO_BODY,
    HTTP_V4,
    HTTP_V6,
    OTHER_V4,
    PORT_CLOSE_AFTER_WRITE,
    PORT_ECHO,
    PORT_HTTP_ALT,
)

pytestmark = pytest.mark.network

HELLO = HELLO_BODY.decode()
ECONNREFUSED = 111


def assert_refused_fast(result):
    """ECONNREFUSED, and at once: far below any connect timeout."""
    assert result["ok"] is False and result["errno"] == ECONNREFUSED, result
    assert result["elapsed"] < IMMEDIATE, result


# --------------------------------------------------------------------- name rules


@pytest.fixture(scope="module")
def name_rules(world, tmp_path_factory):
    tok = token()
    paths = {k: f"/files/{k}-{tok}" for k in ("port80", "tls")}
    leak = f"leak-{tok}.corral.test"
    out = probe(world, tmp_path_factory.mktemp("names"), [
        "--allow", "www.corral.test",
        "--allow", "*.pythonhosted.org",
        "--allow", "example.com:8080",
    ], [
        curl("http://www.corral.test/"),                           # 0 host
        curl("http://files.pythonhosted.org/"),                    # 1 *.domain
        curl(f"http://example.com:{PORT_HTTP_ALT}/"),              # 2 host:port
        curl(f"http://example.com{paths['port80']}"),              # 3 host:port, other port
        curl(f"http://tls.corral.test{paths['tls']}"),             # 4 not allowed: no DNS
        curl(f"http://{leak}/"),                                   # 5 never leaves
    ])
    return out, paths, leak


def test_host_rule_allows_that_name(name_rules):
    out, _, _ = name_rules
    r = out.results[0]
    assert (r["rc"], r["out"]) == (0, HELLO), r
    ev = out.connect(dst_ip=HTTP_V4, dst_port=80)
    assert (ev["verdict"], ev["rule"], ev["name"]) == ("allow", "www.corral.test", "www.corral.test")
    assert out.dns(qname="www.corral.test", qtype="A")[0]["verdict"] == "allow"


def test_wildcard_rule_allows_subdomains(name_rules):
    out, _, _ = name_rules
    r = out.results[1]
    assert (r["rc"], r["out"]) == (0, HELLO), r
    ev = out.connect(dst_ip=OTHER_V4[2], dst_port=80)
    assert (ev["verdict"], ev["rule"]) == ("allow", "*.pythonhosted.org")


def test_host_port_rule_allows_only_that_port(world, name_rules):
    out, paths, _ = name_rules
    ok, other = out.results[2], out.results[3]
    assert (ok["rc"], ok["out"]) == (0, HELLO), ok
    assert out.connect(dst_ip=OTHER_V4[0], dst_port=PORT_HTTP_ALT)["rule"] == "example.com:8080"
    # port 80 of the same name: refused at once (curl 7 = couldn't connect), never reached
    assert other["rc"] == 7, other
    assert other["elapsed"] < 1.0, other
    ev = out.connect(dst_ip=OTHER_V4[0], dst_port=80)
    assert (ev["verdict"], ev["rule"]) == ("deny", "default-deny")
    assert http_requests_with(world, paths["port80"]) == []


def test_unlisted_name_is_not_resolved_and_not_reached(world, name_rules):
    out, paths, leak = name_rules
    for r in out.results[4:6]:
        assert r["rc"] == 6, r  # curl: could not resolve host
        assert r["elapsed"] < 1.0, r
    for name in ("tls.corral.test", leak):
        events = out.dns(qname=name)
        assert events and all(e["verdict"] == "deny" and e["rcode"] == "REFUSED"
                              and e["upstream"] is None for e in events), out.dump()
    assert dns_queries_for(world, leak) == []  # no upstream leak
    assert http_requests_with(world, paths["tls"]) == []
    assert out.connects(dst_ip=HTTP_V4) == [out.connect(dst_ip=HTTP_V4, dst_port=80)]


# ------------------------------------------------------------------ address rules


@pytest.fixture(scope="module")
def address_rules(world, tmp_path_factory):
    tok = token()
    denied_path = f"/files/cidr-{tok}"
    out = probe(world, tmp_path_factory.mktemp("addrs"), [
        "--allow", ECHO_V4,                       # ip
        "--allow", "203.0.113.0/31",              # cidr: 203.0.113.0-1
        "--allow", f"[{HTTP_V6}]:80",             # [v6]:port
        "--allow", f"[{ECHO_V6}]:{PORT_ECHO}/udp",  # /udp
        "--allow", f"{HTTP_V4}:{PORT_HTTP_ALT}/tcp",  # ip:port/tcp
    ], [
        {"op": "tcp", "host": ECHO_V4, "port": PORT_ECHO, "send": "half-close me"},   # 0
        {"op": "tcp", "host": ECHO_V4, "port": PORT_CLOSE_AFTER_WRITE},               # 1
        {"op": "udp", "host": ECHO_V4, "port": PORT_ECHO, "send": "udp v4"},          # 2
        curl(f"http://{OTHER_V4[0]}/"),                                               # 3
        curl(f"http://{OTHER_V4[1]}{denied_path}"),                                   # 4
        curl("-6", f"http://[{HTTP_V6}]/"),                                           # 5
        {"op": "tcp", "host": HTTP_V6, "port": PORT_HTTP_ALT},                        # 6
        {"op": "udp", "host": ECHO_V6, "port": PORT_ECHO, "send": "udp v6"},          # 7
        {"op": "tcp", "host": ECHO_V6, "port": PORT_ECHO, "send": "x"},               # 8
        curl(f"http://{HTTP_V4}:{PORT_HTTP_ALT}/"),                                   # 9
        {"op": "udp", "host": HTTP_V4, "port": PORT_ECHO, "send": "no", "timeout": 1.0},  # 10
        {"op": "tcp", "host": HTTP_V4, "port": 80},                                   # 11
    ])
    return out, denied_path


def test_ip_rule_allows_tcp_and_udp(address_rules):
    out, _ = address_rules
    assert out.results[0]["data"] == "half-close me", out.results[0]
    assert out.results[2]["data"] == "udp v4", out.results[2]
    udp = out.connect(dst_ip=ECHO_V4, dst_port=PORT_ECHO, proto="udp")
    assert (udp["verdict"], udp["rule"]) == ("allow", ECHO_V4)


def test_half_close_propagates_both_ways(address_rules):
    out, _ = address_rules
    echo, caw = out.results[0], out.results[1]
    # echo: our FIN reached the server (it only closes after reading EOF) and its FIN
    # reached us (recv returned b"" instead of timing out)
    assert echo["ok"] and echo["data"] == "half-close me" and echo["elapsed"] < 2.0, echo
    assert caw["ok"] and caw["data"] == CLOSE_AFTER_WRITE_MESSAGE.decode(), caw
    ev = out.connect(dst_ip=ECHO_V4, dst_port=PORT_ECHO, proto="tcp")
    (close,) = out.closes_of(ev["id"])
    assert (close["bytes_out"], close["bytes_in"]) == (len("half-close me"),) * 2, close


def test_cidr_rule(world, address_rules):
    out, denied_path = address_rules
    assert (out.results[3]["rc"], out.results[3]["out"]) == (0, HELLO), out.results[3]
    assert out.connect(dst_ip=OTHER_V4[0], dst_port=80)["rule"] == "203.0.113.0/31"
    assert out.results[4]["rc"] == 7 and out.results[4]["elapsed"] < 1.0, out.results[4]
    assert out.connect(dst_ip=OTHER_V4[1], dst_port=80)["verdict"] == "deny"
    assert http_requests_with(world, denied_path) == []


def test_ipv6_address_port_rule(address_rules):
    out, _ = address_rules
    r = out.results[5]
    assert (r["rc"], r["out"]) == (0, HELLO), r
    ev = out.connect(dst_ip=HTTP_V6, dst_port=80)
    assert (ev["verdict"], ev["rule"], ev["src_ip"]) == ("allow", f"[{HTTP_V6}]:80", "fd00::100")
    assert_refused_fast(out.results[6])
    assert out.connect(dst_ip=HTTP_V6, dst_port=PORT_HTTP_ALT)["verdict"] == "deny"


def test_transport_suffix(address_rules):
    out, _ = address_rules
    assert out.results[7]["data"] == "udp v6", out.results[7]
    assert out.connect(dst_ip=ECHO_V6, proto="udp")["rule"] == f"[{ECHO_V6}]:{PORT_ECHO}/udp"
    assert_refused_fast(out.results[8])  # same address and port over TCP: not allowed
    assert out.connect(dst_ip=ECHO_V6, proto="tcp")["verdict"] == "deny"
    assert (out.results[9]["rc"], out.results[9]["out"]) == (0, HELLO), out.results[9]
    assert out.results[10]["ok"] is False, out.results[10]  # UDP to that host: no answer
    assert out.connect(dst_ip=HTTP_V4, proto="udp")["verdict"] == "deny"
    assert_refused_fast(out.results[11])  # same host, port 80: the rule names 8080 only


def test_every_flow_has_exactly_one_close(address_rules):
    out, _ = address_rules
    allowed = out.connects(verdict="allow")
    assert len(allowed) >= 7, out.dump()
    for ev in out.connects():
        assert len(out.closes_of(ev["id"])) <= 1, (ev, out.dump())
    for ev in allowed:
        assert len(out.closes_of(ev["id"])) == 1, (ev, out.dump())
    for ev in out.connects(verdict="deny"):
        assert ev["reason"], ev
        assert all(c["bytes_in"] in (0, None) for c in out.closes_of(ev["id"]))


def test_udp_flow_close_counts_bytes(address_rules):
    out, _ = address_rules
    assert out.results[2]["data"] == "udp v4"
    ev = out.connect(dst_ip=ECHO_V4, dst_port=PORT_ECHO, proto="udp")
    (close,) = out.closes_of(ev["id"])
    assert (close["bytes_out"], close["bytes_in"]) == (len("udp v4"), len("udp v4")), close


# ------------------------------------------------------- deny wins, --allow-file


def test_deny_wins_over_allow_and_allow_file(world, tmp_path):
    tok = token()
    rules = tmp_path / "allow.txt"
    rules.write_text("# the world\n*.corral.test\n\n203.0.113.0/24\n")
    out = probe(world, tmp_path, [
        "--allow-file", str(rules),
        "--deny", "www.corral.test",
        "--deny", OTHER_V4[0],
    ], [
        curl("http://v4only.corral.test/"),                 # 0 allowed by the file's name rule
        curl(f"http://{OTHER_V4[1]}:{PORT_HTTP_ALT}/"),      # 1 allowed by the file's cidr
        curl(f"http://www.corral.test/files/w-{tok}"),      # 2 deny www wins over *.corral.test
        curl("-4", f"http://host1.corral.test/files/e-{tok}"),  # 3 deny ip wins over name, cidr
        {"op": "tcp", "host": OTHER_V4[0], "port": PORT_ECHO, "send": "x"},  # 4
    ])
    r = out.results
    assert (r[0]["rc"], r[0]["out"]) == (0, HELLO), r[0]
    assert out.connect(dst_ip=HTTP_V4, dst_port=80)["rule"] == "*.corral.test"
    assert (r[1]["rc"], r[1]["out"]) == (0, HELLO), r[1]
    assert out.connect(dst_ip=OTHER_V4[1], dst_port=PORT_HTTP_ALT)["rule"] == "203.0.113.0/24"
    assert r[2]["rc"] == 6, r[2]
    assert {e["rule"] for e in out.dns(qname="www.corral.test")} == {"www.corral.test"}
    assert r[3]["rc"] == 7 and r[3]["elapsed"] < 1.0, r[3]
    assert out.dns(qname="host1.corral.test")[0]["verdict"] == "allow"
    assert_refused_fast(r[4])
    denied = out.connects(dst_ip=OTHER_V4[0])
    assert len(denied) == 2, out.dump()
    for ev in denied:
        assert (ev["verdict"], ev["rule"]) == ("deny", OTHER_V4[0]), ev
    assert http_requests_with(world, f"/files/w-{tok}") == []
    assert http_requests_with(world, f"/files/e-{tok}") == []


# ------------------------------------------------------------------ default deny


def test_no_allow_means_nothing_leaves_and_refusal_is_immediate(world, tmp_path):
    tok = token()
    leak = f"leak-{tok}.corral.test"
    out = probe(world, tmp_path, [], [
        {"op": "tcp", "host": HTTP_V4, "port": 80},
        {"op": "tcp", "host": HTTP_V6, "port": 80},
        {"op": "udp", "host": ECHO_V4, "port": PORT_ECHO, "timeout": 1.0},
        {"op": "sh", "argv": ["dig", "+time=2", "+tries=1", leak]},
        {"op": "sh", "argv": ["dig", "+time=1", "+tries=1", f"@{DNS_V4}", f"direct-{leak}"]},
    ])
    r = out.results
    assert_refused_fast(r[0])
    assert_refused_fast(r[1])
    assert r[2]["ok"] is False, r[2]
    assert "status: REFUSED" in r[3]["out"] and r[3]["elapsed"] < 1.0, r[3]
    assert r[4]["rc"] != 0 and "status:" not in r[4]["out"], r[4]  # other resolver: a flow, denied
    assert out.connect(dst_ip=DNS_V4, dst_port=53, proto="udp")["rule"] == "default-deny"
    assert {e["verdict"] for e in out.connects()} == {"deny"}
    assert dns_queries_for(world, leak) == [] and dns_queries_for(world, f"direct-{leak}") == []


# --------------------------------------------------------------------------- DNS


def test_dns_record_types_tcp_and_other_resolvers(world, tmp_path):
    tok = token()
    direct = f"direct-{tok}.corral.test"
    out = probe(world, tmp_path, [
        "--allow", "www.corral.test", "--allow", "txt.corral.test",
        "--allow", "v6only.corral.test", "--allow", f"{DNS_V4}:53/udp",
        "--allow", direct,
    ], [
        {"op": "sh", "argv": ["dig", "+short", "+time=3", "+tries=1", "www.corral.test", "A"]},
        {"op": "sh", "argv": ["dig", "+short", "+tcp", "+time=3", "+tries=1", "www.corral.test", "AAAA"]},
        {"op": "sh", "argv": ["dig", "+short", "+time=3", "+tries=1", "txt.corral.test", "TXT"]},
        {"op": "sh", "argv": ["dig", "+short", "+time=3", "+tries=1", "v6only.corral.test", "AAAA"]},
        {"op": "sh", "argv": ["dig", "+time=3", "+tries=1", f"@{DNS_V4}", "alias.corral.test"]},
    ])
    r = out.results
    assert r[0]["out"].split() == [HTTP_V4], r[0]
    assert r[1]["out"].split() == [HTTP_V6], r[1]
    assert r[2]["out"].strip() == '"corral world says hi"', r[2]
    assert r[3]["out"].split() == [HTTP_V6], r[3]
    (tcp_ev,) = out.dns(qname="www.corral.test", qtype="AAAA")
    assert (tcp_ev["transport"], tcp_ev["verdict"], tcp_ev["upstream"]) == ("tcp", "allow", f"{DNS_V4}:53")
    assert out.dns(qname="txt.corral.test", qtype="TXT")[0]["rcode"] == "NOERROR"
    # the world's server saw the forwarded queries
    assert {q["qtype"] for q in dns_queries_for(world, "txt.corral.test")} >= {"TXT"}
    # a query to another resolver is a UDP flow, allowed here by an address rule and
    # answered by that resolver itself (not by corral's DNS service: no dns event)
    assert "status: NOERROR" in r[4]["out"] and "www.corral.test." in r[4]["out"], r[4]
    ev = out.connect(dst_ip=DNS_V4, dst_port=53, proto="udp")
    assert (ev["verdict"], ev["rule"]) == ("allow", f"{DNS_V4}:53/udp")
    assert out.dns(qname="alias.corral.test") == []


def test_dns_over_ipv6_and_dns_upstream(world, tmp_path):
    tok = token()
    name = f"up-{tok}.corral.test"
    out = probe(world, tmp_path, ["--allow", "www.corral.test", "--allow", name,
                                  "--dns-upstream", DNS_V6], [
        {"op": "sh", "argv": ["dig", "+short", "+time=2", "+tries=1", "@fd00::3", "www.corral.test"]},
        {"op": "sh", "argv": ["dig", "+time=2", "+tries=1", "+tcp", "@fd00::3", name]},
    ])
    r = out.results
    assert r[0]["out"].split() == [HTTP_V4], r[0]
    assert "status: NXDOMAIN" in r[1]["out"], r[1]
    (ev,) = out.dns(qname=name)
    assert (ev["transport"], ev["src_ip"], ev["upstream"]) == ("tcp", "fd00::100", f"[{DNS_V6}]:53")
    (seen,) = dns_queries_for(world, name)
    assert seen["peer"].startswith(f"[{DNS_V6}]") and seen["proto"] == "tcp", seen


# ------------------------------------------------------------ always-denied set


HOST_PORT_OPEN = 18081
HOST_PORT_CLOSED = 18082


@pytest.fixture(scope="module")
def always_denied(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("always")
    servers = [host_loopback_server(world, tmp, port) for port in (HOST_PORT_OPEN, HOST_PORT_CLOSED)]
    try:
        def t(host, port=80):
            return {"op": "tcp", "host": host, "port": port, "send": "GET / HTTP/1.0\r\n\r\n",
                    "timeout": 3.0}

        probes = {
            "gateway": t("10.0.2.2", HOST_PORT_CLOSED),
            "gateway6": t("fd00::2", HOST_PORT_CLOSED),
            "metadata": t("169.254.169.254"),
            "metadata-alibaba": t("100.100.100.200"),
            "metadata-azure": t("168.63.129.16"),
            "metadata6": t("fd00:ec2::254"),
            "link-local": t("169.254.1.1"),
            "mapped-metadata": curl("-g", "http://[::ffff:169.254.169.254]/"),
            "nat64-loopback": t("64:ff9b::7f00:1", HOST_PORT_CLOSED),
            "compat-loopback": t("::127.0.0.1", HOST_PORT_CLOSED),
            "loopback": t("127.0.0.1", HOST_PORT_CLOSED),
            "loopback6": t("::1", HOST_PORT_CLOSED),
            "mapped-loopback": curl("-g", f"http://[::ffff:127.0.0.1]:{HOST_PORT_CLOSED}/"),
            "host-port": curl(f"http://10.0.2.2:{HOST_PORT_OPEN}/"),
        }
        out = probe(world, tmp, [
            # broad allow rules never open the always-denied set
            "--allow", "0.0.0.0/0", "--allow", "::/0",
            "--allow-host-port", str(HOST_PORT_OPEN),
        ], list(probes.values()))
        results = dict(zip(probes, out.results))
        yield out, results, {port: log for port, (_, log) in
                             zip((HOST_PORT_OPEN, HOST_PORT_CLOSED), servers)}
    finally:
        for proc, _ in servers:
            proc.kill()
            proc.wait(timeout=5)


TAP_ROUTED = {
    # probe name: (dst_ip as the stack sees it, dst_port, category)
    "gateway": ("10.0.2.2", HOST_PORT_CLOSED, "gateway"),
    "gateway6": ("fd00::2", HOST_PORT_CLOSED, "gateway"),
    "metadata": ("169.254.169.254", 80, "metadata"),
    "metadata-alibaba": ("100.100.100.200", 80, "metadata"),
    "metadata-azure": ("168.63.129.16", 80, "metadata"),
    "metadata6": ("fd00:ec2::254", 80, "metadata"),
    "link-local": ("169.254.1.1", 80, "link-local"),
    # an AF_INET6 socket to ::ffff:a.b.c.d leaves the kernel as IPv4 to a.b.c.d
    "mapped-metadata": ("169.254.169.254", 80, "metadata"),
    "nat64-loopback": ("64:ff9b::7f00:1", HOST_PORT_CLOSED, "loopback"),
    "compat-loopback": ("::7f00:1", HOST_PORT_CLOSED, "loopback"),
}


@pytest.mark.parametrize("name", sorted(TAP_ROUTED))
def test_always_denied_is_refused_with_an_event(always_denied, name):
    out, results, logs = always_denied
    r = results[name]
    if "rc" in r:  # curl
        assert r["rc"] == 7 and r["elapsed"] < 1.0, r
    else:
        assert_refused_fast(r)
    dst_ip, dst_port, category = TAP_ROUTED[name]
    events = out.connects(dst_ip=dst_ip, dst_port=dst_port)
    assert events, out.dump()
    for ev in events:
        assert (ev["verdict"], ev["rule"]) == ("deny", f"always-denied:{category}"), ev
        assert ev["reason"], ev


@pytest.mark.parametrize("name", ["loopback", "loopback6", "mapped-loopback"])
def test_sandbox_loopback_never_reaches_the_host(always_denied, name):
    out, results, logs = always_denied
    r = results[name]
    assert r.get("errno") == ECONNREFUSED or r.get("rc") == 7, r
    assert logs[HOST_PORT_CLOSED].read_text() == ""  # the host's loopback server saw nothing


def test_allow_host_port_maps_gateway_to_host_loopback(always_denied):
    out, results, logs = always_denied
    r = results["host-port"]
    assert (r["rc"], r["out"]) == (0, f"hello from host loopback {HOST_PORT_OPEN}\n"), r
    ev = out.connect(dst_ip="10.0.2.2", dst_port=HOST_PORT_OPEN)
    assert (ev["verdict"], ev["rule"], ev["dial"]) == (
        "allow", f"allow-host-port:{HOST_PORT_OPEN}", f"127.0.0.1:{HOST_PORT_OPEN}")
    assert len(logs[HOST_PORT_OPEN].read_text().splitlines()) == 1
    # the other port on the same gateway stays closed
    assert logs[HOST_PORT_CLOSED].read_text() == ""


# ---------------------------------------------------------------- --policy FILE


POLICY_FILE = f'''
import trio
import corral

async def on_connect(req):
    if str(req.dst_ip) == "{OTHER_V4[0]}":
        return corral.ALLOW
    if str(req.dst_ip) == "{OTHER_V4[1]}":
        return corral.deny("host2 is off limits")
    if str(req.dst_ip) == "{OTHER_V4[2]}":
        raise RuntimeError("policy bug")
    if str(req.dst_ip) == "{ECHO_V4}":
        await trio.sleep(30)
    return corral.deny("unexpected")

async def on_dns(query):
    if query.qname.startswith("nope-"):
        return corral.deny("not this one")
    return corral.ALLOW
'''


def test_policy_file_callbacks(world, tmp_path):
    policy = tmp_path / "policy.py"
    policy.write_text(POLICY_FILE)
    tok = token()
    out = probe(world, tmp_path, ["--policy", str(policy), "--policy-timeout", "0.5"], [
        curl(f"http://{OTHER_V4[0]}/"),
        {"op": "tcp", "host": OTHER_V4[1], "port": 80},
        {"op": "tcp", "host": OTHER_V4[2], "port": 80},
        {"op": "tcp", "host": ECHO_V4, "port": PORT_ECHO, "timeout": 5.0},
        {"op": "sh", "argv": ["dig", "+time=2", "+tries=1", f"nope-{tok}.corral.test"]},
        {"op": "sh", "argv": ["dig", "+short", "+time=2", "+tries=1", "example.com"]},
        {"op": "sh", "argv": ["dig", "+time=2", "+tries=1", f"ok-{tok}.corral.test"]},
    ])
    r = out.results
    assert (r[0]["rc"], r[0]["out"]) == (0, HELLO), r[0]
    assert out.connect(dst_ip=OTHER_V4[0])["rule"] == "callback"
    assert_refused_fast(r[1])
    ev = out.connect(dst_ip=OTHER_V4[1])
    assert (ev["verdict"], ev["rule"], ev["reason"]) == ("deny", "callback", "host2 is off limits")
    assert_refused_fast(r[2])  # raising = deny
    assert (out.connect(dst_ip=OTHER_V4[2])["verdict"], out.connect(dst_ip=OTHER_V4[2])["rule"]) == (
        "deny", "callback-error")
    # too slow = deny after the policy timeout (0.5 s), not after the client's 5 s
    assert r[3]["errno"] == ECONNREFUSED and 0.4 < r[3]["elapsed"] < 2.0, r[3]
    assert out.connect(dst_ip=ECHO_V4)["rule"] == "callback-error"
    errors = out.of_type("policy_error")
    assert sorted((e["callback"], bool(e["timed_out"])) for e in errors) == [
        ("on_connect", False), ("on_connect", True)], out.dump()
    assert "policy bug" in next(e["error"] for e in errors if not e["timed_out"])
    # on_dns
    assert "status: REFUSED" in r[4]["out"], r[4]
    ev = out.dns(qname=f"nope-{tok}.corral.test")[0]
    assert (ev["verdict"], ev["rule"], ev["reason"]) == ("deny", "callback", "not this one")
    assert dns_queries_for(world, f"nope-{tok}.corral.test") == []
    assert r[5]["out"].split()[:1] == [OTHER_V4[0]], r[5]
    assert "status: NXDOMAIN" in r[6]["out"], r[6]
    assert len(dns_queries_for(world, f"ok-{tok}.corral.test")) >= 1  # forwarded


# ------------------------------------------------------------ pump, byte counts


@pytest.mark.parametrize("data_path", ["direct", "pump"])
def test_download_byte_counts_match_events(world, tmp_path, data_path):
    size = 1_234_567
    fmt = "%{size_request} %{size_header} %{size_download} %{http_code}"
    out = probe(world, tmp_path, ["--data-path", data_path, "--allow", "www.corral.test"], [
        curl("-o", "/dev/null", "-w", fmt, f"http://www.corral.test/bytes/{size}", max_time=20),
    ])
    r = out.results[0]
    assert r["rc"] == 0, r
    request, header, body, code = map(int, r["out"].split())
    assert (body, code) == (size, 200)
    ev = out.connect(dst_ip=HTTP_V4, dst_port=80)
    (close,) = out.closes_of(ev["id"])
    assert (close["bytes_out"], close["bytes_in"]) == (request, header + body), close
    assert close["reason"] == "eof", close
    assert out.of_type("sandbox_exit")[0]["exit_code"] == 0


# ------------------------------------------------------------------------ publish


def test_publish_reaches_a_server_inside(world, tmp_path):
    host_port = 18090
    events = tmp_path / "events.jsonl"
    probes = json.dumps([{"op": "serve", "port": 8000, "reply": "hello from inside\n"}])
    proc = world.popen(
        corral_argv(["--publish", f"{host_port}:8000", "--events", str(events)], [PY, PROBE, probes]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stderr.readline()  # {"listening": 8000} once the server is bound
        assert json.loads(line) == {"listening": 8000}, line
        got = world.run(["curl", "-sS", "--http0.9", "-m", "5", f"http://127.0.0.1:{host_port}/hi"],
                        capture_output=True, text=True, timeout=10)
        assert (got.returncode, got.stdout) == (0, "hello from inside\n"), got
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert proc.returncode == 0, err
    (served,) = json.loads(out.strip().splitlines()[-1])[0]["served"]
    assert served["request"].startswith("GET /hi HTTP/1.1"), served
    records = read_events(events)
    ev = [e for e in records if e["type"] == "connect"]
    assert len(ev) == 1 and ev[0]["verdict"] == "allow" and ev[0]["dst_port"] == 8000, ev
    assert ev[0]["rule"] == "publish", ev
    closes = [e for e in records if e["type"] == "close" and e["id"] == ev[0]["id"]]
    assert len(closes) == 1, records
    assert closes[0]["bytes_in"] == len("hello from inside\n") or \
        closes[0]["bytes_out"] == len("hello from inside\n"), closes


# ---------------------------------------------------------------- --events -


def test_events_to_stderr_and_exit_code(world, tmp_path):
    t = time.monotonic()
    proc = world.run(corral_argv(["--events", "-"], ["sh", "-c", "exit 3"]),
                     capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    lines = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
    assert [e["type"] for e in lines] == ["sandbox_start", "sandbox_exit"], proc.stderr
    assert lines[-1]["exit_code"] == 3
    assert time.monotonic() - t < 30


# ------------------------------------------- loopback via hand-crafted packets


@pytest.fixture(scope="module", params=["direct", "pump"])
def raw_loopback(world, tmp_path_factory, request):
    """The sandbox's kernel never sends 127.0.0.1 / ::1 out of tap0 (they are its own
    loopback), and the command has no CAP_NET_RAW to craft frames.  So the test itself
    joins the running sandbox's user+net namespaces from outside (tests/net_rawsyn.py) and
    writes hand-crafted SYNs on tap0: they reach the netstack on either data path."""
    pytest.importorskip("scapy")
    tmp = tmp_path_factory.mktemp("raw")
    port = 18095
    servers = [host_loopback_server(world, tmp, port), host_loopback_server(world, tmp, port, family="6")]
    events = tmp / "events.jsonl"
    status_r, status_w = os.pipe()
    sandbox = world.popen(
        [PY, "-m", "corral", "run", "--data-path", request.param, "--allow", "0.0.0.0/0",
         "--allow", "::/0", "--events", str(events), "--json-status-fd", str(status_w), "--",
         "sleep", "60"], pass_fds=(status_w,), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(status_w)
    try:
        with os.fdopen(status_r) as status:
            pid = json.loads(status.readline())["child-pid"]
            probe = subprocess.run([PY, str(HERE_TESTS / "net_rawsyn.py"), str(pid), str(port),
                                    ECHO_V4, str(PORT_ECHO)],
                                   capture_output=True, text=True, timeout=60)
        yield probe, [log for _, log in servers], events
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=30)
        for server, _ in servers:
            server.kill()
            server.wait(timeout=5)


def test_crafted_packets_to_loopback_never_reach_the_host(raw_loopback):
    probe, logs, events = raw_loopback
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["gateway_mac"], result  # the stack answered ARP for the gateway
    # the control proves the frames reach the stack: an allowed SYN is answered
    assert result["control"] and result["control"]["flags"] == "SA", result
    for name in ("loopback", "loopback6", "mapped-loopback"):
        reply = result[name]
        # dropped (no answer) or reset: never a SYN-ACK from the host's loopback
        assert reply is None or reply["flags"] in ("R", "RA"), (name, reply)
    for log in logs:
        assert not log.exists() or log.read_text() == ""
    records = [json.loads(line) for line in events.read_text().splitlines()]
    loop = [r for r in records if r["type"] == "connect"
            and r["dst_ip"] in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    # the stack drops them before any policy (martian destinations) or denies them
    assert all(r["verdict"] == "deny" for r in loop), records
    assert any(r["type"] == "connect" and r["dst_ip"] == ECHO_V4 for r in records), records
