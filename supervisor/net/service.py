"""The sandbox's network, wired: netstack + policy + DNS + events (DESIGN §4–7).

:func:`start` takes the TAP fd pid 1 sent over, opens the Go netstack on it
(direct or pump data path), and runs one task that drives the flow state
machine (``_flows.FlowMachine``: every decision, no I/O) with the stack's
events and carries its actions out:

    new_flow / flow_data / flow_closed -> FlowMachine -> verdicts (one batch
        per wake-up), event records, callback tasks (on_connect, on_claim)
        whose results go back into the machine
    dns_query  -> DnsService (policy, on_dns, forward upstream, learn names)

Names claimed in the first bytes (docs/policy.md, "TLS SNI and HTTP Host"):
a TCP flow whose verdict a claimed name could change is held (``peek``): the
stack dials, completes the client's handshake and hands over what the client
sends, read after read, while the machine answers ``more``, until the
ClientHello or request head is complete; at most 16 KiB and ``PEEK_TIMEOUT``
seconds, after which an incomplete first message is a deny
(``claim-incomplete``).  Other TCP flows are observed: allowed at once, their
first bytes only name the events.

Callbacks run in their own tasks, so one slow callback never holds up other
flows; the stack denies any flow whose verdict is later than the policy
timeout, and so does the callback wrapper here (a timeout is a deny and a
PolicyErrorEvent).  Every flow gets exactly one ConnectEvent and one
CloseEvent, even when the sandbox ends first (reason ``shutdown``).
"""

import functools
import ipaddress
import logging
import os
import runpy
import time
from typing import TYPE_CHECKING

import attrs
import trio

from .. import policy as pol
from ..errors import ConfigError
from . import _flows
from . import dns as dnsmod

if TYPE_CHECKING:
    from .netstack import Netstack

log = logging.getLogger("corral.net")
REFUSED_POLL = 1.0  # seconds between looks at the netstack's count of work its bounds refused

CALLBACK_NAMES = ("on_connect", "on_claim", "on_dns", "on_packet")
# The supervisor times a callback out at --policy-timeout (a deny with a
# policy_error event); the stack's own deadline is a backstop a little later,
# for a supervisor that cannot answer at all.
STACK_TIMEOUT_GRACE = 0.25

# The bound on reading a held flow's first message (seconds since the client's
# handshake; 16 KiB is the other bound).  Real clients send their ClientHello or
# request right after connect() returns; the bound only matters to a client
# that pauses, which is then denied (claim-incomplete) if a name could matter.
PEEK_TIMEOUT = 1.0
SERVER_FIRST_PORTS = _flows.SERVER_FIRST_PORTS

# The process of a flow first seen as the sandbox ended (docs/events.md).
SHUTDOWN_UNKNOWN = "the sandbox ended before the flow was looked up"


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
    """``--policy FILE.py``: the module's on_connect / on_claim / on_dns / on_packet."""
    if not os.path.isfile(path):
        raise ConfigError("--policy %s: no such file. Fix: name a .py file defining "
                          "async def on_connect(req), on_claim(req) and/or on_dns(query)" % path)
    try:
        namespace = _run_policy_file(path)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError("--policy %s: the file raised %s: %s" % (path, type(exc).__name__, exc)) from None
    found = {name: namespace.get(name) for name in CALLBACK_NAMES}
    if not any(found.values()):
        raise ConfigError("--policy %s defines none of %s" % (path, ", ".join(CALLBACK_NAMES)))
    pol.check_callbacks(**found, where="--policy %s" % path)
    return found


class _PolicyExited(BaseException):
    pass


def _run_policy_file(path):
    """runpy.run_path, except that a file exiting at import (sys.exit,
    os._exit) is a policy error instead of corral ending silently.  The
    limit: a policy file is code run with your rights, and os.kill, os.abort
    or ctypes can still end corral (docs/policy.md)."""
    import posix

    real = os._exit

    def refuse(code):
        raise _PolicyExited("called os._exit(%r) at import" % (code,))

    os._exit = posix._exit = refuse
    try:
        return runpy.run_path(path)
    except SystemExit as exc:
        raise ConfigError("--policy %s: the file called sys.exit(%r) at import. Fix: define "
                          "the callbacks without exiting" % (path, exc.code)) from None
    except _PolicyExited as exc:
        raise ConfigError("--policy %s: the file %s. Fix: define the callbacks without exiting"
                          % (path, exc)) from None
    finally:
        os._exit = posix._exit = real


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
    """The running network of one sandbox: a trio driver of the FlowMachine."""

    netstack: "Netstack"
    machine: _flows.FlowMachine
    names: pol.NameTable
    dns: dnsmod.DnsService
    stream: object
    policy_timeout: float
    callbacks: dict = attrs.field(factory=dict)  # on_connect, on_claim
    on_packet: object = None
    # The TAP fd (ours to close): pump mode moves frames on it; both modes hold it until
    # aclose, because its last close tears the device down (see aclose).
    tap_fd: int = -1
    pump: object = None  # pump mode: its counters
    published: list = attrs.field(factory=list)
    _verdicts: list = attrs.field(factory=list)
    _nursery: object = None
    _cancel: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _done: trio.Event = attrs.field(factory=trio.Event)
    _running: bool = False
    owners: object = None  # corral.net.owner.Owners: flow -> process inside
    _refused_seen: int = 0  # the netstack's refused counter, last looked at
    _refused_episode: list | None = None  # [since (wall clock), count] while refusals go on

    def __repr__(self):
        return "<NetworkService %s open=%d>" % (self.netstack.mode, len(self.machine))

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        self._running = True
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self.netstack.mode == "pump":
                        from .pump import run_pump

                        self.pump = await nursery.start(run_pump, self.netstack, self.tap_fd,
                                                        self.on_packet)
                    task_status.started()
                    nursery.start_soon(self._watch_refused)
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
        owners = self._owners_of(batch)
        for ev in batch:
            if ev.kind == "dns_query":
                nursery.start_soon(self._dns, ev)
                continue
            event = self._translate(ev, now, owner=owners.get(ev.id))
            if event is not None:
                self._apply(self.machine.handle(event))

    def _owners_of(self, batch):
        """{flow id: (Process, reason)} of the batch's new outbound flows, in one lookup."""
        if self.owners is None:
            return {}
        flows = [ev for ev in batch if ev.kind == "new_flow" and not ev.inbound]
        if not flows:
            return {}
        found = self.owners.lookup_many([(ev.proto, *ev.src, *ev.dst) for ev in flows])
        return {ev.id: owner for ev, owner in zip(flows, found)}

    def _translate(self, ev, now, *, shutting_down=False, owner=None):
        """A stack NetEvent as a FlowMachine event (None: not a flow event).
        ``owner``: (Process, reason) of a new flow (corral.net.owner)."""
        if ev.kind == "new_flow":
            # Left over at shutdown: never answered, it is reported as the stack's deny.
            reason = "shutdown" if shutting_down and not ev.decided else ev.reason
            if owner is None and shutting_down and not ev.inbound:
                owner = (None, SHUTDOWN_UNKNOWN)
            process, unknown = owner or (None, None)
            return _flows.NewFlow(id=ev.id, proto=ev.proto, src=ev.src, dst=ev.dst,
                                  names=self.names.names_for(ev.dst[0], now), now=now,
                                  decided=ev.decided or shutting_down, inbound=ev.inbound, reason=reason,
                                  process=process, process_unknown=unknown)
        if ev.kind == "flow_data":
            return _flows.FlowData(id=ev.id, data=ev.payload, last=ev.last, eof=ev.reason == "eof")
        if ev.kind == "flow_closed":
            return _flows.FlowClosed(id=ev.id, reason=ev.reason, bytes_out=ev.bytes_out,
                                     bytes_in=ev.bytes_in, duration=ev.duration)
        return None

    def _apply(self, actions):
        from .netstack import FlowVerdict  # loaded by start(); imported late (preload)

        for action in actions:
            if isinstance(action, _flows.Emit):
                self.stream.emit(action.event)
            elif isinstance(action, _flows.Answer):
                verb = action.action
                self._verdicts.append(FlowVerdict(
                    id=action.id, allow=verb != "deny", dial=action.dial,
                    peek=verb in ("peek", "more"), observe=verb == "observe"))
            elif self._nursery is not None:  # Ask
                self._nursery.start_soon(self._ask, action)

    async def _ask(self, ask):
        """Run one callback, bounded by the policy timeout, and feed its result back."""
        func = self.callbacks[ask.callback]
        done = None
        with trio.move_on_after(self.policy_timeout):
            try:
                done = _flows.CallbackDone(id=ask.id, callback=ask.callback, result=await func(ask.req))
            except Exception as exc:  # a raising callback is a deny and an event
                done = _flows.CallbackDone(id=ask.id, callback=ask.callback,
                                           error="%s: %s" % (type(exc).__name__, exc))
        if done is None:
            done = _flows.CallbackDone(id=ask.id, callback=ask.callback, timed_out=True,
                                       error="did not return within %gs" % self.policy_timeout)
        self._apply(self.machine.handle(done))
        self._flush_verdicts()

    def _flush_verdicts(self):
        if self._verdicts:
            batch, self._verdicts = self._verdicts, []
            try:
                self.netstack.set_verdicts(batch)
            except trio.ClosedResourceError:
                pass

    async def _dns(self, ev):
        src_ip, src_port = ev.src
        owner = None
        if self.owners is not None:
            owner = functools.partial(self.owners.lookup, ev.proto, src_ip, src_port, *ev.dst)
        reply = await self.dns.handle(ev.payload, transport=ev.proto, src_ip=src_ip, src_port=src_port,
                                      owner=owner)
        try:
            self.netstack.dns_reply(ev.id, reply or b"")
        except trio.ClosedResourceError:
            pass

    async def _watch_refused(self):
        while True:
            await trio.sleep(REFUSED_POLL)
            self._poll_refused()

    def _poll_refused(self, final=False):
        """The netstack's own bounds (its event queue, 4,096 UDP and ICMP flows, 1,024
        pending DNS queries, 256 DNS-over-TCP connections) refuse new work when full and
        count it; a run of refusals is one ``limit`` event, when it ends (a quiet
        second, or the sandbox's end), never one per refused item."""
        try:
            refused = self.netstack.stats()["refused"]
        except trio.ClosedResourceError:
            refused = self._refused_seen
        new, self._refused_seen = refused - self._refused_seen, refused
        if new:
            if self._refused_episode is None:
                self._refused_episode = [time.time(), 0]
                log.warning("the netstack is full (a flood inside): refusing new flows and "
                            "DNS queries until it drains")
            self._refused_episode[1] += new
        if self._refused_episode is not None and (final or not new):
            since, count = self._refused_episode
            self._refused_episode = None
            from corral.events import LimitEvent

            self.stream.emit(LimitEvent(
                limit="netstack", action="refused", count=count, since=since,
                detail="new flows and DNS queries beyond the netstack's bounds (event queue, "
                       "flow tables, pending DNS) were refused (TCP reset, datagram dropped)"))

    def _check_pcap(self):
        try:
            stats = self.netstack.stats()
        except trio.ClosedResourceError:
            return
        if stats["pcap_errors"]:
            log.warning("--pcap: writing the capture failed after %d frames (%s); the network "
                        "went on without it", stats["pcap_frames"], self.netstack.last_error())

    async def aclose(self, free=True):
        """Stop the stack: end every flow still open and record its close (with
        its byte counts), then free the stack and close the TAP fd — unless not
        ``free``: the process is about to exit, which frees the stack faster
        (waiting for gVisor's goroutines to end costs ~15 ms), and ``tap_fd`` is
        left open for the caller to hand to a process that outlives this one
        (:func:`corral.launch.cleanup_later`): the last close of a TAP fd
        unregisters the device, ~40 ms of RCU grace periods."""
        self._cancel.cancel()
        if self._running:
            await self._done.wait()
        self._nursery = None  # no more callbacks
        try:
            # Ends the flows; each queues its flow_closed before this returns.
            self.netstack.shutdown()
            leftover = self.netstack.poll_events()
        except trio.ClosedResourceError:
            leftover = []
        now = trio.current_time()
        for ev in leftover:
            if ev.kind in ("new_flow", "flow_closed"):
                self._apply(self.machine.handle(self._translate(ev, now, shutting_down=True)))
        self._verdicts.clear()
        self.dns.close()  # a limit episode still open is reported
        if self.owners is not None:
            self.owners.close()
        self._poll_refused(final=True)
        self._check_pcap()
        if free:
            self.netstack.close()
            if self.tap_fd >= 0:
                os.close(self.tap_fd)
                self.tap_fd = -1
        self._apply(self.machine.shutdown())


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
    policy = build_policy(config)
    if not config.attribution:
        scoped = [rule for rule in (*policy.allow, *policy.deny) if rule.scope is not None]
        if scoped:
            raise ConfigError("rule %r is scoped to a program, which needs process attribution. "
                              "Fix: drop --no-attribution (attribution=False), or the @ scope"
                              % scoped[0].text)
    return Plan(policy=policy, callbacks=callbacks, mode=mode,
                upstreams=dnsmod.host_upstreams(config.dns_upstream),
                publish=tuple(parse_publish(text) for text in config.publish))


def preload():
    """Import the heavy part of the network that the start needs (the Go netstack
    and its runtime, cffi): called in a worker thread once stage-1 runs, so that
    this overlaps the sandbox building its namespaces and mounts (DESIGN §2)
    instead of delaying the spawn.  Not dnspython (~50-90 ms): the first DNS query
    loads it (corral.net.dns), a command that asks none never does.  Best effort:
    a module that fails to load fails again, with its error, where :func:`start`
    imports it."""
    try:
        from . import netstack  # noqa: F401
    except Exception:  # reported by start(), in its place
        pass


async def start(nursery, config, netplan, tap_fd, stream, pcap=None, owners=None):
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
        if owners is not None:
            owners.close()
        raise
    finally:
        if pcap_fd is not None:
            os.close(pcap_fd)  # Go keeps its own dup
    names = pol.NameTable()
    callbacks = netplan.callbacks
    on_connect, on_claim = callbacks.get("on_connect"), callbacks.get("on_claim")
    machine = _flows.FlowMachine(policy=netplan.policy, on_connect=on_connect is not None,
                                 on_claim=on_claim is not None, max_conns=config.max_conns,
                                 max_rate=config.max_rate, peek_timeout=PEEK_TIMEOUT)
    service = NetworkService(
        netstack=netstack, machine=machine, names=names,
        dns=dnsmod.DnsService(netplan.policy, names, netplan.upstreams, stream.emit,
                              on_dns=callbacks.get("on_dns"), policy_timeout=config.policy_timeout,
                              max_rate=config.max_dns_rate, max_pending=config.max_dns_pending,
                              resolve_for_callbacks=on_connect is not None or on_claim is not None),
        stream=stream, policy_timeout=config.policy_timeout,
        callbacks={name: func for name, func in (("on_connect", on_connect), ("on_claim", on_claim)) if func},
        on_packet=callbacks.get("on_packet"), tap_fd=tap_fd, owners=owners,
    )
    if owners is not None:
        # a rule or callback decides with the process: know every holder of a socket
        owners.exact = bool(on_connect or on_claim or callbacks.get("on_dns")) or any(
            rule.scope is not None for rule in (*netplan.policy.allow, *netplan.policy.deny))
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
