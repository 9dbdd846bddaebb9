"""The public Python API: :func:`run`, :func:`open_sandbox`, :func:`enter`.

``open_sandbox`` is the trio-native core; ``run`` drives it (or, for sandboxes
without a userspace network and without captured output, the lighter
:func:`corral.launch.run_blocking`); ``enter`` turns the calling process into
a sandboxed one.
"""

import contextlib
import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import IO, Any

import attrs
import trio

from . import _supervise
from . import launch as _launch
from .config import Config
from .errors import ConfigError
from .events import Event, EventStream, JsonlSink, ListSink, SandboxExitEvent, SandboxStartEvent
from .launch import Result
from .policy import ConnectRequest, DnsQuery, Verdict
from .spawn import stage1

log = logging.getLogger("corral.api")


def _check_callbacks(on_connect, on_dns, on_packet, on_claim=None):
    from .policy import check_callbacks

    check_callbacks(on_connect=on_connect, on_dns=on_dns, on_packet=on_packet, on_claim=on_claim)


class _FirstPolicyError:
    """A sink that says, once per sandbox, that a policy callback failed: through the
    caller's warning callback (the CLI: one line on stderr), else the log."""

    def __init__(self, box):
        self._box = box
        self._said = False

    def write(self, event):
        if self._said or getattr(event, "TYPE", None) != "policy_error":
            return
        self._said = True
        what = "flow %s" % event.subject if event.callback == "on_connect" else event.subject
        text = ("policy callback %s failed on %s: %s; it was denied (later failures only as "
                "policy_error events)" % (event.callback, what, "timed out" if event.timed_out else event.error))
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # names from the sandbox
        if self._box._on_warning:
            self._box._on_warning(text)
        else:
            log.warning("%s", text)


def _config(config, options):
    if config is not None and not isinstance(config, Config):
        raise TypeError("config must be a corral.Config, not %s" % type(config).__name__)
    if config is None:
        return Config(**options)
    if options:
        return attrs.evolve(config, **options)
    return config


# ---------------------------------------------------------------- types

Argv = Sequence["str | os.PathLike[str]"]
StdioArg = int | IO[Any] | None  # None, subprocess.PIPE/DEVNULL, an fd or a file object
OnConnect = Callable[[ConnectRequest], Awaitable[Verdict]]
OnDns = Callable[[DnsQuery], Awaitable[Verdict]]
OnPacket = Callable[[Any], bool]
OnWarning = Callable[[str], None]


def _check_argv(argv):
    """``run("true")`` must not become argv ['t', 'r', 'u', 'e']."""
    if isinstance(argv, (str, bytes, os.PathLike)):
        raise TypeError("argv must be a list of strings such as [%r], not a %s. Fix: "
                        "shlex.split() a command line" % (os.fsdecode(argv), type(argv).__name__))
    try:
        items = list(argv)
    except TypeError:
        raise TypeError("argv must be a list of strings, not %s" % type(argv).__name__) from None
    for item in items:
        if not isinstance(item, (str, os.PathLike)) or not isinstance(os.fspath(item), str):
            raise TypeError("argv items must be str (or str paths), not %s: %r"
                            % (type(item).__name__, item))
    return items


# ---------------------------------------------------------------- run


def run(argv: Argv, *, config: Config | None = None, capture_output: bool = False,
        input: bytes | None = None, on_connect: OnConnect | None = None,
        on_dns: OnDns | None = None, on_packet: OnPacket | None = None,
        on_claim: OnConnect | None = None, on_warning: OnWarning | None = None,
        **options: Any) -> Result:
    """Run ``argv`` in a sandbox, wait, and return a :class:`Result`.

    Options are :class:`Config` fields (``allow=[...]``, ``rw=[...]``,
    ``net="none"``…) or a ready ``config``.  ``capture_output=True`` fills
    ``Result.stdout``/``stderr``; ``input`` (bytes) is fed to stdin.
    ``on_warning(text)`` gets the one-line notices the CLI prints (a denied
    destination and how to allow it, a plan notice); without it they are logged
    on ``corral.api``.
    """
    argv = _check_argv(argv)
    _check_callbacks(on_connect, on_dns, on_packet, on_claim)
    config = _config(config, options)
    callbacks = dict(on_connect=on_connect, on_dns=on_dns, on_packet=on_packet, on_claim=on_claim)
    if (config.net != "filtered" and not capture_output and input is None and not config.monitor
            and not any(callbacks.values())
            and not (config.events or config.report or config.suggest or config.audit)):
        return _launch.run_blocking(config, argv, on_warning=on_warning)
    return trio.run(_run_async, config, argv, capture_output, input, callbacks, on_warning)


def run_config(config: Config, argv: Argv, *, on_warning: Callable[[str], None] | None = None,
               on_timeout: Callable[[float], None] | None = None,
               started: "_launch.Started | None" = None) -> Result:
    """What ``corral run`` calls for sandboxes with a userspace network.  As
    the process's own supervisor, it forwards signals to the sandbox.
    ``started``: the stage-1 :func:`corral.launch.start_early` started for
    ``argv`` before this module was imported, to adopt."""
    argv = _check_argv(argv)
    return trio.run(_run_async, config, argv, False, None, {}, on_warning, on_timeout, True,
                    started)


async def _run_async(config, argv, capture_output, input, callbacks, on_warning=None,
                     on_timeout=None, cli=False, started=None):
    """``cli``: `corral run` itself, which forwards signals to the sandbox and exits
    as soon as this returns.  ``started``: its stage-1, forked early (launch.start_early)."""
    pipe = subprocess.PIPE if capture_output else None
    async with open_sandbox(config, on_warning=on_warning, **callbacks) as box:
        box._on_timeout = on_timeout
        box._process_exits = cli
        box._started = started
        with contextlib.ExitStack() as stack:
            if cli:
                receiver = stack.enter_context(trio.open_signal_receiver(*stage1.FORWARDED))
            proc = await box.start(argv, stdin=subprocess.PIPE if input is not None else None,
                                   stdout=pipe, stderr=pipe)
            async with trio.open_nursery() as nursery:
                if cli:
                    nursery.start_soon(_forward_signals, receiver, proc)
                out, err = await proc.communicate(input)
                await proc._done.wait()
                nursery.cancel_scope.cancel()
        await proc.wait()  # outside the nursery: a SandboxError comes out as itself
    return attrs.evolve(proc.result, stdout=out, stderr=err, events=tuple(box.recorded_events),
                        report=box.report)


async def _forward_signals(receiver, proc):
    """SIGTERM, SIGHUP, SIGUSR1/2 go to the sandbox's pid 1, which passes them
    on; keyboard signals only when the terminal did not already deliver them
    to the command (see docs/design.md)."""
    async for sig in receiver:
        proc._forward(sig)


# ---------------------------------------------------------------- open_sandbox


@contextlib.asynccontextmanager
async def open_sandbox(config: Config | None = None, *, on_connect: OnConnect | None = None,
                       on_dns: OnDns | None = None, on_packet: OnPacket | None = None,
                       on_claim: OnConnect | None = None, on_warning: OnWarning | None = None,
                       **options: Any) -> AsyncIterator["Sandbox"]:
    """``async with corral.open_sandbox(config) as box:`` — a sandbox whose
    tasks live in this context; leaving it kills whatever still runs inside.
    ``on_warning(text)``: as for :func:`run`."""
    _check_callbacks(on_connect, on_dns, on_packet, on_claim)
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        raise ConfigError("corral.open_sandbox runs under trio (trio.run); from asyncio use "
                          "corral.aio.open_sandbox, which has the same shape") from None
    config = _config(config, options)
    try:
        async with trio.open_nursery() as nursery:
            box = Sandbox(config, nursery, callbacks=dict(on_connect=on_connect, on_dns=on_dns,
                                                          on_packet=on_packet, on_claim=on_claim))
            box._on_warning = on_warning
            try:
                yield box
            finally:
                with trio.CancelScope(shield=True):
                    await box.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery is an implementation detail: a single error (a bad path,
        # a failed set-up step, the caller's own exception) comes out as itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@attrs.define(eq=False)
class Sandbox:
    """One sandbox: its namespaces, its network and the process inside."""

    config: Config
    _nursery: trio.Nursery = attrs.field(repr=False)
    callbacks: dict = attrs.field(factory=dict, repr=False)
    process: "Process | None" = None
    network: object = None
    stream: EventStream = attrs.field(factory=EventStream, repr=False)
    _recorded: ListSink = attrs.field(factory=ListSink, repr=False)
    _sinks: list = attrs.field(factory=list, repr=False)
    _netplan: object = None
    _on_warning: object = None
    _on_timeout: object = None
    _ended: trio.Event | None = None  # set once the sandbox has fully ended
    # The process exits right after the sandbox ends (`corral run`): what the exit frees
    # anyway (the Go stack's memory and goroutines, the scratch tree in the background)
    # is not waited for, so corral exits right after the command (issue 11).
    _process_exits: bool = False
    # When the process exits, what a helper removes once the sandbox has ended (the
    # scratch tree, the `corral ps` entry): the launch.Sweeper forked with the stage-1
    # this adopted, else launch.cleanup_later; None once handed over.
    _left: list | None = attrs.field(factory=list, repr=False)
    changes: object = None  # overlay changes, collected at exit when a report is wanted
    _started: object = None  # a launch.Started that start() adopts instead of spawning
    _registration: object = None  # the `corral ps` entry (state.Registration), listed while it runs
    report: dict | None = None
    _outputs: dict = attrs.field(factory=dict, repr=False)  # --report/--suggest/--pcap

    def __attrs_post_init__(self):
        self.stream.add_sink(self._recorded)
        self.stream.add_sink(_FirstPolicyError(self))
        self._prepare_outputs()
        if self.config.events:
            try:
                sink = JsonlSink.open(self.config.events)
            except BaseException:
                self._close_outputs()
                raise
            self._sinks.append(sink)
            self.stream.add_sink(sink)
        if self.config.net == "filtered" and not self.config.audit and not self.config.quiet:
            from .events.hints import DenialHints

            hints = DenialHints(self._warn)
            self._sinks.append(hints)
            self.stream.add_sink(hints)

    def _warn(self, text):
        """One line for the user: the CLI's stderr, the API's ``on_warning``, or the log."""
        if self._on_warning is not None:
            self._on_warning(text)
        else:
            log.warning("%s", text)

    def _prepare_outputs(self):
        """Hold every output file's directory before anything starts: a missing
        directory or a planted symlink is refused before the command runs, and
        nothing the sandbox does later redirects the write (corral.fs.outputs)."""
        config = self.config
        wanted = {"report": config.report, "suggest": config.suggest,
                  "pcap": config.pcap if config.net == "filtered" else None}
        try:
            for key, path in wanted.items():
                if path:
                    from .fs.outputs import OutputFile  # only then: start-up

                    self._outputs[key] = OutputFile.prepare(path, "--" + key)
        except BaseException:
            self._close_outputs()
            raise

    def _close_outputs(self):
        for output in self._outputs.values():
            output.close()

    @property
    def recorded_events(self):
        """The events so far, in order: all of them up to 20,000, else the first and latest
        10,000 with an ``events_dropped`` record between (ListSink; docs/events.md)."""
        return list(self._recorded.events)

    @property
    def id(self):
        """The id `corral ps/logs/stop/exec` know it by (None until it runs)."""
        entry = self._registration
        return entry.id if entry is not None and entry.published else None

    def __repr__(self):
        state = "new" if self.process is None else repr(self.process)
        return "<Sandbox id=%s net=%s %s>" % (self.id, self.config.net, state)

    async def start(self, argv: Argv, *, stdin: StdioArg = None, stdout: StdioArg = None,
                    stderr: StdioArg = None) -> "Process":
        """Start ``argv`` inside; return its :class:`Process` once it runs.
        ``stdin``/``stdout``/``stderr`` as for :class:`subprocess.Popen`
        (``None`` inherits ours; a regular file is relayed, see
        docs/security.md)."""
        argv = _check_argv(argv)
        if self.process is not None:
            raise ConfigError("this sandbox already runs a command; open another sandbox")
        if self.config.net == "filtered":
            from .net import service

            self._netplan = service.plan(self.config, self.callbacks)
        elif any(self.callbacks.values()):
            raise ConfigError("policy callbacks need net='filtered' (the default network mode)")
        started = self._started
        if started is not None:  # corral run: planned, warned and spawned before trio was loaded
            self.process = proc = Process(self, started.launch)
            proc._adopt(started)
        else:
            prepared = _launch.prepare(self.config, argv)
            for warning in prepared.warnings:
                if self._on_warning:
                    self._on_warning(warning)
                else:
                    log.warning("%s", warning)
            self.process = proc = Process(self, prepared)
            proc._spawn(stdin, stdout, stderr)
        if self.config.net == "filtered":  # the network's imports overlap the sandbox's set-up
            self._nursery.start_soon(trio.to_thread.run_sync, service.preload)
        if self.config.monitor:
            import shlex

            from .events.monitor import run_monitor

            self._nursery.start_soon(functools.partial(
                run_monitor, self.stream, title=shlex.join(argv),
                command_fds=[fd for fd, io in ((1, stdout), (2, stderr)) if io is None]))
        await self._nursery.start(proc._supervise)
        return proc

    async def events(self) -> AsyncIterator[Event]:
        """Every event of this sandbox, from the first; ends when the sandbox
        ends (the same records ``--events`` writes)."""
        async for event in self.stream.subscribe(replay=True):
            yield event

    async def aclose(self):
        """Kill whatever still runs inside and release everything (idempotent)."""
        if self.process is not None:
            await self.process._teardown()
        await self._end()

    async def _end(self):
        """The sandbox is over: stop its network, record the exit, end the
        event stream (so ``events()`` iterators finish)."""
        if self._ended is not None:  # another caller is ending it: wait for that
            with trio.CancelScope(shield=True):
                await self._ended.wait()
            return
        self._ended = trio.Event()
        try:
            await self._finish_end()
        finally:
            self._ended.set()

    async def _finish_end(self):
        fds = []
        try:
            with trio.CancelScope(shield=True):
                if self.network is not None:
                    await self.network.aclose(free=not self._process_exits)
                    if self.network.tap_fd >= 0:  # left open: the helper closes it last
                        fds.append(self.network.tap_fd)
                        self.network.tap_fd = -1
            result = self.process.result if self.process is not None else None
            if result is not None:
                self.stream.emit(SandboxExitEvent(exit_code=result.exit_code, signal=result.signal,
                                                  sandbox_id=self.id))
            self.stream.close()
            for sink in self._sinks:
                sink.close()
            if self._registration is not None:
                self._left.append(self._registration.close(remove=not self._process_exits))
            try:
                if self.wants_report:
                    self._write_report(result)
            finally:
                self._close_outputs()
        finally:
            left, self._left = self._left, None
            sweeper = self._started.sweeper if self._started is not None else None
            (sweeper.finish if sweeper is not None else _launch.cleanup_later)(left, fds)

    @property
    def wants_report(self):
        config = self.config
        return bool(config.audit or config.report or config.suggest)

    def _write_report(self, result):
        from .events import report as reporting

        self.report = reporting.build_report(
            self.recorded_events, changes=self.changes,
            exit_code=result.exit_code if result is not None else None,
            suggest_scope=self.config.suggest_scope,
        )
        if "report" in self._outputs:
            self._outputs["report"].replace_with((json.dumps(self.report, indent=2) + "\n").encode())
        if "suggest" in self._outputs:
            self._outputs["suggest"].replace_with(reporting.render_allowlist(self.report).encode())


class Process:
    """The command running in a :class:`Sandbox`."""

    def __init__(self, box, prepared):
        self._box = box
        self._launch = prepared
        self._popen = None
        self._ctl = None
        self._relay = None
        self._go = None
        self._machine = None
        self.pid = None  # the command's pid as seen from the supervisor
        self.result = None
        self._error_exc = None
        self._left_early = False  # the command's exit was reported; stage-1's not waited for
        self._reserved = False  # the `corral ps` entry was made (or tried)
        self._done = trio.Event()
        self.stdin = self.stdout = self.stderr = None
        self._status = _launch.StatusWriter(box.config.json_status_fd)

    def __repr__(self):
        if self.result is not None:
            return "<Process pid=%s exited %d>" % (self.pid, self.result.exit_code)
        return "<Process pid=%s running>" % self.pid

    @property
    def d_pid(self):
        """The sandbox's pid 1, in the supervisor's pid namespace."""
        return self._machine.d_pid if self._machine is not None else None

    @property
    def returncode(self):
        return None if self.result is None else self.result.exit_code

    def _spawn(self, stdin, stdout, stderr):
        # The fork (or Popen) runs here, in the main thread: PR_SET_PDEATHSIG fires
        # when the *thread* that forked the child exits, so a trio worker thread
        # would kill the sandbox when the thread cache retires it.
        stdio = (stdin, stdout, stderr)
        self._relay = _launch.stdio_relay(tuple(_stdio_fd(v, fd) for fd, v in enumerate(stdio)))
        try:
            self._popen, self._ctl = _launch.spawn_stage1(self._launch, self._relay, stdio)
        except BaseException:
            self._relay.close()
            raise
        self._relay.spawned()
        self._supervision()

    def _adopt(self, started):
        """Take over a stage-1 started earlier (:class:`corral.launch.Started`)."""
        started.adopted = True
        self._popen, self._ctl, self._relay = started.process, started.ctl, started.relay
        self._go = started.go
        self._supervision()

    def _supervision(self):
        config = self._box.config
        self._machine = _supervise.Supervision(
            stage1_pid=self._popen.pid, now=trio.current_time(), timeout=config.timeout,
            kill_grace=config.kill_grace, wait_go=bool(self._launch.spec.get("wait_go")),
            keyboard_direct=_launch.in_terminal_foreground())
        for name in ("stdin", "stdout", "stderr"):
            stream = getattr(self._popen, name)
            if stream is not None:
                fd = os.dup(stream.fileno())
                stream.close()
                setattr(self, name, trio.lowlevel.FdStream(fd))
        self._ctl.setblocking(False)

    async def _supervise(self, task_status=trio.TASK_STATUS_IGNORED):
        """The trio driver of :class:`corral._supervise.Supervision`.  However
        it ends — the command exits, the caller cancels, an exception — nothing
        keeps running inside."""
        started = failed = False
        try:
            try:
                started = await self._drive(task_status)
            except BaseException:
                failed = True
                _supervise.carry_out(self._machine.teardown())
                raise
            finally:
                with trio.CancelScope(shield=True):
                    if not self._left_early:
                        await self._wait_stage1()
                    if self._relay.active:  # threads to join; else nothing to wait for
                        await trio.to_thread.run_sync(self._relay.finish)
                    else:
                        self._relay.finish()
        finally:
            self._ctl.close()
            self._finish()
            self._done.set()
            with trio.CancelScope(shield=True):
                await self._box._end()
            if not started and not failed:
                task_status.started()

    async def _drive(self, task_status):
        machine = self._machine
        started = False
        while not machine.finished:
            timer = machine.next_timer()
            with trio.move_on_at(math.inf if timer is None else timer):
                await trio.lowlevel.wait_readable(self._ctl)
            actions = []
            try:
                message, fds = stage1.recv(self._ctl)
            except BlockingIOError:
                pass
            else:
                actions += machine.received(message, fds)
            actions += machine.tick(trio.current_time())
            for action in actions:
                if isinstance(action, _supervise.CommandStarted):
                    self._command_started(action.pid)
                    started = True
                    task_status.started()
                elif isinstance(action, _supervise.StartNetwork):
                    await self._start_network(action.fd, action.diag)
                elif isinstance(action, _supervise.SendGo):
                    self._send_go()
                    self._reserve()
                elif isinstance(action, _supervise.TimedOut):
                    if self._box._on_timeout:
                        self._box._on_timeout(action.seconds)
                elif isinstance(action, _supervise.CommandExited):
                    self._left_early = self._may_leave_early()
                else:
                    _supervise.carry_out([action])
            if self._left_early:
                break
        return started

    def _send_go(self):
        """Go; with the command and its stdio when the sandbox was made ready
        before they were known (:meth:`corral.launch.Started.take_command`)."""
        message, fds = self._go or ({"go": True}, ())
        self._go = None
        try:
            stage1.send(self._ctl, message, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _may_leave_early(self):
        """Once pid 1 reported the command's exit, need stage-1's exit (pid 1's and its
        own, which end every process inside: a few ms) still be waited for?  Not when
        the process exits right after (it kills them if they are still there, and
        reaps nothing), unless something still comes out of the sandbox: relayed
        output (until its pipes end), the change report, a --keep-changes record."""
        box = self._box
        return (box._process_exits and not self._relay.active and self._launch.keep is None
                and not box.wants_report)

    def _command_started(self, pid):
        self.pid = pid
        self._status.write(**{"child-pid": pid})
        self._register()
        box = self._box
        box.stream.emit(SandboxStartEvent(
            argv=self._launch.spec["argv"] or (), pid=pid, sandbox_id=box.id,
            mode="audit" if box.config.audit else "run", env_dropped=self._launch.env_dropped))

    def _reserve(self):
        """Make the `corral ps` entry ahead (state.reserve: a few ms), while pid 1
        starts the command."""
        from . import state

        if not self._reserved:
            self._reserved = True
            self._box._registration = state.reserve_quietly(
                spec=self._launch.spec, supervisor_pid=os.getpid(), d_pid=self.d_pid)

    def _register(self):
        """List the sandbox for `corral ps/logs/stop/exec`; its events.jsonl
        gets every event, those from before the command started first."""
        box = self._box
        self._reserve()  # (done already when pid 1 waited for the go)
        entry = box._registration
        if entry is None:
            return
        try:
            entry.publish(self.pid)
        except OSError as exc:
            log.warning("this sandbox will not appear in `corral ps`: %s", exc)
            box._registration = None
            entry.close()
            return
        sink = JsonlSink(entry.open_events(), owned=True)
        for event in box.stream.history:
            sink.write(event)
        box.stream.add_sink(sink)

    async def _start_network(self, tap_fd, diag_fd=None):
        from .net import owner, service

        box = self._box
        if not box.config.attribution and diag_fd is not None:
            os.close(diag_fd)
            diag_fd = None
        owners = owner.Owners(diag_fd, lambda: self.d_pid,
                              unavailable=owner.NO_DIAG if box.config.attribution else owner.OFF)
        box.network = await service.start(box._nursery, box.config, box._netplan, tap_fd,
                                          box.stream, pcap=box._outputs.get("pcap"), owners=owners)

    async def _wait_stage1(self):
        pidfd = os.pidfd_open(self._popen.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self._popen.wait()

    def _finish(self):
        returncode = self._popen.returncode if self._popen.returncode is not None else 1
        wait_status = -returncode if returncode < 0 else returncode << 8
        outcome = self._machine.outcome(wait_status)
        self._status.write(**{"exit-code": outcome.exit_code})
        self._error_exc = outcome.error
        self.result = Result(exit_code=outcome.exit_code, signal=outcome.signal,
                             timed_out=outcome.timed_out, scratch=self._launch.scratch)
        try:
            if self._box.wants_report:
                from .fs.changes import collect_changes

                self._box.changes = collect_changes(
                    self._launch.scratch, overlays=_launch.planned_overlays(self._launch))
        finally:
            box = self._box
            if box._process_exits and not box.wants_report and box._left is not None:
                box._left.append(_launch._scratch_left(self._launch))
            else:  # (with a report, the walk already took longer than removing does)
                _launch._cleanup_scratch(self._launch)

    async def wait(self) -> int:
        """Wait for the command; return its exit code (128+N for signal N).
        Raises SandboxError when the sandbox could not be set up or the
        command could not be executed (``exit_code`` 127/126 then)."""
        await self._done.wait()
        if self._error_exc is not None:
            raise self._error_exc
        return self.result.exit_code

    def send_signal(self, sig: int) -> None:
        """Signal the command (through pid 1, which forwards it)."""
        if self.d_pid is not None and self.result is None:
            _supervise.kill(self.d_pid, sig)

    def _forward(self, sig):
        """A signal the supervisor received (``corral run``): as the
        supervision core decides (keyboard signals the terminal already
        delivered are not sent twice)."""
        if self.result is None:
            _supervise.carry_out(self._machine.signalled(sig))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill everything in the sandbox."""
        self.send_signal(signal.SIGKILL)

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        """Feed ``input`` to stdin, read stdout/stderr to the end."""
        results = {}

        async def drain(name):
            stream = getattr(self, name)
            chunks = []
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                chunks.append(data)
            await stream.aclose()
            results[name] = b"".join(chunks)

        async with trio.open_nursery() as nursery:
            if self.stdin is not None:
                async def feed():
                    if input:
                        await self.stdin.send_all(input)
                    await self.stdin.aclose()

                nursery.start_soon(feed)
            for name in ("stdout", "stderr"):
                if getattr(self, name) is not None:
                    nursery.start_soon(drain, name)
        return results.get("stdout"), results.get("stderr")

    async def _teardown(self):
        if self.result is None and self._machine is not None:
            _supervise.carry_out(self._machine.teardown())
        with trio.move_on_after(5):
            await self._done.wait()


def _stdio_fd(value, default):
    """The fd a Popen stdio argument hands the sandbox (None: a pipe or
    /dev/null of our own, nothing to relay)."""
    if value is None:
        return default
    if isinstance(value, int):
        return value if value >= 0 else None  # PIPE, DEVNULL, STDOUT
    return value.fileno()


# ---------------------------------------------------------------- enter


def enter(config: Config | None = None, **options: Any) -> None:
    """Library mode: from here on this process runs inside a sandbox.

    The calling process forks before anything heavy is loaded: the original
    becomes the supervisor and exits with the sandboxed code's status (it never
    returns); this function returns in the sandboxed copy.
    """
    config = _config(config, options)
    if not _launch.can_fork():
        raise ConfigError(
            "corral.enter() must be called before this process starts threads or loads the "
            "netstack (it forks). Fix: call it first thing, or use corral.open_sandbox()"
        )
    if config.net == "filtered":
        raise ConfigError("corral.enter() supports net='none' and 'host' so far. Fix: use "
                          "corral.open_sandbox() for a filtered network")
    prepared = _launch.prepare(config, [sys.executable])
    prepared.spec["argv"] = None
    relay = _launch.stdio_relay()
    try:
        pid, ctl = _launch.fork_stage1(prepared, relay)
    except stage1.Entered:
        return  # we are E now
    result = _launch.supervise_blocking(config, prepared, pid, ctl, relay=relay)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(result.exit_code)
