"""corral's resolver at 10.0.2.3 / fd00::3: policy, then forward to the host's resolver.

``DnsService.handle`` takes one query from the sandbox (UDP datagram or TCP message
without its length prefix) and returns the bytes to send back. The I/O is ``forward``:
one query to one upstream over UDP (retried over TCP when the answer is truncated) or
TCP. Everything else is the sans-io ``dnsmsg`` and ``policy``.

Upstreams come from the host's ``/etc/resolv.conf`` (``nameserver`` lines) unless
``--dns-upstream IP[:PORT]`` is given. A loopback nameserver (systemd-resolved's
127.0.0.53, dnsmasq's 127.0.0.1) is used as is: forwarding happens in the supervisor,
in the host's network namespace, where the stub is reachable; it is reported in the log
because the stub's own upstream is then what answers.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import time
from typing import Awaitable, Callable

import attrs
import trio

from corral.errors import ConfigError
from corral.events import DnsEvent, Event, LimitEvent, PolicyErrorEvent
from corral.policy import (
    ALLOW,
    Decision,
    DnsQuery,
    NameTable,
    Policy,
    Verdict,
    decide_dns,
    from_callback,
    from_callback_error,
)

# dnsmsg (dnspython, ~50 ms to import) is imported where it is used: loaded by
# service.preload() while the sandbox starts, not before it is spawned.

__all__ = ["DnsService", "forward", "host_upstreams", "parse_dns_upstream", "parse_resolv_conf"]

log = logging.getLogger("corral.dns")

Upstream = tuple[str, int]
# The rule of a query resolved only so that a connection callback decides its flows.
RESOLVE_FOR_CALLBACK = "resolve-for-callback"
_MAX_STRAY = 64  # datagrams with the wrong id tolerated per query before giving up

# Defaults of --max-dns-rate / --max-dns-pending (docs/cli.md).  A package manager or a
# build asks a few dozen names a second at its busiest; a flood asks tens of thousands.
DEFAULT_MAX_RATE = 200.0  # queries per second, burst one second's worth
DEFAULT_MAX_PENDING = 64  # queries being decided or forwarded at once
EPISODE_QUIET = 1.0  # seconds without a refusal that end a limit episode


def _fmt(upstream: Upstream) -> str:
    ip, port = upstream
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_dns_upstream(text: str) -> Upstream:
    """``--dns-upstream``: ``IP``, ``IP:PORT``, ``IPv6`` or ``[IPv6]:PORT`` (port 53 by default)."""
    s = text.strip()
    port = 53
    try:
        if s.startswith("["):
            host, bracket, rest = s[1:].partition("]")
            if not bracket:
                raise ValueError
            if rest:
                if not rest.startswith(":"):
                    raise ValueError
                port = int(rest[1:])
        elif s.count(":") == 1:
            host, port_text = s.split(":")
            port = int(port_text)
        else:
            host = s
        ip = ipaddress.ip_address(host)
        if not 1 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"invalid --dns-upstream {text!r}: expected an IP address with an optional port, "
            "e.g. 192.0.2.53, 192.0.2.53:5353, 2001:db8::53 or [2001:db8::53]:5353"
        ) from None
    return str(ip), port


def parse_resolv_conf(text: str) -> list[Upstream]:
    """The ``nameserver`` addresses of a resolv.conf, in order, port 53. Bad lines are skipped."""
    out = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                log.warning("resolv.conf: ignoring nameserver %r (not an IP address)", fields[1])
                continue
            addr = fields[1] if "%" in fields[1] else str(ip)
            if (addr, 53) not in out:
                out.append((addr, 53))
    return out


def host_upstreams(dns_upstream: str | list[str] | None = None, resolv_conf: str = "/etc/resolv.conf") -> list[Upstream]:
    """The resolvers to forward to: ``--dns-upstream`` if given, else the host's resolv.conf."""
    if dns_upstream:
        items = [dns_upstream] if isinstance(dns_upstream, str) else list(dns_upstream)
        return [parse_dns_upstream(u) for u in items]
    try:
        with open(resolv_conf, encoding="utf-8", errors="replace") as f:
            upstreams = parse_resolv_conf(f.read())
    except OSError as e:
        raise ConfigError(
            f"cannot read {resolv_conf} to find the host's DNS resolver: {e.strerror}. "
            "Fix: pass --dns-upstream IP[:PORT]"
        ) from None
    if not upstreams:
        raise ConfigError(f"no nameserver in {resolv_conf}. Fix: pass --dns-upstream IP[:PORT]")
    for ip, _ in upstreams:
        if ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback:
            log.info("host DNS resolver %s is a local stub; corral forwards to it from the host namespace", ip)
    return upstreams


def _family(ip: str) -> int:
    return trio.socket.AF_INET6 if ":" in ip else trio.socket.AF_INET


async def _udp(query: bytes, upstream: Upstream) -> bytes:
    with trio.socket.socket(_family(upstream[0]), trio.socket.SOCK_DGRAM) as sock:
        await sock.connect(upstream)  # connected: datagrams from anyone else are dropped by the kernel
        await sock.send(query)
        for _ in range(_MAX_STRAY):
            data = await sock.recv(65535)
            if len(data) >= 12 and data[:2] == query[:2] and data[2] & 0x80:
                return data
        raise OSError(f"DNS upstream {_fmt(upstream)} sent {_MAX_STRAY} unrelated datagrams")


async def _tcp(query: bytes, upstream: Upstream) -> bytes:
    stream = await trio.open_tcp_stream(*upstream)
    async with stream:
        await stream.send_all(struct.pack("!H", len(query)) + query)
        buf = bytearray()
        need = 2
        while len(buf) < need:
            chunk = await stream.receive_some(65537)
            if not chunk:
                raise OSError(f"DNS upstream {_fmt(upstream)} closed the TCP connection mid-answer")
            buf += chunk
            if need == 2 and len(buf) >= 2:
                need = 2 + struct.unpack_from("!H", buf)[0]
        return bytes(buf[2:need])


async def forward(
    query: bytes, upstream: Upstream, timeout: float, *, tcp: bool = False, max_udp: int = 65535
) -> bytes:
    """Send *query* to *upstream*, return its answer exactly as received.

    Over UDP unless *tcp*; a truncated UDP answer is retried over TCP and the full
    answer returned if it fits in *max_udp* (the client's advertised UDP size), else
    the truncated one is returned so the client retries over TCP itself.
    Raises TimeoutError after *timeout* seconds per attempt, OSError on network errors.
    """
    from . import dnsmsg
    with trio.move_on_after(timeout) as scope:
        answer = await (_tcp if tcp else _udp)(query, upstream)
    if scope.cancelled_caught:
        raise TimeoutError(f"DNS upstream {_fmt(upstream)} did not answer within {timeout:g} s")
    if tcp or not dnsmsg.is_truncated(answer):
        return answer
    try:
        full = await forward(query, upstream, timeout, tcp=True)
    except OSError as e:  # TimeoutError is an OSError
        log.debug("TCP retry to %s failed (%s); returning the truncated answer", _fmt(upstream), e)
        return answer
    return full if len(full) <= max_udp else answer


OnDns = Callable[[DnsQuery], Awaitable[Verdict]]


@attrs.define
class _Episode:
    """A run of refusals by one limit: reported once, when it ends."""

    limit: str
    action: str
    detail: str
    since: float  # wall clock
    last: float  # service clock of the latest refusal
    count: int = 0


@attrs.define
class DnsService:
    """Policy + forwarding for the sandbox's DNS queries. Owns no sockets.

    ``emit`` receives one DnsEvent per query (plus a PolicyErrorEvent when ``on_dns``
    fails). ``on_dns`` is consulted only when no rule decided (``Decision.by_default``).
    Without ``on_dns``, ``resolve_for_callbacks`` (an ``on_connect`` / ``on_claim`` callback
    decides connections) resolves the names no rule decided, so that the callback sees
    the connection with its name (rule ``resolve-for-callback``).
    ``policy`` may be replaced at any time. ``clock`` feeds the name table and the limits.

    Limits (None: none): beyond ``max_rate`` queries per second (a token bucket, burst
    one second's worth) a query is answered REFUSED; with ``max_pending`` queries already
    being decided or forwarded, SERVFAIL. Either at once, without policy, upstream or a
    DnsEvent of its own: a flood must not become a flood of events. Each episode (refusals
    until ``EPISODE_QUIET`` seconds pass without one, or :meth:`close`) is one LimitEvent
    with the count.
    """

    policy: Policy
    names: NameTable
    upstreams: list[Upstream]
    emit: Callable[[Event], None]
    on_dns: OnDns | None = None
    resolve_for_callbacks: bool = False
    policy_timeout: float = 2.0
    upstream_timeout: float = 2.0
    deny_rcode: str = attrs.field(default="REFUSED", validator=attrs.validators.in_(("REFUSED", "NXDOMAIN")))
    clock: Callable[[], float] = trio.current_time
    max_rate: float | None = DEFAULT_MAX_RATE
    max_pending: int | None = DEFAULT_MAX_PENDING
    _tokens: float | None = None  # the max_rate bucket (starts full)
    _tokens_at: float = 0.0
    _pending: int = 0
    _episodes: dict = attrs.field(factory=dict)  # limit -> _Episode

    def __repr__(self) -> str:
        return f"<DnsService upstreams={[_fmt(u) for u in self.upstreams]} {self.policy.mode}>"

    async def handle(self, wire: bytes, *, transport: str = "udp", src_ip=None, src_port=None,
                     owner=None) -> bytes | None:
        """Answer one query from the sandbox. None: send nothing (not even a header to reply to).
        ``owner``: () -> (Process | None, reason | None), the process that asked."""
        from . import dnsmsg
        try:
            q = dnsmsg.parse_query(wire)
        except dnsmsg.MalformedDnsMessage as e:
            log.debug("malformed DNS query from %s: %s", src_ip, e)
            return dnsmsg.formerr_for(wire)
        if q.opcode != "QUERY":
            return dnsmsg.build_response(q, "NOTIMP")
        refusal = self._over_limit()
        if refusal is not None:
            return dnsmsg.build_response(q, refusal)
        self._pending += 1
        try:
            return await self._answer(q, wire, transport, src_ip, src_port, owner)
        finally:
            self._pending -= 1

    def _over_limit(self) -> str | None:
        """The rcode for a query beyond a limit (counted in its episode), else None."""
        now = self.clock()
        for episode in [e for e in self._episodes.values() if now - e.last >= EPISODE_QUIET]:
            self._report(episode)
        if self.max_rate is not None:
            burst = max(1.0, self.max_rate)
            if self._tokens is None:
                self._tokens = burst
            self._tokens = min(burst, self._tokens + (now - self._tokens_at) * self.max_rate)
            self._tokens_at = now
            if self._tokens < 1.0:
                return self._refuse("max-dns-rate", "REFUSED",
                                    f"more than {self.max_rate:g} DNS queries per second", now)
        if self.max_pending is not None and self._pending >= self.max_pending:
            return self._refuse("max-dns-pending", "SERVFAIL",
                                f"more than {self.max_pending} DNS queries pending at once", now)
        if self.max_rate is not None:
            self._tokens -= 1.0
        return None

    def _refuse(self, limit: str, action: str, detail: str, now: float) -> str:
        episode = self._episodes.get(limit)
        if episode is None:
            episode = self._episodes[limit] = _Episode(limit=limit, action=action, detail=detail,
                                                       since=time.time(), last=now)
            log.warning("%s: answering %s (--%s) until the sandbox slows down", detail, action, limit)
        episode.count += 1
        episode.last = now
        return action

    def _report(self, episode: _Episode) -> None:
        del self._episodes[episode.limit]
        self.emit(LimitEvent(limit=episode.limit, action=episode.action, detail=episode.detail,
                             count=episode.count, since=episode.since))

    def close(self) -> None:
        """Report the limit episodes still open (the sandbox ended during one)."""
        for episode in list(self._episodes.values()):
            self._report(episode)

    async def _answer(self, q, wire, transport, src_ip, src_port, owner=None) -> bytes:
        from . import dnsmsg
        process, unknown = owner() if owner is not None else (None, None)
        query = DnsQuery(id=q.id, qname=q.qname, qtype=q.qtype, transport=transport, src_ip=src_ip,
                         src_port=src_port, process=process, process_unknown=unknown)
        decision = decide_dns(self.policy, query)
        if decision.by_default and self.on_dns is not None:
            decision = await self._ask(query)
        elif decision.by_default and self.resolve_for_callbacks and not decision.allowed:
            decision = Decision(verdict=ALLOW, rule=RESOLVE_FOR_CALLBACK)
        if not decision.allowed:
            self.emit(DnsEvent.from_decision(query, decision, rcode=self.deny_rcode))
            return dnsmsg.build_response(q, self.deny_rcode)
        for upstream in self.upstreams:
            try:
                answer = await forward(
                    wire, upstream, self.upstream_timeout, tcp=transport == "tcp", max_udp=q.udp_payload
                )
            except OSError as e:
                log.warning("DNS upstream %s failed for %s %s: %s", _fmt(upstream), q.qname, q.qtype, e)
                continue
            try:
                resp = dnsmsg.parse_response(answer, q)
            except dnsmsg.MalformedDnsMessage as e:
                log.warning("DNS upstream %s sent an unusable answer for %s: %s", _fmt(upstream), q.qname, e)
                continue
            self.names.learn(q.qname, resp.answers, self.clock())
            self.emit(DnsEvent.from_decision(query, decision, rcode=resp.rcode, answers=resp.answers,
                                             upstream=_fmt(upstream)))
            return answer
        self.emit(DnsEvent.from_decision(query, decision, rcode="SERVFAIL"))
        return dnsmsg.servfail(q)

    async def _ask(self, query: DnsQuery):
        error = None
        timed_out = False
        with trio.move_on_after(self.policy_timeout) as scope:
            try:
                verdict = await self.on_dns(query)
            except Exception as e:  # a user callback: any failure is a deny and an event
                error = repr(e)
        if scope.cancelled_caught:
            timed_out = True
            error = f"on_dns did not return within {self.policy_timeout:g} s"
        if error is None:
            decision = from_callback(verdict)
            if decision.allowed or decision.rule == "callback":
                return decision
            error = decision.verdict.reason
        self.emit(PolicyErrorEvent(callback="on_dns", subject=query.qname, error=error, timed_out=timed_out))
        return from_callback_error(f"on_dns failed: {error}")
