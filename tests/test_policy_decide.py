"""decide_connect / decide_dns: per rule kind, deny wins, defaults, audit mode, the
always-denied set in every spelling, --allow-host-port, claimed names, and properties."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import ConfigError
from corral.policy import (
    ALLOW,
    ALWAYS_DENIED,
    ConnectRequest,
    Decision,
    DnsQuery,
    Policy,
    Rule,
    Verdict,
    always_denied,
    claims_can_deny,
    decide_connect,
    decide_dns,
    deny,
    from_callback,
    from_callback_error,
    normalize_ip,
)


def req(dst, port=443, *, proto="tcp", names=(), sni=None, http_host=None):
    return ConnectRequest(
        id=7, proto=proto, src_ip="10.0.2.100", src_port=40000, dst_ip=dst, dst_port=port,
        names=names, sni=sni, http_host=http_host,
    )


def connect(policy, dst, port=443, **kw):
    return decide_connect(policy, req(dst, port, **kw))


def dns(policy, qname, qtype="A"):
    return decide_dns(policy, DnsQuery(id=1, qname=qname, qtype=qtype, transport="udp", src_ip="10.0.2.100", src_port=5353))


# -- verdict values -------------------------------------------------------------------
def test_verdict_helpers():
    assert ALLOW == Verdict(allowed=True, reason=None)
    assert deny("nope") == Verdict(allowed=False, reason="nope")
    assert deny().reason is None
    assert repr(deny("x")) == "<Verdict deny 'x'>"
    with pytest.raises(AttributeError):
        ALLOW.allowed = False  # frozen


def test_callback_decisions():
    assert from_callback(ALLOW) == Decision(verdict=ALLOW, rule="callback")
    bad = from_callback("yes")
    assert not bad.allowed and bad.rule == "callback-error" and "str" in bad.verdict.reason
    err = from_callback_error("on_connect timed out after 2.0 s")
    assert not err.allowed and err.rule == "callback-error"


# -- per rule kind (run mode) -----------------------------------------------------------
CASES = [
    # rule, request kwargs, allowed?
    ("example.com", dict(dst="198.51.100.10", names=("example.com",)), True),
    ("example.com", dict(dst="198.51.100.10", names=("www.example.com",)), False),
    ("example.com", dict(dst="198.51.100.10"), False),
    ("*.example.com", dict(dst="198.51.100.10", names=("www.example.com",)), True),
    ("*.example.com", dict(dst="198.51.100.10", names=("example.com",)), False),
    ("example.com:443", dict(dst="198.51.100.10", port=443, names=("example.com",)), True),
    ("example.com:443", dict(dst="198.51.100.10", port=80, names=("example.com",)), False),
    ("example.com:443/tcp", dict(dst="198.51.100.10", port=443, proto="udp", names=("example.com",)), False),
    ("example.com", dict(dst="198.51.100.10", port=0, proto="icmp", names=("example.com",)), True),
    ("example.com:443", dict(dst="198.51.100.10", port=0, proto="icmp", names=("example.com",)), False),
    ("203.0.113.7", dict(dst="203.0.113.7"), True),
    ("203.0.113.7", dict(dst="203.0.113.8"), False),
    ("203.0.113.7", dict(dst="::ffff:203.0.113.7"), True),  # mapped = the v4 address
    ("203.0.113.7:80", dict(dst="203.0.113.7", port=80), True),
    ("203.0.113.7:80", dict(dst="203.0.113.7", port=81), False),
    ("203.0.113.0/24", dict(dst="203.0.113.200"), True),
    ("203.0.113.0/24", dict(dst="203.0.114.1"), False),
    ("[2001:db8::1]:53/udp", dict(dst="2001:db8::1", port=53, proto="udp"), True),
    ("[2001:db8::1]:53/udp", dict(dst="2001:db8::1", port=53, proto="tcp"), False),
    ("[2001:db8::1]:53/udp", dict(dst="2001:db8::2", port=53, proto="udp"), False),
    ("2001:db8::/32", dict(dst="2001:db8:ffff::1"), True),
    ("2001:db8::/32", dict(dst="2001:db9::1"), False),
    ("2001:db8::/32", dict(dst="203.0.113.7"), False),
    # an IP rule ignores names; a domain rule ignores addresses
    ("203.0.113.7", dict(dst="203.0.113.7", names=("anything.test",)), True),
    ("example.com", dict(dst="203.0.113.7", names=("other.test",)), False),
]


@pytest.mark.parametrize(("rule", "kw", "allowed"), CASES)
def test_allow_rule_kinds(rule, kw, allowed):
    decision = connect(Policy(allow=[rule]), **kw)
    assert decision.allowed is allowed
    assert decision.rule == (rule if allowed else "default-deny")
    assert decision.dial is None


@pytest.mark.parametrize(("rule", "kw", "matches"), CASES)
def test_deny_rule_kinds_in_audit_mode(rule, kw, matches):
    decision = connect(Policy(mode="audit", deny=[rule]), **kw)
    assert decision.allowed is not matches
    assert decision.rule == (rule if matches else "audit-allow")


def test_default_deny_names_the_destination():
    d = connect(Policy(), "203.0.113.7", 8443, names=("example.com",))
    assert not d.allowed and d.rule == "default-deny"
    assert d.by_default
    assert "203.0.113.7:8443" in d.verdict.reason and "example.com" in d.verdict.reason


def test_audit_allows_by_default():
    d = connect(Policy(mode="audit"), "203.0.113.7")
    assert d == Decision(verdict=ALLOW, rule="audit-allow")
    assert d.by_default


def test_rule_decisions_are_final():
    assert not connect(Policy(allow=["203.0.113.7"]), "203.0.113.7").by_default
    assert not connect(Policy(), "127.0.0.1").by_default


@pytest.mark.parametrize(
    ("allow", "deny_", "kw"),
    [
        (["example.com"], ["example.com"], dict(dst="203.0.113.7", names=("example.com",))),
        (["*.example.com"], ["bad.example.com"], dict(dst="203.0.113.7", names=("bad.example.com",))),
        (["203.0.113.0/24"], ["203.0.113.7"], dict(dst="203.0.113.7")),
        (["203.0.113.7"], ["*.tracker.test"], dict(dst="203.0.113.7", names=("x.tracker.test",))),
        (["203.0.113.7"], ["203.0.113.7:443"], dict(dst="203.0.113.7", port=443)),
        (["example.com"], ["203.0.113.0/24"], dict(dst="203.0.113.7", names=("example.com",))),
        # a deny on the v4 address also covers its IPv6 spellings
        (["64:ff9b::/96"], ["203.0.113.7"], dict(dst="64:ff9b::cb00:7107")),
        (["2001:db8::/32"], ["2001:db8::1"], dict(dst="2001:db8::1")),
        (["203.0.113.7"], ["evil.test"], dict(dst="203.0.113.7", sni="evil.test")),
        (["203.0.113.7"], ["evil.test"], dict(dst="203.0.113.7", http_host="Evil.test:8080")),
    ],
)
@pytest.mark.parametrize("mode", ["run", "audit"])
def test_deny_wins(allow, deny_, kw, mode):
    d = connect(Policy(mode=mode, allow=allow, deny=deny_), **kw)
    assert not d.allowed
    assert d.rule == deny_[0]
    assert "deny rule" in d.verdict.reason


def test_deny_rule_port_does_not_block_other_ports():
    p = Policy(allow=["example.com"], deny=["example.com:25"])
    assert connect(p, "203.0.113.7", 443, names=("example.com",)).allowed
    assert not connect(p, "203.0.113.7", 25, names=("example.com",)).allowed


def test_any_dns_name_may_allow():
    p = Policy(allow=["*.cdn.test"])
    d = connect(p, "203.0.113.7", names=("other.test", "a.cdn.test"))
    assert d.allowed and d.rule == "*.cdn.test"


# -- claimed names (SNI / Host) -------------------------------------------------------
def test_sni_alone_never_allows():
    p = Policy(allow=["example.com"])
    assert not connect(p, "203.0.113.7", sni="example.com").allowed
    assert not connect(p, "203.0.113.7", http_host="example.com").allowed


def test_sni_naming_an_unallowed_host_denies_a_domain_allowed_flow():
    p = Policy(allow=["pypi.org"])
    d = connect(p, "203.0.113.7", names=("pypi.org",), sni="evil.test")
    assert not d.allowed and d.rule == "claimed-name-not-allowed"
    assert "evil.test" in d.verdict.reason
    ok = connect(p, "203.0.113.7", names=("pypi.org",), sni="PyPI.org.", http_host="pypi.org:443")
    assert ok.allowed and ok.rule == "pypi.org"


def test_sni_does_not_narrow_an_address_rule():
    p = Policy(allow=["203.0.113.7"])
    assert connect(p, "203.0.113.7", sni="whatever.test").allowed


def test_sni_mismatch_in_audit_mode_is_recorded_but_allowed():
    d = connect(Policy(mode="audit", allow=["pypi.org"]), "203.0.113.7", names=("pypi.org",), sni="evil.test")
    assert d.allowed and d.rule == "audit-allow"


# -- the always-denied set ----------------------------------------------------------
def v6_forms(v4):
    """Every IPv6 spelling of an IPv4 address that must be denied like it."""
    n = int(ipaddress.IPv4Address(v4))
    return {
        "mapped": f"::ffff:{v4}",
        "compatible": str(ipaddress.IPv6Address(n)),
        "nat64": str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | n)),
        "6to4": str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1)),
    }


ALWAYS = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.0.2.2", "gateway"),
    ("10.0.2.3", "gateway"),
    ("fd00::2", "gateway"),
    ("fd00::3", "gateway"),
    ("169.254.169.254", "metadata"),
    ("100.100.100.200", "metadata"),
    ("168.63.129.16", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("fd00:ec2:ffff::1", "metadata"),
    ("169.254.0.1", "link-local"),
    ("169.254.255.255", "link-local"),
    ("fe80::1", "link-local"),
    ("febf::1", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.251", "multicast"),
    ("255.255.255.255", "multicast"),
    ("ff02::fb", "multicast"),
]
V4_ALWAYS = [(ip, cat) for ip, cat in ALWAYS if ":" not in ip]


@pytest.mark.parametrize(("ip", "category"), ALWAYS)
@pytest.mark.parametrize("mode", ["run", "audit"])
def test_always_denied(ip, category, mode):
    # even with broad allow rules and in audit mode
    p = Policy(mode=mode, allow=["0.0.0.0/0", "::/0", "example.com"])
    for proto, port in (("tcp", 80), ("udp", 53), ("icmp", 0)):
        d = connect(p, ip, port, proto=proto, names=("example.com",))
        assert not d.allowed, (ip, proto)
        assert d.rule == f"always-denied:{category}"
        assert category in d.verdict.reason


@pytest.mark.parametrize(("ip", "category"), V4_ALWAYS)
@pytest.mark.parametrize("form", ["mapped", "compatible", "nat64", "6to4"])
def test_always_denied_ipv6_spellings(ip, category, form):
    v6 = v6_forms(ip)[form]
    p = Policy(mode="audit", allow=["::/0", "0.0.0.0/0", "64:ff9b::/96", "2002::/16"])
    d = connect(p, v6)
    assert not d.allowed, v6
    assert d.rule == f"always-denied:{category}"


@pytest.mark.parametrize(
    "ip", ["203.0.113.7", "198.51.100.1", "2001:db8::1", "10.0.3.2", "192.0.2.1", "::ffff:203.0.113.7",
           "64:ff9b::cb00:7107", "fd00::100", "169.253.255.255", "128.0.0.1"]
)
def test_ordinary_addresses_are_not_always_denied(ip):
    assert always_denied(normalize_ip(ip)) is None
    assert connect(Policy(mode="audit"), ip).allowed


@pytest.mark.parametrize(
    ("rule", "dst", "port", "allowed"),
    [
        ("169.254.169.254", "169.254.169.254", 80, True),
        ("169.254.169.254:80", "169.254.169.254", 80, True),
        ("169.254.169.254:80", "169.254.169.254", 443, False),
        # only one exact address names it: a network, even inside the range, never does
        ("169.254.0.0/16", "169.254.169.254", 80, False),
        ("169.254.0.0/16", "169.254.1.1", 80, False),
        ("169.254.1.1", "169.254.1.1", 80, True),
        ("169.254.169.254", "169.254.1.1", 80, False),
        ("127.0.0.1:8080", "127.0.0.1", 8080, True),
        ("127.0.0.1:8080", "::ffff:127.0.0.1", 8080, True),  # mapped is the v4 address
        ("127.0.0.1:8080", "::127.0.0.1", 8080, False),  # other spellings need their own rule
        ("127.0.0.1:8080", "64:ff9b::7f00:1", 8080, False),
        ("[64:ff9b::7f00:1]", "64:ff9b::7f00:1", 8080, True),  # unbracketed: ambiguous
        ("::1", "::1", 22, True),
        ("fd00:ec2::254", "fd00:ec2::254", 80, True),
        ("fe80::/10", "fe80::1", 80, False),
        ("fe80::1", "fe80::1", 80, True),
        ("10.0.2.2", "10.0.2.2", 22, True),
        # broader than the always-denied range: does not name it
        ("0.0.0.0/0", "127.0.0.1", 80, False),
        ("128.0.0.0/1", "169.254.169.254", 80, False),
        ("169.0.0.0/8", "169.254.169.254", 80, False),
        ("::/0", "::1", 80, False),
        ("fd00::/8", "fd00:ec2::254", 80, False),
        ("fd00::/16", "fd00::2", 80, False),
        # a domain never opens an always-denied address (DNS rebinding)
        ("localhost", "127.0.0.1", 80, False),
    ],
)
def test_explicit_allow_opens_always_denied(rule, dst, port, allowed):
    d = connect(Policy(allow=[rule]), dst, port, names=("localhost",))
    assert d.allowed is allowed, d
    if allowed:
        assert d.rule == rule


def test_explicit_allow_still_loses_to_deny():
    assert not connect(Policy(allow=["169.254.169.254"], deny=["169.254.0.0/16"]), "169.254.169.254").allowed


# -- --allow-host-port ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("dst", "port", "proto", "dial"),
    [
        ("10.0.2.2", 8080, "tcp", ("127.0.0.1", 8080)),
        ("10.0.2.2", 8080, "udp", ("127.0.0.1", 8080)),
        ("fd00::2", 8080, "tcp", ("::1", 8080)),
        ("::ffff:10.0.2.2", 8080, "tcp", ("127.0.0.1", 8080)),
    ],
)
def test_allow_host_port_maps_gateway_to_host_loopback(dst, port, proto, dial):
    d = connect(Policy(host_ports=[8080, "9000"]), dst, port, proto=proto)
    assert d.allowed and d.rule == "allow-host-port:8080" and d.dial == dial
    assert "dial=" in repr(d)


@pytest.mark.parametrize(
    ("dst", "port", "proto"),
    [
        ("10.0.2.2", 8081, "tcp"),  # other port
        ("10.0.2.2", 0, "icmp"),
        ("10.0.2.3", 8080, "tcp"),  # the DNS address is not the host
        ("127.0.0.1", 8080, "tcp"),  # the sandbox's own loopback never reaches here; host's is denied
        ("::127.0.0.1", 8080, "tcp"),
        ("64:ff9b::a00:202", 8080, "tcp"),
    ],
)
def test_allow_host_port_is_narrow(dst, port, proto):
    d = connect(Policy(mode="audit", host_ports=[8080]), dst, port, proto=proto)
    assert not d.allowed and d.rule.startswith("always-denied:") and d.dial is None


def test_allow_host_port_loses_to_deny():
    d = connect(Policy(host_ports=[8080], deny=["10.0.2.2"]), "10.0.2.2", 8080)
    assert not d.allowed and d.rule == "10.0.2.2"


@pytest.mark.parametrize("bad", ["0", "65536", "http", "-1", "80/tcp", ""])
def test_allow_host_port_rejects_bad_ports(bad):
    with pytest.raises(ConfigError, match="--allow-host-port"):
        Policy(host_ports=[bad])


# -- policy construction ---------------------------------------------------------------
def test_policy_accepts_strings_and_rules_and_rejects_mixups():
    p = Policy(allow="example.com", deny=[Rule.parse("evil.test", "deny")])
    assert p.allow == (Rule.parse("example.com", "allow"),)
    assert p.allow[0].origin == "--allow"
    with pytest.raises(ConfigError, match="is a deny rule"):
        Policy(allow=[Rule.parse("x.test", "deny")])
    with pytest.raises(ConfigError, match="invalid allow rule"):
        Policy(allow=["bad rule"])
    with pytest.raises(ValueError):
        Policy(mode="permissive")


def test_request_validation_and_name():
    r = req("203.0.113.7", names=("a.test", "b.test"), sni="c.test")
    assert r.name == "a.test"
    assert req("203.0.113.7", sni="c.test").name == "c.test"
    assert req("203.0.113.7", http_host="d.test").name == "d.test"
    assert req("203.0.113.7").name is None
    assert repr(req("2001:db8::1", 53)) == "<ConnectRequest #7 tcp [2001:db8::1]:53>"
    with pytest.raises(ValueError):
        req("203.0.113.7", proto="sctp")
    with pytest.raises(ValueError):
        req("not-an-ip")


# -- DNS ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("allow", "deny_", "qname", "rule"),
    [
        (["example.com"], [], "example.com", "example.com"),
        (["example.com"], [], "EXAMPLE.com.", "example.com"),
        (["example.com:443/tcp"], [], "example.com", "example.com:443/tcp"),  # port rule still resolves
        (["*.example.com"], [], "a.b.example.com", "*.example.com"),
        (["*.example.com"], [], "example.com", None),
        (["example.com"], [], "www.example.com", None),
        (["203.0.113.7"], [], "example.com", None),  # address rules play no part in DNS
        ([], [], "example.com", None),
        (["*.example.com"], ["bad.example.com"], "bad.example.com", "bad.example.com"),
        (["example.com"], ["example.com:25"], "example.com", "example.com"),  # port deny: connections only
        (["example.com"], ["example.com/udp"], "example.com", "example.com"),
    ],
)
def test_decide_dns(allow, deny_, qname, rule):
    d = dns(Policy(allow=allow, deny=deny_), qname)
    if rule is None:
        assert d.rule == "default-deny" and not d.allowed and d.by_default
    elif deny_ and rule == deny_[0]:
        assert not d.allowed and d.rule == rule
    else:
        assert d.allowed and d.rule == rule


def test_dns_audit_mode():
    assert dns(Policy(mode="audit"), "anything.test").rule == "audit-allow"
    d = dns(Policy(mode="audit", deny=["*.evil.test"]), "x.evil.test")
    assert not d.allowed and d.rule == "*.evil.test"


# -- properties ------------------------------------------------------------------------
v4s = st.ip_addresses(v=4)
v6s = st.ip_addresses(v=6)
special_v4 = st.sampled_from([ip for ip, _ in V4_ALWAYS]).map(ipaddress.IPv4Address)
any_dst = st.one_of(
    v4s, v6s,
    special_v4,
    special_v4.map(lambda a: ipaddress.IPv6Address(int(a) | 0xFFFF00000000)),
    special_v4.map(lambda a: ipaddress.IPv6Address(int(a))),
    special_v4.map(lambda a: ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(a))),
    st.sampled_from([ipaddress.ip_address(ip) for ip, _ in ALWAYS]),
)
domain_rules = st.sampled_from(["example.com", "*.example.com", "localhost", "*.internal", "metadata.google.internal"])
broad_rules = st.sampled_from(["0.0.0.0/0", "::/0", "128.0.0.0/1", "0.0.0.0/1", "::/1", "fc00::/7", "64:ff9b::/96",
                               "2002::/16", "::ffff:0:0/96", "169.0.0.0/8", "126.0.0.0/7", "fd00::/8"])


@given(
    dst=any_dst,
    port=st.integers(0, 65535),
    proto=st.sampled_from(["tcp", "udp", "icmp"]),
    mode=st.sampled_from(["run", "audit"]),
    allow=st.lists(st.one_of(domain_rules, broad_rules), max_size=4),
    host_ports=st.lists(st.integers(1, 65535), max_size=2),
    names=st.lists(st.sampled_from(["example.com", "a.example.com", "localhost", "x.internal"]), max_size=2),
)
@settings(max_examples=1000)
def test_never_allows_always_denied_without_an_explicit_rule(dst, port, proto, mode, allow, host_ports, names):
    p = Policy(mode=mode, allow=allow, host_ports=host_ports)
    d = connect(p, dst, port, proto=proto, names=names, sni="example.com")
    norm = normalize_ip(dst)
    if always_denied(norm) is not None:
        if d.dial is not None:  # the one sanctioned door: --allow-host-port on the gateway
            assert norm in (ipaddress.ip_address("10.0.2.2"), ipaddress.ip_address("fd00::2"))
            assert port in p.host_ports and d.dial[1] == port
            assert d.dial[0] in ("127.0.0.1", "::1")
        else:
            assert not d.allowed, d
    else:
        assert d.dial is None


@given(
    dst=st.one_of(v4s, v6s),
    port=st.integers(0, 65535),
    allow=st.lists(st.one_of(domain_rules, broad_rules), max_size=3),
    deny_=st.lists(st.one_of(domain_rules, broad_rules), min_size=1, max_size=3),
    names=st.lists(st.sampled_from(["example.com", "a.example.com", "x.internal"]), max_size=2),
)
@settings(max_examples=500)
def test_deny_always_wins(dst, port, allow, deny_, names):
    p = Policy(mode="audit", allow=allow + deny_, deny=deny_)
    d = connect(p, dst, port, names=names)
    rules = [Rule.parse(t, "deny") for t in deny_]
    norm = normalize_ip(dst)
    if any(r.covers_ip(norm) or any(r.matches_name(n) for n in names) for r in rules):
        assert not d.allowed


claimable = st.one_of(st.none(), st.sampled_from(
    ["example.com", "a.example.com", "evil.test", "x.internal", "localhost", "metadata.google.internal:80",
     "EXAMPLE.com.", "[::1]:443", "10.0.2.2"]))


@given(
    dst=st.one_of(v4s, v6s, any_dst),
    port=st.sampled_from([80, 443, 8080]),
    mode=st.sampled_from(["run", "audit"]),
    allow=st.lists(st.one_of(domain_rules, broad_rules, domain_rules.map(lambda r: r + ":443"),
                             broad_rules.map(lambda r: r + "/udp")), max_size=4),
    deny_=st.lists(st.one_of(domain_rules, broad_rules, domain_rules.map(lambda r: r + ":8080")), max_size=2),
    names=st.lists(st.sampled_from(["example.com", "a.example.com", "x.internal", "localhost"]), max_size=2),
    sni=claimable,
    http_host=claimable,
)
@settings(max_examples=2000)
def test_observed_flow_cannot_be_fronted_past_the_rules(dst, port, mode, allow, deny_, names, sni, http_host):
    """The attack: a flow let through without waiting for its first bytes
    (``observe``) claims, in its SNI or Host, a name a rule would deny.
    claims_can_deny must say so whenever some claim could flip the verdict."""
    p = Policy(mode=mode, allow=allow, deny=deny_)
    bare = req(dst, port, names=names)
    if not decide_connect(p, bare).allowed or claims_can_deny(p, bare):
        return
    claimed = decide_connect(p, req(dst, port, names=names, sni=sni, http_host=http_host))
    assert claimed.allowed, (claimed, p)


def test_claims_can_deny_cases():
    assert not claims_can_deny(Policy(allow=["198.51.100.10"]), req("198.51.100.10", 80))
    assert claims_can_deny(Policy(allow=["198.51.100.10"], deny=["evil.test"]), req("198.51.100.10", 80))
    # a name deny rule for another port cannot match this flow
    assert not claims_can_deny(Policy(allow=["198.51.100.10"], deny=["evil.test:25"]), req("198.51.100.10", 80))
    # allowed by a domain rule: every claimed name must be allowed too
    assert claims_can_deny(Policy(allow=["example.com"]), req("198.51.100.10", 443, names=["example.com"]))
    # ... except in audit mode, where the mismatch is only recorded
    assert not claims_can_deny(Policy(mode="audit", allow=["example.com"]),
                               req("198.51.100.10", 443, names=["example.com"]))


def test_always_denied_table_is_consistent():
    for category, net in ALWAYS_DENIED:
        assert always_denied(net.network_address) is not None
        assert category in {"loopback", "gateway", "metadata", "link-local", "unspecified", "multicast"}
