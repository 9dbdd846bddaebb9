"""Trio driver of the Go netstack (DESIGN §4–5).

One :class:`Netstack` owns one stack handle.  Go signals "events or frames
ready" on an eventfd; whoever waits first (``wait_events`` or the pump) waits
on it with ``trio.lowlevel.wait_readable`` and wakes the other waiters, so
several tasks can share the fd.  Events come back as :class:`NetEvent`;
verdicts go back in batches with :meth:`Netstack.set_verdicts`.

The stack never waits for Python longer than the policy timeout: a flow
whose verdict is late is denied and its ``flow_closed`` says
``policy-timeout``.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os

import attrs
import trio

from corral.bindings import netstack as _b

log = logging.getLogger("corral.net")

Address = tuple  # (ipaddress.IPv4Address | IPv6Address, port)


@attrs.frozen(kw_only=True)
class NetEvent:
    """One event from the stack.

    kind: ``"new_flow"`` (answer with a :class:`FlowVerdict` unless
    ``decided``), ``"flow_data"`` (a TCP flow answered with ``peek`` or
    ``observe``: the client's first bytes are in ``payload``, possibly empty;
    after ``peek`` answer ``peek`` to read on or with the final allow or deny,
    after ``observe`` it needs no answer; ``last``: no more bytes will be
    read, reason ``eof`` when the client closed), ``"flow_closed"`` (exactly one per ``new_flow``,
    same id) or ``"dns_query"`` (answer with :meth:`Netstack.dns_reply`).
    proto: ``"tcp"``, ``"udp"`` or ``"icmp"`` (for DNS: the transport).
    src/dst: ``(ip_address, port)``; for ICMP src port is the echo id.
    reason: for ``flow_closed`` one of ``eof reset denied refused unreachable
    policy-timeout idle overload shutdown error dial-timeout``; for a decided
    ``new_flow`` why it needs no verdict; else ``"none"``.
    """

    kind: str
    id: int
    proto: str
    src: Address
    dst: Address
    reason: str = "none"
    decided: bool = False
    inbound: bool = False
    last: bool = False  # flow_data after peek: the last one (bounds ran out, or eof)
    bytes_out: int = 0  # sandbox -> world
    bytes_in: int = 0  # world -> sandbox
    duration: float = 0.0  # seconds, flow_closed only
    payload: bytes = b""  # dns_query, flow_data

    def __repr__(self):
        extra = ""
        if self.kind == "flow_closed":
            extra = " %s out=%d in=%d" % (self.reason, self.bytes_out, self.bytes_in)
        elif self.kind in ("dns_query", "flow_data"):
            extra = " %d bytes" % len(self.payload)
        return "<NetEvent %s #%d %s %s:%d -> %s:%d%s>" % (
            self.kind, self.id, self.proto, self.src[0], self.src[1], self.dst[0], self.dst[1], extra)


@attrs.frozen(kw_only=True)
class FlowVerdict:
    """Answer to a ``new_flow`` or ``flow_data``.  ``dial`` overrides where an
    allowed flow is dialed: ``(ip, port)`` with either part None to keep the
    original (used to map 10.0.2.2:PORT to 127.0.0.1:PORT).

    ``peek`` (with ``allow``, TCP only) defers the decision to the client's
    first bytes: the stack dials (so a refused upstream still fails the
    client's connect()), completes the client's handshake and sends each read
    as a ``flow_data`` event (the bytes since the previous one); the answer
    to one is ``peek`` (read on) or the final verdict (bounded by the policy
    timeout).  At most 16 KiB and ``peek_timeout`` in all: the ``flow_data``
    after which no more comes has ``last`` set.
    UDP and ICMP flows take ``peek`` as a plain allow.

    ``observe`` (with ``allow``, TCP only) allows at once and still sends one
    ``flow_data`` with the client's first bytes (empty after ``peek_timeout``),
    which needs no verdict: names for the events at no cost in latency, for
    flows whose names cannot change the decision."""

    id: int
    allow: bool
    dial: tuple | None = None
    peek: bool = False
    observe: bool = False

    @property
    def action(self):
        if not self.allow:
            return "deny"
        if self.peek:
            return "peek"
        return "observe" if self.observe else "allow"


@functools.lru_cache(maxsize=4096)  # a sandbox talks to few addresses, each many times
def _address(packed):
    return ipaddress.ip_address(packed)


def _event(raw):
    (fid, kind, proto, flags, reason, _family, src_ip, src_port, dst_ip, dst_port,
     bytes_out, bytes_in, duration_ns, payload) = raw
    return NetEvent(
        kind=_b.KINDS.get(kind, str(kind)),
        id=fid,
        proto=_b.PROTOS.get(proto, str(proto)),
        src=(_address(src_ip), src_port),
        dst=(_address(dst_ip), dst_port),
        reason=_b.REASONS.get(reason, str(reason)),
        decided=bool(flags & _b.FLAG_DECIDED),
        inbound=bool(flags & _b.FLAG_INBOUND),
        last=bool(flags & _b.FLAG_LAST),
        bytes_out=bytes_out,
        bytes_in=bytes_in,
        duration=duration_ns / 1e9,
        payload=payload,
    )


@attrs.define
class Netstack:
    """A running stack; create with :meth:`open`, end with :meth:`close`."""

    handle: int
    mode: str
    _efd: int
    _events: _b.EventReader = attrs.field(factory=_b.EventReader)
    _frames: _b.FrameReader | None = None
    _gen: int = 0  # eventfd wake-ups seen; see _wait_ready
    _waiter: trio.Event | None = None
    _closed: bool = False

    def __repr__(self):
        state = "closed" if self._closed else "open"
        return "<Netstack handle=%d mode=%s %s>" % (self.handle, self.mode, state)

    @classmethod
    def open(cls, tap_fd=-1, *, mode="direct", policy_timeout=2.0, max_pending=256,
             udp_idle_timeout=60.0, dial_timeout=10.0, peek_timeout=0.3, mtu=65520, pcap_fd=None):
        """Start a stack on ``tap_fd`` (direct: Go dups and drives the fd;
        pump: the fd stays yours, move frames with :mod:`corral.net.pump`).
        ``pcap_fd``: write every frame of the link, both directions, to this
        file (pcap, ethernet); Go dups it, the caller closes its own."""
        for name, value in (("policy_timeout", policy_timeout), ("udp_idle_timeout", udp_idle_timeout),
                            ("dial_timeout", dial_timeout), ("peek_timeout", peek_timeout)):
            if not value > 0:
                raise ValueError("%s must be > 0 seconds, got %r" % (name, value))
        h = _b.stack_new(
            mode=mode, tap_fd=tap_fd, mtu=mtu,
            policy_timeout_ms=max(1, round(policy_timeout * 1000)),
            max_pending=max_pending,
            udp_idle_timeout_ms=max(1, round(udp_idle_timeout * 1000)),
            dial_timeout_ms=max(1, round(dial_timeout * 1000)),
            peek_timeout_ms=max(1, round(peek_timeout * 1000)),
            pcap_fd=pcap_fd,
        )
        ns = cls(handle=h, mode=mode, efd=_b.stack_eventfd(h),
                 frames=_b.FrameReader() if mode == "pump" else None)
        log.debug("netstack %d open (%s)", h, mode)
        return ns

    # ---------------------------------------------------------------- waiting

    def _drain_efd(self):
        try:
            os.read(self._efd, 8)
        except BlockingIOError:
            pass

    async def wait_ready(self, seen_gen):
        """Wait until the eventfd fired after generation ``seen_gen``.

        Callers read ``ready_gen`` *before* draining their queue and pass it
        here when the queue was empty, so a wake-up consumed by another task
        in between is never lost.
        """
        while self._gen == seen_gen:
            if self._closed:
                raise trio.ClosedResourceError("netstack is closed")
            if self._waiter is not None:
                await self._waiter.wait()
                continue
            ev = self._waiter = trio.Event()
            try:
                await trio.lowlevel.wait_readable(self._efd)
                self._drain_efd()
                self._gen += 1
            finally:
                self._waiter = None
                ev.set()

    @property
    def ready_gen(self):
        return self._gen

    async def wait_events(self):
        """Return the next non-empty batch of :class:`NetEvent`."""
        while True:
            gen = self._gen
            raw = self.poll_events()
            if raw:
                return raw
            await self.wait_ready(gen)

    def poll_events(self):
        """Events queued right now (possibly none), without waiting."""
        self._check_open()
        return [_event(r) for r in self._events.read(self.handle)]

    # --------------------------------------------------------------- answers

    def set_verdicts(self, verdicts):
        """Apply FlowVerdicts in one call; returns how many were still pending."""
        self._check_open()
        batch = []
        for v in verdicts:
            dial_ip = dial_port = None
            if v.dial is not None:
                ip, dial_port = v.dial
                if ip is not None:
                    dial_ip = ipaddress.ip_address(ip).packed
            batch.append((v.id, v.action, dial_ip, dial_port))
        return _b.set_verdicts(self.handle, batch)

    def dns_reply(self, query_id, data):
        """Answer a dns_query (``b""`` drops it).  False if it already expired."""
        self._check_open()
        return _b.dns_reply(self.handle, query_id, bytes(data))

    def publish(self, proto, host_ip, host_port, sandbox_port):
        """Forward ``host_ip:host_port`` (port 0 picks one) into the sandbox's
        ``sandbox_port``; returns the bound host port."""
        self._check_open()
        ipaddress.ip_address(host_ip)  # ValueError for a name: literal IPs only
        return _b.publish(self.handle, proto, host_ip, host_port, sandbox_port)

    def stats(self):
        """Counters: flows_total, flows_open, pending, dns_queries, frames_in,
        frames_out, drops, events_queued, goroutines, pcap_frames, pcap_errors,
        log_lines, refused (new work a bound refused: an episode becomes a limit event)."""
        self._check_open()
        return _b.stats(self.handle)

    def last_error(self):
        """The library's text for the last failure on this stack."""
        self._check_open()
        return _b.last_error(self.handle)

    # ------------------------------------------------------------ pump frames

    def inject(self, frames):
        """Pump mode: push ethernet frames from the sandbox into the stack."""
        self._check_open()
        return _b.inject(self.handle, frames)

    def inject_packed(self, data, lens, n):
        """Pump mode: push ``n`` frames packed in the buffer ``data``, sizes
        in ``lens`` (from ``corral.bindings.netstack.new_lens``): no copy."""
        self._check_open()
        return _b.inject_packed(self.handle, data, lens, n)

    def read_frames(self):
        """Pump mode: outbound frames queued right now (at most a batch)."""
        return self._frame_reader().read(self.handle)

    def read_frame_views(self):
        """Like :meth:`read_frames`, as memoryviews valid until the next call."""
        return self._frame_reader().read_views(self.handle)

    def _frame_reader(self):
        self._check_open()
        if self._frames is None:
            raise ValueError("reading frames needs mode='pump'")
        return self._frames

    # --------------------------------------------------------------- closing

    def _check_open(self):
        if self._closed:
            raise trio.ClosedResourceError("netstack %d is closed" % self.handle)

    def shutdown(self):
        """End every flow now: each queues its ``flow_closed`` (reason
        ``shutdown``, with its byte counts), still readable with
        :meth:`poll_events` until :meth:`close`.  Blocks briefly while the
        flows' goroutines finish; idempotent."""
        self._check_open()
        _b.stack_shutdown(self.handle)

    def close(self):
        """Stop every flow and free the stack (idempotent; blocks briefly
        while Go goroutines finish)."""
        if self._closed:
            return
        self._closed = True
        if self._waiter is not None:
            # Wake tasks parked on the eventfd before Go closes it.
            try:
                trio.lowlevel.notify_closing(self._efd)
            except RuntimeError:  # not called from trio: nobody is parked
                pass
        _b.stack_close(self.handle)
        log.debug("netstack %d closed", self.handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
