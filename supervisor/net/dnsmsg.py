"""DNS messages, sans-io (dnspython): parse queries, build refusals, read answers.

Queries are forwarded as the sandbox sent them and responses returned as the upstream
sent them: whatever the record types, nothing is re-encoded on the way through. This
module only reads them (for policy and the name table) and builds the few responses
corral itself gives (REFUSED / NXDOMAIN / SERVFAIL / NOTIMP / FORMERR).
"""

from __future__ import annotations

import struct

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from corral.policy import Answer

__all__ = [
    "MalformedDnsMessage",
    "ParsedQuery",
    "ParsedResponse",
    "build_response",
    "formerr_for",
    "is_truncated",
    "nxdomain",
    "parse_query",
    "parse_response",
    "refused",
    "servfail",
]

_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000


class MalformedDnsMessage(ValueError):
    """The bytes are not a DNS message corral can act on (internal: answered with FORMERR)."""


def _name_text(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return "."
    return name.to_text(omit_final_dot=True).lower()


def _from_wire(wire: bytes, **kw) -> dns.message.Message:
    if not isinstance(wire, (bytes, bytearray, memoryview)):
        raise MalformedDnsMessage(f"expected bytes, got {type(wire).__name__}")
    wire = bytes(wire)
    if len(wire) < _HEADER.size:
        raise MalformedDnsMessage(f"{len(wire)} bytes is shorter than a DNS header")
    try:
        return dns.message.from_wire(wire, **kw)
    except dns.exception.DNSException as e:
        raise MalformedDnsMessage(f"unparseable DNS message: {e}") from None
    except Exception as e:  # dnspython raises a few non-DNSException types on hostile input
        raise MalformedDnsMessage(f"unparseable DNS message: {type(e).__name__}: {e}") from None


@attrs.frozen(kw_only=True)
class ParsedQuery:
    """What corral needs from a query; ``wire`` is the query exactly as received."""

    id: int
    qname: str
    qtype: str
    qclass: str
    opcode: str
    flags: int
    udp_payload: int = 512
    wire: bytes = attrs.field(eq=False, repr=False)


def parse_query(wire: bytes) -> ParsedQuery:
    """Parse a query from the sandbox; raise MalformedDnsMessage for anything else."""
    msg = _from_wire(wire, question_only=True)
    if msg.flags & dns.flags.QR:
        raise MalformedDnsMessage("a response where a query was expected")
    if len(msg.question) != 1:
        raise MalformedDnsMessage(f"{len(msg.question)} questions (exactly 1 is supported)")
    q = msg.question[0]
    payload = 512
    try:
        full = dns.message.from_wire(bytes(wire))
        if full.edns >= 0:
            payload = max(512, int(full.payload))
    except Exception:  # EDNS is optional: an exotic additional section just means 512
        pass
    return ParsedQuery(
        id=msg.id,
        qname=_name_text(q.name),
        qtype=dns.rdatatype.to_text(q.rdtype),
        qclass=dns.rdataclass.to_text(q.rdclass),
        opcode=dns.opcode.to_text(msg.opcode()),
        flags=int(msg.flags),
        udp_payload=payload,
        wire=bytes(wire),
    )


def build_response(query: ParsedQuery, rcode: str) -> bytes:
    """A response to *query* (same id and question, RD copied, RA set) with *rcode* and no records."""
    msg = dns.message.from_wire(query.wire, question_only=True)
    resp = dns.message.make_response(msg)
    resp.flags |= dns.flags.RA
    resp.set_rcode(dns.rcode.from_text(rcode))
    return resp.to_wire()


def refused(query: ParsedQuery) -> bytes:
    return build_response(query, "REFUSED")


def nxdomain(query: ParsedQuery) -> bytes:
    return build_response(query, "NXDOMAIN")


def servfail(query: ParsedQuery) -> bytes:
    return build_response(query, "SERVFAIL")


def formerr_for(wire: bytes) -> bytes | None:
    """FORMERR for a query too broken to parse, when its header can be read.

    None when no answer should be sent: too short for a header, or a response
    (never answer a response: that is how reflection loops start).
    """
    if len(wire) < _HEADER.size:
        return None
    qid, flags = struct.unpack_from("!HH", wire)
    if flags & _QR:
        return None
    opcode_bits = flags & 0x7800
    rd = flags & 0x0100
    return _HEADER.pack(qid, _QR | opcode_bits | rd | 0x0080 | dns.rcode.FORMERR, 0, 0, 0, 0)


def is_truncated(wire: bytes) -> bool:
    """Is the TC bit set?"""
    return len(wire) >= 3 and bool(wire[2] & 0x02)


@attrs.frozen(kw_only=True)
class ParsedResponse:
    id: int
    rcode: str
    truncated: bool
    answers: tuple[Answer, ...]


def parse_response(wire: bytes, query: ParsedQuery | None = None) -> ParsedResponse:
    """Read an upstream response: rcode and the A/AAAA/CNAME records of its answer section.

    With *query*, the response must carry the same id and question.
    """
    msg = _from_wire(wire, ignore_trailing=True)
    if not msg.flags & dns.flags.QR:
        raise MalformedDnsMessage("a query where a response was expected")
    if query is not None:
        if msg.id != query.id:
            raise MalformedDnsMessage(f"response id {msg.id} does not match query id {query.id}")
        if len(msg.question) != 1 or _name_text(msg.question[0].name) != query.qname or (
            dns.rdatatype.to_text(msg.question[0].rdtype) != query.qtype
        ):
            raise MalformedDnsMessage("response question does not match the query")
    answers = []
    for rrset in msg.answer:
        if rrset.rdclass != dns.rdataclass.IN:
            continue
        owner = _name_text(rrset.name)
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            rtype = dns.rdatatype.to_text(rrset.rdtype)
            answers.extend(Answer(name=owner, rtype=rtype, value=rd.address, ttl=rrset.ttl) for rd in rrset)
        elif rrset.rdtype == dns.rdatatype.CNAME:
            answers.extend(
                Answer(name=owner, rtype="CNAME", value=_name_text(rd.target), ttl=rrset.ttl) for rd in rrset
            )
    return ParsedResponse(
        id=msg.id,
        rcode=dns.rcode.to_text(msg.rcode()),
        truncated=bool(msg.flags & dns.flags.TC),
        answers=tuple(answers),
    )
