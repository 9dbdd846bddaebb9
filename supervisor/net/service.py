"""The sandbox's network, wired: netstack + policy + DNS + events (DESIGN §4–7).

:func:`start` takes the TAP fd pid 1 sent over, opens the Go netstack on it
(direct or pump data path), and runs one task that turns every stack event
into a decision and an event record:

    new_flow   -> ConnectRequest (names from the DNS table) -> decide_connect
                  -> on_connect callback when no rule decided -> verdict batch
    flow_data  -> (TCP flows answered "peek") the client's first bytes ->
                  FlowSniffer: TLS SNI / HTTP Host -> decide_connect again
                  -> on_connect when no rule decided -> final verdict
    flow_closed -> CloseEvent
    dns_query  -> DnsService (policy, on_dns, forward upstream, learn names)

Names claimed in the first bytes (docs/policy.md, "TLS SNI and HTTP Host"): a TCP
flow that the static rules would allow, or that goes to on_connect or to the audit
default, is read ahead.  When a claimed name could still deny it
(``policy.claims_can_deny``: a deny rule on a name, or an allow by a domain rule)
it is answered ``peek``: the stack dials the destination (a refused upstream
still refuses the client at once), completes the client's handshake and reads its
first bytes, at most 16 KiB and 300 ms (``PEEK_TIMEOUT``).  Those bytes are sniffed,
the flow decided again with ``sni``/``http_host``, and only then does anything
reach the destination.  Otherwise it is answered ``observe``: allowed at once, and
the stack still reports the first bytes, so the ConnectEvent (emitted then) carries
the names without the flow ever waiting for them.  A flow the rules deny is reset
at once, never peeked.  Ports where the server speaks first (``SERVER_FIRST_PORTS``:
the client sends nothing until it reads a greeting) are decided without a peek, so
they never wait.

Callbacks run in their own tasks, so one slow callback never holds up other
flows; the stack denies any flow whose verdict is later than the policy
timeout, and so does the callback wrapper here (a timeout is a deny and a
PolicyErrorEvent).  Every flow gets exactly one ConnectEvent and one
CloseEvent, even when the sandbox ends first (reason ``shutdown``).
"""

import ipaddress
import logging
import os
import runpy
from typing import TYPE_CHECKING

import attrs
import trio

from .. import policy as pol
from ..errors import ConfigError
from ..events import CloseEvent, ConnectEvent, PolicyErrorEvent
from . import dns as dnsmod
from .sniff import FOUND, FlowSniffer

if TYPE_CHECKING:
    from .netstack import Netstack

log = logging.getLogger("corral.net")

CALLBACK_NAMES = ("on_connect", "on_dns", "on_packet")
# The supervisor times a callback out at --policy-timeout (a deny with a
# policy_error event); the stack's own deadline is a backstop a little later,
# for a supervisor that cannot answer at all.
STACK_TIMEOUT_GRACE = 0.25

# How long the stack waits for a peeked flow's first bytes (seconds).
PEEK_TIMEOUT = 0.3

# Well-known ports whose protocols have the server speak first (FTP, SSH, Telnet,
# SMTP, POP3, NNTP, IMAP, submission, MySQL, VNC): their clients send nothing before
# a greeting, so a peek would only delay them by PEEK_TIMEOUT.  Not peeked: decided
# by the rules (DNS names, addresses) alone.
SERVER_FIRST_PORTS = frozenset({21, 22, 23, 25, 110, 119, 143, 587, 3306, 5900, 5901})

# Close reasons of a flow the stack ended before the supervisor's verdict counted.
_STACK_DENIALS = frozenset({"denied", "policy-timeout", "overload", "shutdown"})


@attrs.define(eq=False)
class _Flow:
    """A flow between its new_flow and its flow_closed."""

    req: pol.ConnectRequest
    decision: pol.Decision | None = None  # the static (first) decision
    http_method: str | None = None
    http_path: str | None = None
    reported: bool = False  # its ConnectEvent was emitted
    asked: pol.Decision | None = None  # on_connect's allow, pending the first bytes
    observed: bool = False  # allowed already; the first bytes only name it


def build_policy(config):
    """The static policy of a Config; ConfigError on a bad rule or file."""
    allow = list(config.allow)
    for path in config.allow_file:
        try:
            allow.extend(pol.load_allow_file(path))
        except OSError as exc:
            raise ConfigError("--allow-file %s: %s" % (path, exc.strerror)) from None
    return pol.Policy(
        mode="audit" if config.audit else "run",
        allow=allow,
        deny=list(config.deny),
        host_ports=list(config.allow_host_port),
    )


def load_policy_file(path):
    """``--policy FILE.py``: the module's on_connect / on_dns / on_packet."""
    if not os.path.isfile(path):
        raise ConfigError("--policy %s: no such file. Fix: name a .py file defining "
                          "async def on_connect(req) and/or async def on_dns(query)" % path)
    try:
        namespace = runpy.run_path(path)
    except Exception as exc:
        raise ConfigError("--policy %s: the file raised %s: %s" % (path, type(exc).__name__, exc)) from None
    found = {name: namespace.get(name) for name in CALLBACK_NAMES}
    if not any(found.values()):
        raise ConfigError("--policy %s defines none of %s" % (path, ", ".join(CALLBACK_NAMES)))
    pol.check_callbacks(**found, where="--policy %s" % path)
    return found


def parse_publish(text):
    """``[HOSTIP:]HOSTPORT:SANDBOXPORT[/udp]`` -> (proto, host_ip, host_port, sandbox_port)."""
    spec, _, proto = text.partition("/")
    proto = proto or "tcp"
    error = ConfigError("--publish %r: expected [HOSTIP:]HOSTPORT:SANDBOXPORT[/tcp|/udp], "
                        "e.g. 8080:80 or 127.0.0.1:8053:53/udp" % text)
    if proto not in ("tcp", "udp"):
        raise error
    if spec.startswith("["):  # [v6]:HOSTPORT:SANDBOXPORT
        host, _, rest = spec[1:].partition("]")
        parts = [host] + rest.lstrip(":").split(":")
    else:
        parts = spec.split(":")
    if len(parts) == 2:
        parts = ["127.0.0.1"] + parts
    if len(parts) != 3:
        raise error
    try:
        ipaddress.ip_address(parts[0])
        host_port, sandbox_port = int(parts[1]), int(parts[2])
    except ValueError:
        raise error from None
    if not (0 <= host_port < 65536 and 0 < sandbox_port < 65536):
        raise error
    return proto, parts[0], host_port, sandbox_port


@attrs.define(eq=False)
class NetworkService:
    """The running network of one sandbox."""

    netstack: "Netstack"
    policy: pol.Policy
    names: pol.NameTable
    dns: dnsmod.DnsService
    stream: object
    policy_timeout: float
    on_connect: object = None
    on_packet: object = None
    tap_fd: int = -1  # pump mode: the TAP fd we move frames on (ours to close)
    pump: object = None  # pump mode: its counters
    published: list = attrs.field(factory=list)
    _open: dict = attrs.field(factory=dict)  # flow id -> ConnectRequest
    _verdicts: list = attrs.field(factory=list)
    _cancel: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _done: trio.Event = attrs.field(factory=trio.Event)
    _running: bool = False
    limits: object = None  # the Config: max_conns, max_rate
    _tokens: float = float("inf")  # --max-rate bucket (starts full)
    _tokens_at: float = 0.0

    def __repr__(self):
        return "<NetworkService %s open=%d>" % (self.netstack.mode, len(self._open))

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        self._running = True
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    if self.netstack.mode == "pump":
                        from .pump import run_pump

                        self.pump = await nursery.start(run_pump, self.netstack, self.tap_fd,
                                                        self.on_packet)
                    task_status.started()
                    while True:
                        batch = await self.netstack.wait_events()
                        with self.stream.batch():
                            self._handle(batch, nursery)
                        self._flush_verdicts()
        except trio.ClosedResourceError:
            pass
        finally:
            self._done.set()

    def _handle(self, batch, nursery):
        now = trio.current_time()
        for ev in batch:
            if ev.kind == "new_flow":
                self._new_flow(ev, now, nursery)
            elif ev.kind == "flow_data":
                self._flow_data(ev)
            elif ev.kind == "flow_closed":
                self._closed(ev)
            elif ev.kind == "dns_query":
                nursery.start_soon(self._dns, ev)

    def _register(self, ev, now):
        """A new_flow's record; None when the stack decided it alone."""
        (src_ip, src_port), (dst_ip, dst_port) = ev.src, ev.dst
        req = pol.ConnectRequest(
            id=ev.id, proto=ev.proto, src_ip=src_ip, src_port=src_port, dst_ip=dst_ip,
            dst_port=dst_port, names=self.names.names_for(dst_ip, now),
        )
        flow = self._open[ev.id] = _Flow(req=req)
        if ev.decided:  # the stack decided alone (overload, inbound publish)
            allowed = ev.inbound
            verdict = pol.ALLOW if allowed else pol.deny(ev.reason)
            rule = "publish" if ev.inbound else "stack:" + ev.reason
            self._report(flow, pol.Decision(verdict=verdict, rule=rule))
            return None
        return flow

    def _new_flow(self, ev, now, nursery):
        flow = self._register(ev, now)
        if flow is None:
            return
        req = flow.req
        limited = self._over_limit(now)
        if limited is not None:
            self._decided(flow, limited)
            return
        decision = flow.decision = pol.decide_connect(self.policy, req)
        if decision.by_default and self.on_connect is not None:
            # The callback decides at connect time (with the DNS names), so
            # its deny is an immediate RST / ECONNREFUSED like a rule's.
            nursery.start_soon(self._ask, flow)
            return
        if self._peekable(req) and decision.allowed:
            self._peek(flow, decision)
            return
        self._decided(flow, decision)

    def _over_limit(self, now):
        """--max-conns / --max-rate: a Decision denying the new flow, or None."""
        limits = self.limits
        if limits.max_conns is not None and len(self._open) > limits.max_conns:
            return pol.Decision(verdict=pol.deny("more than %d flows open (--max-conns)" % limits.max_conns),
                                rule="limit:max-conns")
        if limits.max_rate is not None:
            burst = max(1.0, limits.max_rate)
            self._tokens = min(burst, self._tokens + (now - self._tokens_at) * limits.max_rate)
            self._tokens_at = now
            if self._tokens < 1.0:
                return pol.Decision(verdict=pol.deny("more than %g new flows per second (--max-rate)"
                                                     % limits.max_rate), rule="limit:max-rate")
            self._tokens -= 1.0
        return None

    @staticmethod
    def _peekable(req):
        return req.proto == "tcp" and req.dst_port not in SERVER_FIRST_PORTS

    def _peek(self, flow, decision):
        """Allowed so far: let the stack read the first bytes (SNI / Host).
        If a claimed name could deny the flow, before the final verdict (peek);
        else the flow goes through now and the bytes only name it (observe)."""
        from .netstack import FlowVerdict  # loaded by start(); imported late (preload)
        dial = decision.dial if decision.allowed else None
        if pol.claims_can_deny(self.policy, flow.req):
            self._verdicts.append(FlowVerdict(id=flow.req.id, allow=True, peek=True, dial=dial))
        else:
            flow.observed = True
            flow.asked = decision
            self._verdicts.append(FlowVerdict(id=flow.req.id, allow=True, observe=True, dial=dial))

    def _flow_data(self, ev):
        """The first bytes of a peeked flow (name it, decide it for good) or of
        an observed one (name it; its allow stands)."""
        flow = self._open.get(ev.id)
        if flow is None or flow.reported:
            return
        found = FlowSniffer().feed(ev.payload)
        if found.state == FOUND:
            claimed = {"sni": found.name} if found.protocol == "tls" else {"http_host": found.name}
            flow.req = attrs.evolve(flow.req, **claimed)
            flow.http_method, flow.http_path = found.http_method, found.http_path
        decision = pol.decide_connect(self.policy, flow.req)
        if decision.by_default and flow.asked is not None:
            decision = flow.asked  # no rule on the names: the callback's allow stands
        if flow.observed:
            # Already allowed (claims_can_deny said no name can deny it): the
            # bytes name the ConnectEvent and may credit another allow rule.
            if not decision.allowed:  # claims_can_deny is wrong: say so, report what happened
                log.error("flow %s was let through unheld, but its first bytes make it %s "
                          "(policy.claims_can_deny missed this case)", flow.req, decision.verdict.reason)
                decision = flow.asked
            self._report(flow, decision)
            return
        self._decided(flow, decision)

    async def _ask(self, flow):
        req = flow.req
        decision = None
        with trio.move_on_after(self.policy_timeout):
            try:
                decision = pol.from_callback(await self.on_connect(req))
            except Exception as exc:  # a raising callback is a deny and an event
                decision = pol.from_callback_error("on_connect raised %s: %s" % (type(exc).__name__, exc))
                self.stream.emit(PolicyErrorEvent(callback="on_connect", subject=str(req.id),
                                                  error="%s: %s" % (type(exc).__name__, exc)))
            else:
                if decision.rule == pol.CALLBACK_ERROR:  # it returned something not a Verdict
                    self.stream.emit(PolicyErrorEvent(callback="on_connect", subject=str(req.id),
                                                      error=decision.verdict.reason))
        if decision is None:
            decision = pol.from_callback_error("on_connect timed out after %gs" % self.policy_timeout)
            self.stream.emit(PolicyErrorEvent(callback="on_connect", subject=str(req.id),
                                              error="timed out", timed_out=True))
        if decision.allowed and self._peekable(req) and not flow.reported:
            flow.asked = decision
            self._peek(flow, decision)
        else:
            self._decided(flow, decision)
        self._flush_verdicts()

    def _report(self, flow, decision):
        """Emit the flow's one ConnectEvent (later calls do nothing)."""
        if flow.reported:
            return False
        flow.reported = True
        self.stream.emit(ConnectEvent.from_decision(flow.req, decision, http_method=flow.http_method,
                                                    http_path=flow.http_path))
        return True

    def _decided(self, flow, decision):
        """The final decision: report it and queue the verdict."""
        from .netstack import FlowVerdict
        if not self._report(flow, decision):
            return  # the stack ended the flow first (timeout, shutdown)
        dial = None
        if decision.allowed and decision.dial is not None:
            dial = decision.dial
        self._verdicts.append(FlowVerdict(id=flow.req.id, allow=decision.allowed, dial=dial))

    def _flush_verdicts(self):
        if self._verdicts:
            batch, self._verdicts = self._verdicts, []
            try:
                self.netstack.set_verdicts(batch)
            except trio.ClosedResourceError:
                pass

    def _closed(self, ev):
        flow = self._open.pop(ev.id, None)
        if flow is not None and not flow.reported:
            # Ended before the final verdict: the stack denied it (policy timeout,
            # overload, shutdown), or a peeked flow ended on its own (refused
            # upstream, client reset) under its first decision.
            first = flow.asked or flow.decision
            if ev.reason in _STACK_DENIALS or first is None or not first.allowed:
                first = pol.Decision(verdict=pol.deny(ev.reason), rule="stack:" + ev.reason)
            self._report(flow, first)
        self.stream.emit(CloseEvent(id=ev.id, bytes_out=ev.bytes_out, bytes_in=ev.bytes_in,
                                    duration=ev.duration, reason=ev.reason))

    async def _dns(self, ev):
        src_ip, src_port = ev.src
        reply = await self.dns.handle(ev.payload, transport=ev.proto, src_ip=src_ip, src_port=src_port)
        try:
            self.netstack.dns_reply(ev.id, reply or b"")
        except trio.ClosedResourceError:
            pass

    def _check_pcap(self):
        try:
            stats = self.netstack.stats()
        except trio.ClosedResourceError:
            return
        if stats["pcap_errors"]:
            log.warning("--pcap: writing the capture failed after %d frames (%s); the network "
                        "went on without it", stats["pcap_frames"], self.netstack.last_error())

    async def aclose(self):
        """Stop the stack: end every flow still open and record its close (with
        its byte counts), then free the stack."""
        self._cancel.cancel()
        if self._running:
            await self._done.wait()
        try:
            # Ends the flows; each queues its flow_closed before this returns.
            self.netstack.shutdown()
            leftover = self.netstack.poll_events()
        except trio.ClosedResourceError:
            leftover = []
        now = trio.current_time()
        for ev in leftover:
            if ev.kind == "new_flow":  # never answered: its close says shutdown
                self._register(ev, now)
            elif ev.kind == "flow_closed":
                self._closed(ev)
        self.dns.close()  # a limit episode still open is reported
        self._check_pcap()
        self.netstack.close()
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1
        for flow_id, flow in list(self._open.items()):
            self._open.pop(flow_id)
            if not flow.reported:
                self._report(flow, pol.Decision(verdict=pol.deny("shutdown"), rule="stack:shutdown"))
            self.stream.emit(CloseEvent(id=flow_id, reason="shutdown"))


@attrs.frozen(kw_only=True)
class Plan:
    """A checked network configuration: everything that can be wrong in the
    user's input is found here, before anything is spawned."""

    policy: pol.Policy
    callbacks: dict
    mode: str
    upstreams: list
    publish: tuple


def plan(config, callbacks):
    """Validate the network part of ``config``; ConfigError names the problem."""
    callbacks = {name: func for name, func in dict(callbacks).items() if func is not None}
    if config.policy:
        for name, func in load_policy_file(config.policy).items():
            if func is not None:
                callbacks.setdefault(name, func)
    on_packet = callbacks.get("on_packet")
    mode = config.data_path or ("pump" if on_packet else "direct")
    if on_packet and mode != "pump":
        raise ConfigError("an on_packet filter needs the pump data path. Fix: drop "
                          "--data-path direct (pump is chosen automatically)")
    return Plan(policy=build_policy(config), callbacks=callbacks, mode=mode,
                upstreams=dnsmod.host_upstreams(config.dns_upstream),
                publish=tuple(parse_publish(text) for text in config.publish))


def preload():
    """Import the heavy parts of the network (the Go netstack and its runtime,
    cffi, dnspython): called in a worker thread once stage-1 runs, so that this
    overlaps the sandbox building its namespaces and mounts (DESIGN §2) instead
    of delaying the spawn.  Best effort: a module that fails to load fails again,
    with its error, where :func:`start` imports it."""
    try:
        from . import dnsmsg, netstack  # noqa: F401
    except Exception:  # reported by start(), in its place
        pass


async def start(nursery, config, netplan, tap_fd, stream, pcap=None):
    """Open the stack on ``tap_fd`` and start serving; return the service.
    The fd is consumed (direct: Go keeps a dup; pump: the service owns it).
    ``pcap``: the ``--pcap`` :class:`corral.fs.outputs.OutputFile`, prepared
    before the sandbox started."""
    from .netstack import Netstack

    pcap_fd = None
    try:
        if pcap is not None:
            pcap_fd = pcap.open()
        netstack = Netstack.open(tap_fd, mode=netplan.mode,
                                 policy_timeout=config.policy_timeout + STACK_TIMEOUT_GRACE,
                                 peek_timeout=PEEK_TIMEOUT, pcap_fd=pcap_fd)
    except BaseException:
        os.close(tap_fd)
        raise
    finally:
        if pcap_fd is not None:
            os.close(pcap_fd)  # Go keeps its own dup
    if netplan.mode == "direct":
        os.close(tap_fd)
        tap_fd = -1
    names = pol.NameTable()
    callbacks = netplan.callbacks
    service = NetworkService(
        netstack=netstack, policy=netplan.policy, names=names,
        dns=dnsmod.DnsService(netplan.policy, names, netplan.upstreams, stream.emit,
                              on_dns=callbacks.get("on_dns"), policy_timeout=config.policy_timeout,
                              max_rate=config.max_dns_rate, max_pending=config.max_dns_pending),
        stream=stream, policy_timeout=config.policy_timeout,
        on_connect=callbacks.get("on_connect"), on_packet=callbacks.get("on_packet"), tap_fd=tap_fd,
        limits=config,
    )
    try:
        for proto, host_ip, host_port, sandbox_port in netplan.publish:
            bound = netstack.publish(proto, host_ip, host_port, sandbox_port)
            service.published.append((proto, host_ip, bound, sandbox_port))
        await nursery.start(service.run)
    except BaseException:
        with trio.CancelScope(shield=True):
            await service.aclose()
        raise
    return service
