"""Sans-io DNS message handling: queries, built responses, answer extraction, fuzzing."""

import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.net.dnsmsg import (
    MalformedDnsMessage,
    build_response,
    formerr_for,
    is_truncated,
    nxdomain,
    parse_query,
    parse_response,
    refused,
    servfail,
)
from corral.policy import Answer


def query(name="example.com", rdtype="A", **kw):
    return dns.message.make_query(name, rdtype, **kw)


@pytest.mark.parametrize(
    ("name", "rdtype", "qname", "qtype"),
    [
        ("Example.COM.", "A", "example.com", "A"),
        ("example.com", "AAAA", "example.com", "AAAA"),
        ("_443._tcp.example.com", "HTTPS", "_443._tcp.example.com", "HTTPS"),
        ("example.com", "TYPE65534", "example.com", "TYPE65534"),
        (".", "NS", ".", "NS"),
        ("7.113.0.203.in-addr.arpa", "PTR", "7.113.0.203.in-addr.arpa", "PTR"),
    ],
)
def test_parse_query(name, rdtype, qname, qtype):
    msg = query(name, rdtype)
    q = parse_query(msg.to_wire())
    assert (q.id, q.qname, q.qtype, q.qclass, q.opcode) == (msg.id, qname, qtype, "IN", "QUERY")
    assert q.flags & dns.flags.RD
    assert q.udp_payload == 512
    assert q.wire == msg.to_wire()


def test_parse_query_reads_edns_payload():
    assert parse_query(query(use_edns=0, payload=1232).to_wire()).udp_payload == 1232
    assert parse_query(query(use_edns=0, payload=100).to_wire()).udp_payload == 512


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (b"", "shorter than a DNS header"),
        (b"\x12\x34\x01\x00", "shorter than a DNS header"),
        (struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0), "0 questions"),
        (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0), "unparseable"),
        (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x07example\x03com\x00\x00", "unparseable"),
        (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01", "unparseable"),  # pointer loop
        (dns.message.make_response(query()).to_wire(), "a response"),
    ],
)
def test_malformed_queries_raise_a_clear_error(wire, problem):
    with pytest.raises(MalformedDnsMessage, match=problem):
        parse_query(wire)


def test_two_questions_rejected():
    msg = query()
    msg.question.append(dns.rrset.RRset(dns.name.from_text("b.test"), dns.rdataclass.IN, dns.rdatatype.A))
    with pytest.raises(MalformedDnsMessage, match="2 questions"):
        parse_query(msg.to_wire())


@pytest.mark.parametrize(("build", "rcode"), [(refused, "REFUSED"), (nxdomain, "NXDOMAIN"), (servfail, "SERVFAIL")])
def test_built_answers_keep_id_and_question(build, rcode):
    msg = query("ExAmPlE.com", "AAAA")  # 0x20 case randomization is preserved
    q = parse_query(msg.to_wire())
    resp = dns.message.from_wire(build(q))
    assert resp.id == msg.id
    assert dns.rcode.to_text(resp.rcode()) == rcode
    assert resp.flags & dns.flags.QR and resp.flags & dns.flags.RD and resp.flags & dns.flags.RA
    assert resp.question == msg.question and str(resp.question[0].name) == "ExAmPlE.com."
    assert not resp.answer
    assert msg.is_response(resp)
    assert parse_response(build(q), q).rcode == rcode


def test_build_notimp():
    q = parse_query(query().to_wire())
    assert parse_response(build_response(q, "NOTIMP"), q).rcode == "NOTIMP"


def test_formerr_for_garbage_with_a_header():
    wire = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\xff\xff"
    resp = dns.message.from_wire(formerr_for(wire))
    assert resp.id == 0xBEEF and resp.rcode() == dns.rcode.FORMERR and resp.flags & dns.flags.QR
    assert formerr_for(b"\x00" * 11) is None
    assert formerr_for(dns.message.make_response(query()).to_wire()) is None  # never answer a response


def make_upstream_response(q_msg):
    resp = dns.message.make_response(q_msg)
    resp.answer.append(dns.rrset.from_text("www.example.com.", 300, "IN", "CNAME", "edge.cdn.test."))
    resp.answer.append(dns.rrset.from_text("edge.cdn.test.", 60, "IN", "A", "203.0.113.7", "203.0.113.8"))
    resp.answer.append(dns.rrset.from_text("edge.cdn.test.", 60, "IN", "TXT", '"ignored"'))
    resp.additional.append(dns.rrset.from_text("ns.cdn.test.", 60, "IN", "AAAA", "2001:db8::53"))
    return resp


def test_parse_response_extracts_a_aaaa_cname_with_ttls():
    q_msg = query("www.example.com", "A")
    q = parse_query(q_msg.to_wire())
    r = parse_response(make_upstream_response(q_msg).to_wire(), q)
    assert r.rcode == "NOERROR" and r.id == q.id and not r.truncated
    assert r.answers[0] == Answer(name="www.example.com", rtype="CNAME", value="edge.cdn.test", ttl=300)
    assert sorted(r.answers[1:], key=lambda a: a.value) == [  # record order inside an RRset is not kept
        Answer(name="edge.cdn.test", rtype="A", value="203.0.113.7", ttl=60),
        Answer(name="edge.cdn.test", rtype="A", value="203.0.113.8", ttl=60),
    ]


def test_parse_response_checks_it_answers_the_query():
    q_msg = query("www.example.com", "A")
    q = parse_query(q_msg.to_wire())
    other = dns.message.make_response(query("other.test", "A"))
    other.id = q.id
    with pytest.raises(MalformedDnsMessage, match="question does not match"):
        parse_response(other.to_wire(), q)
    wrong_id = dns.message.make_response(q_msg)
    wrong_id.id = (q.id + 1) % 65536
    with pytest.raises(MalformedDnsMessage, match="does not match query id"):
        parse_response(wrong_id.to_wire(), q)
    with pytest.raises(MalformedDnsMessage, match="a query where a response"):
        parse_response(q_msg.to_wire(), q)


def test_truncation_bit():
    resp = dns.message.make_response(query())
    assert not is_truncated(resp.to_wire())
    resp.flags |= dns.flags.TC
    assert is_truncated(resp.to_wire())
    assert parse_response(resp.to_wire()).truncated
    assert not is_truncated(b"\x00")


@given(st.binary(max_size=600))
@settings(max_examples=1500)
def test_no_bytes_crash_the_query_parser(wire):
    try:
        q = parse_query(wire)
    except MalformedDnsMessage:
        reply = formerr_for(wire)
        assert reply is None or len(reply) == 12
        return
    assert parse_response(refused(q), q).rcode == "REFUSED"


@given(st.binary(min_size=12, max_size=600))
@settings(max_examples=1500)
def test_no_bytes_crash_the_response_parser(wire):
    try:
        parse_response(b"\x00\x00\x80\x00" + wire[4:])
    except MalformedDnsMessage:
        pass


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_mutated_real_queries_do_not_crash(tail):
    base = query("a.example.com", "A", use_edns=0).to_wire()
    for wire in (base[: len(base) // 2] + tail, base + tail, base[:12] + tail):
        try:
            parse_query(wire)
        except MalformedDnsMessage:
            pass
