"""Event records: one stream of attrs frozen classes, each with a stable ``to_dict()``.

The dict form is what ``--events FILE`` writes, one JSON object per line; the field
names are documented in ``docs/events.md`` and only ever grow.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from typing import Any, ClassVar

import attrs

from corral.policy import Answer, ConnectRequest, Decision, DnsQuery, Process

__all__ = [
    "CloseEvent",
    "ConnectEvent",
    "DnsEvent",
    "Event",
    "EventsDroppedEvent",
    "LimitEvent",
    "PolicyErrorEvent",
    "SandboxExitEvent",
    "SandboxStartEvent",
]


def _now() -> float:
    return time.time()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, (Answer, Process)):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


class Event:
    """Base of every event: ``type`` names the record, ``ts`` is wall-clock seconds."""

    TYPE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.TYPE}
        for name in _field_names(type(self)):
            d[name] = _jsonable(getattr(self, name))
        return d


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in attrs.fields(cls))


def _verdict_word(decision: Decision) -> str:
    return "allow" if decision.allowed else "deny"


@attrs.frozen(kw_only=True)
class DnsEvent(Event):
    """One per DNS query the sandbox sent to corral's resolver."""

    TYPE: ClassVar[str] = "dns"
    query_id: int
    qname: str
    qtype: str
    transport: str
    src_ip: str | None = None
    src_port: int | None = None
    verdict: str
    rule: str
    reason: str | None = None
    rcode: str | None = None
    answers: tuple[Answer, ...] = attrs.field(default=(), converter=tuple)
    answers_cut: int = 0  # records of the answer not listed in ``answers`` (MAX_ANSWERS)
    upstream: str | None = None
    process: Process | None = None
    process_unknown: str | None = None
    ts: float = attrs.field(factory=_now)

    MAX_ANSWERS: ClassVar[int] = 32

    @classmethod
    def from_decision(
        cls, query: DnsQuery, decision: Decision, *, rcode: str | None = None,
        answers: tuple[Answer, ...] = (), upstream: str | None = None, ts: float | None = None,
    ) -> DnsEvent:
        """The event of one query; ``answers`` beyond MAX_ANSWERS are counted in
        ``answers_cut``, not listed (a hostile upstream's 3,500-record answer)."""
        answers = tuple(answers)
        cut = max(0, len(answers) - cls.MAX_ANSWERS)
        return cls(
            query_id=query.id, qname=query.qname, qtype=query.qtype, transport=query.transport,
            src_ip=str(query.src_ip) if query.src_ip is not None else None, src_port=query.src_port,
            verdict=_verdict_word(decision), rule=decision.rule, reason=decision.verdict.reason,
            rcode=rcode, answers=answers[: cls.MAX_ANSWERS], answers_cut=cut, upstream=upstream,
            process=query.process, process_unknown=query.process_unknown, ts=_now() if ts is None else ts,
        )


@attrs.frozen(kw_only=True)
class ConnectEvent(Event):
    """One per flow the sandbox opened (TCP connection, UDP flow, ICMP echo), allowed or not."""

    TYPE: ClassVar[str] = "connect"
    id: int
    proto: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    name: str | None = None
    names: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    sni: str | None = None
    http_host: str | None = None
    http_method: str | None = None
    http_path: str | None = None
    verdict: str
    rule: str
    reason: str | None = None
    dial: str | None = None
    process: Process | None = None
    process_unknown: str | None = None
    ts: float = attrs.field(factory=_now)

    @classmethod
    def from_decision(
        cls, req: ConnectRequest, decision: Decision, *, http_method: str | None = None,
        http_path: str | None = None, ts: float | None = None,
    ) -> ConnectEvent:
        dial = None
        if decision.dial is not None:
            host, port = decision.dial
            dial = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return cls(
            id=req.id, proto=req.proto, src_ip=str(req.src_ip), src_port=req.src_port,
            dst_ip=str(req.dst_ip), dst_port=req.dst_port, name=req.name, names=req.names,
            sni=req.sni, http_host=req.http_host, http_method=http_method, http_path=http_path,
            verdict=_verdict_word(decision), rule=decision.rule,
            reason=decision.verdict.reason, dial=dial, process=req.process,
            process_unknown=req.process_unknown, ts=_now() if ts is None else ts,
        )


@attrs.frozen(kw_only=True)
class CloseEvent(Event):
    """One per allowed flow when it ends. ``bytes_out`` = sandbox → world."""

    TYPE: ClassVar[str] = "close"
    id: int
    bytes_out: int = 0
    bytes_in: int = 0
    duration: float = 0.0
    reason: str = "closed"
    ts: float = attrs.field(factory=_now)


@attrs.frozen(kw_only=True)
class PolicyErrorEvent(Event):
    """A policy callback raised, timed out or returned something that is not a Verdict.

    The flow or query it was deciding was denied. ``subject`` is the flow id or qname.
    """

    TYPE: ClassVar[str] = "policy_error"
    callback: str
    subject: str
    error: str
    timed_out: bool = False
    ts: float = attrs.field(factory=_now)


@attrs.frozen(kw_only=True)
class LimitEvent(Event):
    """A bound was hit: from ``since`` to ``ts`` (wall-clock), ``count`` queries or
    flows beyond ``limit`` got ``action`` instead of an answer.  One per episode
    (an episode ends after a second without a refusal, or with the sandbox), never
    one per refused item: those have no events of their own."""

    TYPE: ClassVar[str] = "limit"
    limit: str  # the option: "max-dns-rate", "max-dns-pending"
    action: str  # what the refused ones got: "REFUSED", "SERVFAIL"
    detail: str  # human text: "more than 200 DNS queries per second"
    count: int
    since: float
    ts: float = attrs.field(factory=_now)


@attrs.frozen(kw_only=True)
class EventsDroppedEvent(Event):
    """Stands for events a bounded in-memory record (``Result.events``) left out;
    ``--events FILE`` and ``corral logs`` still have them all.  ``by_type``: how many
    of each ``type``."""

    TYPE: ClassVar[str] = "events_dropped"
    count: int
    by_type: dict = attrs.field(factory=dict, eq=False)
    ts: float = attrs.field(factory=_now)


@attrs.frozen(kw_only=True)
class SandboxStartEvent(Event):
    """The sandboxed command started. ``env_dropped``: the NAMES (never the values) of
    the caller's environment variables the credential scrub left out."""

    TYPE: ClassVar[str] = "sandbox_start"
    argv: tuple[str, ...] = attrs.field(converter=tuple)
    pid: int | None = None
    sandbox_id: str | None = None
    mode: str | None = None
    env_dropped: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    ts: float = attrs.field(factory=_now)


@attrs.frozen(kw_only=True)
class SandboxExitEvent(Event):
    """The sandboxed command ended: ``exit_code`` as ``corral run`` exits (128+N for signal N)."""

    TYPE: ClassVar[str] = "sandbox_exit"
    exit_code: int
    signal: int | None = None
    sandbox_id: str | None = None
    ts: float = attrs.field(factory=_now)
