"""Hypothesis targets for the sans-io parsers not fuzzed elsewhere (issue 5, item 5).

Already fuzzed, not repeated here: SNI/Host sniffing (test_sniff.py), DNS query and
response parsing from random bytes (test_dnsmsg.py), single rule texts
(test_policy_rules.py).  Added here: the pump's lazy frame parser (``Packet``, it reads
every frame the sandbox writes when ``on_packet`` is set), ``--allow-file`` contents, and
mutations of real DNS responses (the upstream is untrusted too).

Longer runs on demand: ``CORRAL_FUZZ_EXAMPLES=100000 pytest tests/test_fuzz_parsers.py``.
"""

import ipaddress
import os

import dns.message
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import ConfigError
from corral.net.dnsmsg import MalformedDnsMessage, parse_query, parse_response
from corral.net.pump import Packet
from corral.policy._rules import Rule, load_allow_file

EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "400"))
fuzz = settings(max_examples=EXAMPLES, deadline=None)

MAC = b"\x02\x00\x0a\x00\x02\x02\x02\x00\x0a\x00\x02\x64"


def _read_all(p):
    fields = (p.length, p.ethertype, p.src, p.dst, p.proto, p.sport, p.dport)
    repr(p)
    return fields


# ------------------------------------------------------------------ pump Packet


@fuzz
@given(st.binary(max_size=200), st.sampled_from([b"", b"\x08\x00", b"\x86\xdd", b"\x08\x06"]))
def test_packet_parser_never_raises_on_any_frame(tail, ethertype):
    raw = (MAC + ethertype + tail) if ethertype else tail
    for direction in ("egress", "ingress"):
        length, et, src, dst, proto, sport, dport = _read_all(Packet(raw, direction))
        assert length == len(raw)
        assert (sport is None) == (dport is None)
        if src is None:
            assert dst is None and proto is None and sport is None


ADDRS4 = st.sampled_from(["10.0.2.100", "198.51.100.7", "203.0.113.1", "10.0.2.3"])
ADDRS6 = st.sampled_from(["fd00::100", "2001:db8::7", "fd00::3"])
PORTS = st.integers(0, 65535)


@st.composite
def frames(draw):
    """A well-formed frame built with scapy, and the fields it carries."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether

    v6 = draw(st.booleans())
    src, dst = (draw(ADDRS6), draw(ADDRS6)) if v6 else (draw(ADDRS4), draw(ADDRS4))
    l4 = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    sport, dport = draw(PORTS), draw(PORTS)
    payload = draw(st.binary(max_size=64))
    nops = draw(st.sampled_from([0, 4, 40]))  # IP options: header length 20, 24 or 60
    ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst, options=[IPOption_NOP()] * nops)
    if l4 == "tcp":
        pkt, proto = ip / TCP(sport=sport, dport=dport) / payload, 6
    elif l4 == "udp":
        pkt, proto = ip / UDP(sport=sport, dport=dport) / payload, 17
    elif v6:
        pkt, proto, sport, dport = ip / ICMPv6EchoRequest() / payload, 58, None, None
    else:
        pkt, proto, sport, dport = ip / ICMP() / payload, 1, None, None
    raw = bytes(Ether(src="02:00:0a:00:02:64", dst="02:00:0a:00:02:02") / pkt)
    return raw, (ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, sport, dport)


@fuzz
@given(frames())
def test_packet_parser_agrees_with_scapy_on_valid_frames(frame):
    raw, (src, dst, proto, sport, dport) = frame
    p = Packet(raw, "egress")
    assert (p.src, p.dst, p.proto, p.sport, p.dport) == (src, dst, proto, sport, dport)


@fuzz
@given(frames(), st.integers(0, 10_000), st.binary(min_size=1, max_size=8), st.booleans())
def test_packet_parser_survives_mutated_and_truncated_frames(frame, at, junk, cut):
    raw = frame[0]
    at %= len(raw)
    mutated = raw[:at] if cut else raw[:at] + junk + raw[at + len(junk):]
    _read_all(Packet(mutated, "ingress"))


# ------------------------------------------------------------------ --allow-file

RULE_LINES = st.one_of(
    st.sampled_from(["example.com", "*.example.com", "example.com:443", "203.0.113.0/24",
                     "[2001:db8::1]:53/udp", "# a comment", "", "   ", "\t# indented"]),
    st.text(alphabet=st.sampled_from([chr(c) for c in range(32, 127)] + list("\téß日")),
            max_size=40),
)


@fuzz
@given(st.lists(RULE_LINES, max_size=12), st.sampled_from(["\n", "\r\n"]))
def test_allow_file_parses_or_names_the_bad_line(tmp_path_factory, lines, newline):
    path = tmp_path_factory.mktemp("allow") / "allow.txt"
    path.write_text(newline.join(lines), encoding="utf-8", newline="")
    try:
        rules = load_allow_file(path)
    except ConfigError as exc:
        assert str(path) in str(exc) or "line" in str(exc), exc
        return
    assert all(isinstance(r, Rule) and r.action == "allow" for r in rules)
    assert len(rules) <= len([x for x in lines if x.strip()])


# ------------------------------------------------------------------ DNS responses


def _real_response():
    q = dns.message.make_query("www.example.com", "A", use_edns=0)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("www.example.com.", 60, "IN", "CNAME", "cdn.example.net."))
    r.answer.append(dns.rrset.from_text("cdn.example.net.", 60, "IN", "A", "203.0.113.1", "203.0.113.2"))
    return q.to_wire(), r.to_wire()


QUERY_WIRE, RESPONSE_WIRE = _real_response()


@fuzz
@given(st.integers(0, 10_000), st.binary(max_size=16), st.booleans())
def test_mutated_real_responses_parse_or_are_malformed(at, junk, cut):
    query = parse_query(QUERY_WIRE)
    at %= len(RESPONSE_WIRE)
    wire = RESPONSE_WIRE[:at] if cut else RESPONSE_WIRE[:at] + junk + RESPONSE_WIRE[at + len(junk):]
    try:
        resp = parse_response(wire, query)
    except MalformedDnsMessage:
        return
    assert isinstance(resp.rcode, str)
