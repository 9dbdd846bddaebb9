"""The flow state machine: every decision about a sandbox flow, with no I/O (h11-style).

:class:`FlowMachine` takes events — :class:`NewFlow`, :class:`FlowData` (bytes the
stack read ahead), :class:`CallbackDone` (a user callback returned, raised or timed
out), :class:`FlowClosed` — and returns actions — :class:`Answer` (a verdict for the
stack: ``allow``, ``deny``, ``peek``, ``observe``, or ``more``: read on),
:class:`Emit` (an event record) and :class:`Ask` (run a user callback).  The trio
driver (``service.NetworkService``) moves events in and carries actions out; the
clock is the stack's (its read-ahead bound ends with a ``FlowData(last=True)``) and
the driver's (a callback's timeout is a ``CallbackDone(timed_out=True)``).

The life of a TCP flow (docs/policy.md, "TLS SNI and HTTP Host")::

    NewFlow ─ rules ─ deny ───────────────────────────────────────────── Answer deny
               │ no rule decided, on_connect given: Ask on_connect ─ deny ─ Answer deny
               ▼ allowed so far
      a claimed name could change the verdict?  ── no ── Answer observe (names only)
               ▼ yes: Answer peek (held: nothing reaches the destination yet)
    FlowData ... FlowData: the sniffer reassembles the ClientHello / request head;
               incomplete and not last ── Answer more
               incomplete at the last (16 KiB, the time bound, eof) ── deny claim-incomplete
               (the server's bytes flow meanwhile; nothing sent and eof: no claim)
               unreadable (malformed, HTTP/2 prior knowledge) ─────── deny claim-unreadable
               ▼ complete: rules again with sni / http_host
      no rule decided and on_claim given: Ask on_claim ─ its verdict
               ▼ else the rule's verdict, or the allow it had so far  ── Answer allow|deny

A claimed name *could change the verdict* when ``policy.claims_can_deny`` says so (a
deny rule on a name, a domain-rule allow in ``run``), or when an ``on_claim``
callback will decide the flow.  Every flow gets exactly one ConnectEvent and one
CloseEvent.
"""

from __future__ import annotations

import logging

import attrs

from .. import policy as pol
from ..events import CloseEvent, ConnectEvent, PolicyErrorEvent
from .sniff import DEFAULT_BUDGET, FOUND, MALFORMED, NEED_MORE, FlowSniffer

__all__ = [
    "Answer", "Ask", "CallbackDone", "CLAIM_INCOMPLETE", "CLAIM_UNREADABLE", "Emit", "FlowClosed",
    "FlowData", "FlowMachine", "NewFlow", "SERVER_FIRST_PORTS",
]

log = logging.getLogger("corral.net")

# Rules of a held flow denied because its first message could not be read.
CLAIM_INCOMPLETE = "claim-incomplete"
CLAIM_UNREADABLE = "claim-unreadable"

# Well-known ports whose protocols have the server speak first (FTP, SSH, Telnet,
# SMTP, POP3, NNTP, IMAP, submission, MySQL, VNC): their clients send nothing before
# a greeting, so they are never held for a first message: decided by the rules
# (DNS names, addresses) alone.
SERVER_FIRST_PORTS = frozenset({21, 22, 23, 25, 110, 119, 143, 587, 3306, 5900, 5901})

# Close reasons of a flow the stack ended before the supervisor's verdict counted.
_STACK_DENIALS = frozenset({"denied", "policy-timeout", "overload", "shutdown"})

# Flow states.
_DECIDING = "deciding"  # on_connect asked
_HOLDING = "holding"  # answered peek: reading the first message
_CLAIM = "claim"  # on_claim asked
_OBSERVING = "observing"  # allowed (observe): the first bytes only name it
_DONE = "done"  # the final verdict is given (or the stack decided)


# -- events in ------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class NewFlow:
    """The stack's new_flow; ``names`` are the DNS names of ``dst`` now, ``now`` the clock."""

    id: int
    proto: str
    src: tuple
    dst: tuple
    names: tuple[str, ...] = ()
    now: float = 0.0
    decided: bool = False  # the stack decided alone (overload, inbound publish)
    inbound: bool = False
    reason: str = "none"


@attrs.frozen(kw_only=True)
class FlowData:
    """Bytes the stack read from a held (peek) or observed flow, in order.

    ``last``: the stack reads no more (16 KiB, its time bound, or ``eof``: the client
    closed its side).
    """

    id: int
    data: bytes = b""
    last: bool = False
    eof: bool = False


@attrs.frozen(kw_only=True)
class CallbackDone:
    """A user callback (``on_connect`` / ``on_claim``) for flow ``id`` finished:
    ``result`` is what it returned, or ``error`` the text of what it raised, or it
    ``timed_out`` (``error`` then says after how long)."""

    id: int
    callback: str
    result: object = None
    error: str | None = None
    timed_out: bool = False


@attrs.frozen(kw_only=True)
class FlowClosed:
    id: int
    reason: str
    bytes_out: int = 0
    bytes_in: int = 0
    duration: float = 0.0


# -- actions out ----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Answer:
    """A verdict for the stack: ``allow``/``deny`` (final), ``peek`` (hold and read the
    first message), ``observe`` (allow, report the first bytes), ``more`` (the answer
    to a FlowData: read on)."""

    id: int
    action: str
    dial: tuple | None = None


@attrs.frozen(kw_only=True)
class Emit:
    event: object


@attrs.frozen(kw_only=True)
class Ask:
    """Run ``callback`` on ``req`` and feed back a CallbackDone."""

    id: int
    callback: str
    req: pol.ConnectRequest


@attrs.define(eq=False)
class _Flow:
    req: pol.ConnectRequest
    state: str = _DONE
    first: pol.Decision | None = None  # the rules' decision at connect time
    so_far: pol.Decision | None = None  # its decision so far (rule, audit, on_connect)
    sniffer: FlowSniffer | None = None
    read: int = 0  # bytes of its first message read so far (held flows)
    http_method: str | None = None
    http_path: str | None = None
    reported: bool = False  # its ConnectEvent was emitted


@attrs.define
class FlowMachine:
    """Decisions for every flow of one sandbox.  ``on_connect`` / ``on_claim``: whether
    those callbacks exist (the driver runs them on :class:`Ask`)."""

    policy: pol.Policy
    on_connect: bool = False
    on_claim: bool = False
    max_conns: int | None = None
    max_rate: float | None = None
    peek_timeout: float = 1.0  # the stack's read-ahead bound, for the deny's reason
    _flows: dict = attrs.field(factory=dict)
    _tokens: float = float("inf")  # --max-rate bucket (starts full)
    _tokens_at: float = 0.0

    def __repr__(self):
        return "<FlowMachine open=%d>" % len(self._flows)

    def __len__(self):
        return len(self._flows)

    def handle(self, event) -> list:
        """The actions that ``event`` calls for, in order."""
        if isinstance(event, NewFlow):
            return self._new_flow(event)
        if isinstance(event, FlowData):
            return self._data(event)
        if isinstance(event, CallbackDone):
            return self._callback(event)
        if isinstance(event, FlowClosed):
            return self._closed(event)
        raise TypeError("FlowMachine cannot handle %r" % (event,))

    def shutdown(self) -> list:
        """The sandbox ended: report and close every flow still open."""
        out = []
        for flow in list(self._flows.values()):
            out += self._closed(FlowClosed(id=flow.req.id, reason="shutdown"))
        return out

    # -- new flows ------------------------------------------------------------------

    def _new_flow(self, ev: NewFlow) -> list:
        (src_ip, src_port), (dst_ip, dst_port) = ev.src, ev.dst
        req = pol.ConnectRequest(id=ev.id, proto=ev.proto, src_ip=src_ip, src_port=src_port, dst_ip=dst_ip,
                                 dst_port=dst_port, names=ev.names)
        flow = self._flows[ev.id] = _Flow(req=req)
        if ev.decided:  # the stack decided alone: report only
            verdict = pol.ALLOW if ev.inbound else pol.deny(ev.reason)
            rule = "publish" if ev.inbound else "stack:" + ev.reason
            return [self._report(flow, pol.Decision(verdict=verdict, rule=rule))]
        limited = self._over_limit(ev.now)
        if limited is not None:
            return self._final(flow, limited)
        decision = flow.first = pol.decide_connect(self.policy, req)
        if decision.by_default and self.on_connect:
            # The callback decides at connect time (with the DNS names), so its
            # deny is an immediate RST / ECONNREFUSED like a rule's.
            flow.state = _DECIDING
            return [Ask(id=ev.id, callback="on_connect", req=req)]
        return self._so_far(flow, decision)

    def _over_limit(self, now):
        """--max-conns / --max-rate: a Decision denying the new flow, or None."""
        if self.max_conns is not None and len(self._flows) > self.max_conns:
            return pol.Decision(verdict=pol.deny("more than %d flows open (--max-conns)" % self.max_conns),
                                rule="limit:max-conns")
        if self.max_rate is not None:
            burst = max(1.0, self.max_rate)
            self._tokens = min(burst, self._tokens + (now - self._tokens_at) * self.max_rate)
            self._tokens_at = now
            if self._tokens < 1.0:
                return pol.Decision(verdict=pol.deny("more than %g new flows per second (--max-rate)"
                                                     % self.max_rate), rule="limit:max-rate")
            self._tokens -= 1.0
        return None

    def _so_far(self, flow, decision) -> list:
        """Rules (or on_connect) decided ``decision``: final, or hold / observe a TCP flow.
        A flow no rule decided is held for on_claim even when the default denies it."""
        req = flow.req
        for_claim = self.on_claim and flow.first.by_default
        readable = req.proto == "tcp" and req.dst_port not in SERVER_FIRST_PORTS
        if not readable or not (decision.allowed or (for_claim and decision.by_default)):
            return self._final(flow, decision)
        flow.so_far = decision
        if for_claim or pol.claims_can_deny(self.policy, req):
            flow.state = _HOLDING
            flow.sniffer = FlowSniffer()
            return [Answer(id=req.id, action="peek", dial=decision.dial)]
        flow.state = _OBSERVING
        return [Answer(id=req.id, action="observe", dial=decision.dial)]

    # -- first bytes ----------------------------------------------------------------

    def _data(self, ev: FlowData) -> list:
        flow = self._flows.get(ev.id)
        if flow is None or flow.reported:
            return []
        if flow.state == _OBSERVING:
            return self._observed(flow, ev.data)
        if flow.state != _HOLDING:
            return []
        flow.read += len(ev.data)
        result = flow.sniffer.feed(ev.data)
        if result.state == NEED_MORE:
            if not ev.last:
                return [Answer(id=ev.id, action="more")]
            if not (ev.eof and flow.read == 0):
                return self._final(flow, self._incomplete(flow, ev))
            # closed without sending a byte: it claims nothing
        elif result.state == MALFORMED or result.protocol == "h2":
            if flow.read >= DEFAULT_BUDGET and result.state == MALFORMED:
                return self._final(flow, self._incomplete(flow, ev))
            return self._final(flow, pol.Decision(
                verdict=pol.deny("%s: its first message names no readable host (%s), and a name rule "
                                 "could change the verdict" % (_what(flow.req), result.reason)),
                rule=CLAIM_UNREADABLE))
        self._name(flow, result)
        decision = pol.decide_connect(self.policy, flow.req)
        if decision.by_default:
            if self.on_claim and flow.first.by_default:
                flow.state = _CLAIM
                return [Ask(id=ev.id, callback="on_claim", req=flow.req)]
            decision = flow.so_far  # no rule on the names: the allow so far stands
        return self._final(flow, decision)

    def _incomplete(self, flow, ev) -> pol.Decision:
        seen = flow.read
        if seen >= DEFAULT_BUDGET:
            why = "its first message does not fit in %d KiB" % (DEFAULT_BUDGET // 1024)
        elif ev.eof:
            why = "the client closed after %d bytes, before its first message was complete" % seen
        else:
            why = "no complete first message within %g s of its first byte (%d bytes came)" % (
                self.peek_timeout, seen)
        return pol.Decision(
            verdict=pol.deny("%s: %s, and a name rule could change the verdict" % (_what(flow.req), why)),
            rule=CLAIM_INCOMPLETE)

    @staticmethod
    def _name(flow, result):
        if result.state == FOUND:
            claimed = {"sni": result.name} if result.protocol == "tls" else {"http_host": result.name}
            flow.req = attrs.evolve(flow.req, **claimed)
            flow.http_method, flow.http_path = result.http_method, result.http_path

    def _observed(self, flow, data) -> list:
        """An observed flow's first bytes: they name its ConnectEvent and may credit
        another allow rule; its allow stands."""
        self._name(flow, FlowSniffer().feed(data))
        flow.state = _DONE
        decision = pol.decide_connect(self.policy, flow.req)
        if decision.by_default:
            decision = flow.so_far
        if not decision.allowed:  # claims_can_deny is wrong: say so, report what happened
            log.error("flow %s was let through unheld, but its first bytes make it %s "
                      "(policy.claims_can_deny missed this case)", flow.req, decision.verdict.reason)
            decision = flow.so_far
        return [self._report(flow, decision)]

    # -- callbacks ------------------------------------------------------------------

    def _callback(self, ev: CallbackDone) -> list:
        out = []
        if ev.timed_out or ev.error is not None:
            error = ev.error or "timed out"
            decision = pol.from_callback_error("%s failed: %s" % (ev.callback, error))
        else:
            decision = pol.from_callback(ev.result)
            error = decision.verdict.reason if decision.rule != "callback" else None
        if error is not None:
            out.append(Emit(event=PolicyErrorEvent(callback=ev.callback, subject=str(ev.id), error=error,
                                                   timed_out=ev.timed_out)))
        flow = self._flows.get(ev.id)
        if flow is None or flow.reported:
            return out
        if ev.callback == "on_connect" and flow.state == _DECIDING:
            return out + self._so_far(flow, decision)
        if ev.callback == "on_claim" and flow.state == _CLAIM:
            return out + self._final(flow, decision)
        return out

    # -- the end --------------------------------------------------------------------

    def _report(self, flow, decision) -> Emit:
        flow.reported = True
        flow.state = _DONE
        return Emit(event=ConnectEvent.from_decision(flow.req, decision, http_method=flow.http_method,
                                                     http_path=flow.http_path))

    def _final(self, flow, decision) -> list:
        """The final decision: report it and answer the stack."""
        if flow.reported:
            return []
        dial = decision.dial if decision.allowed else None
        return [self._report(flow, decision),
                Answer(id=flow.req.id, action="allow" if decision.allowed else "deny", dial=dial)]

    def _closed(self, ev: FlowClosed) -> list:
        flow = self._flows.pop(ev.id, None)
        out = []
        if flow is not None and not flow.reported:
            # Ended before the final verdict: the stack denied it (policy timeout,
            # overload, shutdown), or a held flow ended on its own (refused
            # upstream, client reset) under the allow it had so far.
            first = flow.so_far or flow.first
            if ev.reason in _STACK_DENIALS or first is None or not first.allowed:
                first = pol.Decision(verdict=pol.deny(ev.reason), rule="stack:" + ev.reason)
            out.append(self._report(flow, first))
        out.append(Emit(event=CloseEvent(id=ev.id, bytes_out=ev.bytes_out, bytes_in=ev.bytes_in,
                                          duration=ev.duration, reason=ev.reason)))
        return out


def _what(req) -> str:
    dst = "[%s]" % req.dst_ip if req.dst_ip.version == 6 else str(req.dst_ip)
    return "%s:%d" % (dst, req.dst_port)
