"""One supervision state machine for every way corral runs a sandbox (sans-io).

P supervises stage-1 (C) and pid 1 (D) through the ctl socket (see
:mod:`corral.spawn.stage1`).  :class:`Supervision` holds the whole protocol:
it takes what happened — a ctl message, the clock, a signal P received, the
end of the ctl stream, a request to tear everything down — and returns the
actions the driver must carry out.  It does no I/O and imports nothing heavy,
so the blocking driver (:func:`corral.launch.supervise_blocking`, ``--net
none``/``host``: start-up is measured) and the trio driver
(:class:`corral.api.Process`, ``run``/``open_sandbox``) behave the same:
same exit codes, same errors, same timeout and kill handling.

Actions, in the order the driver must carry them out:

- :class:`Kill` ``(pid, sig)``: signal a process (ESRCH ignored).
- :class:`StartNetwork` ``(fd)``: D sent the TAP device; start the netstack.
- :class:`SendGo`: tell D to run the command (after the network is up).
- :class:`CommandStarted` ``(pid)``: the command runs: report the pid
  (``--json-status-fd``), register it for ``corral ps``, emit
  ``sandbox_start``.
- :class:`TimedOut` ``(seconds)``: the timeout fired (SIGTERM follows).
- :class:`CommandExited`: pid 1 reported the command's exit.  What is left is
  stage-1's exit (pid 1's and its own, which end every process inside: a few
  ms); a driver that reads nothing more from inside need not wait for it.
- :class:`CloseFds` ``(fds)``: fds that came with a message nobody uses.

At the end :meth:`Supervision.outcome` turns what was seen and stage-1's wait
status into a :class:`~corral.launch.Result` or the :class:`SandboxError`
to raise.
"""

import errno
import os
import signal

import attrs

from .errors import SandboxError

SETUP_FAILED = 125  # corral itself failed before the command ran (like docker run)
TIMED_OUT = 124  # like timeout(1)
KEYBOARD_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGWINCH)


@attrs.frozen
class Kill:
    pid: int
    sig: int


@attrs.frozen
class StartNetwork:
    fd: int
    diag: int | None = None  # the sandbox's sock_diag socket (corral.net.owner), when sent


@attrs.frozen
class SendGo:
    pass


@attrs.frozen
class CommandStarted:
    pid: int | None


@attrs.frozen
class CommandExited:
    pass


@attrs.frozen
class TimedOut:
    seconds: float


@attrs.frozen
class CloseFds:
    fds: tuple


@attrs.frozen(kw_only=True)
class Outcome:
    """How the sandbox ended: ``error`` (raise it) or the exit code/signal."""

    exit_code: int
    signal: int | None = None
    timed_out: str | None = None
    error: SandboxError | None = None


@attrs.define(kw_only=True)
class Supervision:
    """The supervision protocol of one sandbox.  ``now`` is any monotonic
    clock the driver uses consistently (seconds)."""

    stage1_pid: int
    now: float
    timeout: float | None = None
    kill_grace: float = 2.0
    wait_go: bool = False
    keyboard_direct: bool = False  # the terminal delivers Ctrl-C… to the command itself

    d_pid: int | None = None
    pid: int | None = None  # the command's pid, in P's pid namespace
    timed_out: str | None = None  # None, "term" or "kill"
    exit_report: dict | None = None
    error: dict | None = None
    finished: bool = False  # the ctl stream ended: only waiting for stage-1 is left
    torn_down: bool = False
    _deadline: float | None = None
    _kill_at: float | None = None
    _ready: bool = False

    def __attrs_post_init__(self):
        if self.timeout:
            self._deadline = self.now + self.timeout

    def next_timer(self):
        """When :meth:`tick` must be called next (None: no timer)."""
        if self._kill_at is not None:
            return self._kill_at
        if self.timed_out is None and self.d_pid is not None:
            return self._deadline
        return None

    def tick(self, now):
        """The clock moved: enforce the timeout and the kill grace."""
        if self._kill_at is not None and now >= self._kill_at:
            self.timed_out, self._kill_at = "kill", None
            return [Kill(self.d_pid, signal.SIGKILL)]
        if (self._deadline is not None and self.timed_out is None and self.d_pid is not None
                and now >= self._deadline and not self.finished):
            self.timed_out = "term"
            self._kill_at = now + self.kill_grace
            return [TimedOut(self.timeout), Kill(self.d_pid, signal.SIGTERM)]
        return []

    def received(self, message, fds=()):
        """A ctl message from C or D (``None``: the stream ended)."""
        fds = list(fds)
        actions = []
        if message is None:
            self.finished = True
            self._kill_at = None
        elif "d_pid" in message:
            # Once, from C, before anything ran: it is the pid P signals.
            if self.d_pid is None and isinstance(message["d_pid"], int):
                self.d_pid = message["d_pid"]
        elif "tap" in message:
            if fds and not self._ready:
                tap = fds.pop(0)
                actions.append(StartNetwork(tap, fds.pop(0) if message.get("diag") and fds else None))
        elif "ready" in message:
            self._ready = True
            if self.wait_go:
                actions.append(SendGo())
        elif "child" in message:
            if self.pid is None:
                self.pid = message.get("pid")
                actions.append(CommandStarted(self.pid))
        elif "exit" in message:
            if self.exit_report is None:
                actions.append(CommandExited())
            self.exit_report = message
        elif "error" in message and isinstance(message["error"], dict):
            self.error = message["error"]
        if fds:
            actions.append(CloseFds(tuple(fds)))
        return actions

    def signalled(self, sig):
        """P received ``sig``: pass it to pid 1, which passes it on.  Keyboard
        signals are skipped when the terminal already delivered them."""
        if sig in KEYBOARD_SIGNALS and self.keyboard_direct:
            return []
        if self.d_pid is None or self.finished:
            return []
        return [Kill(self.d_pid, sig)]

    def teardown(self):
        """Kill everything inside (cancellation, an exception, the caller
        closing the sandbox): pid 1 takes its whole pid namespace with it,
        and stage-1's death kills a pid 1 that has not reported yet
        (PR_SET_PDEATHSIG)."""
        if self.torn_down:
            return []
        self.torn_down = True
        actions = [Kill(self.d_pid, signal.SIGKILL)] if self.d_pid is not None else []
        return actions + [Kill(self.stage1_pid, signal.SIGKILL)]

    def outcome(self, wait_status):
        """The end, once stage-1 was reaped with ``wait_status`` (os.waitpid's)."""
        if self.error is not None and self.exit_report is None:
            exc = error_from(self.error)
            return Outcome(exit_code=exc.exit_code, error=exc)
        if self.timed_out == "kill":
            return Outcome(exit_code=128 + signal.SIGKILL, signal=signal.SIGKILL, timed_out="kill")
        report = self.exit_report or {}
        if self.timed_out == "term":
            return Outcome(exit_code=TIMED_OUT, signal=report.get("signal"), timed_out="term")
        if self.exit_report is not None and isinstance(report.get("exit"), int):
            return Outcome(exit_code=report["exit"], signal=report.get("signal"))
        # D vanished without a report: killed from outside (or torn down).
        code = os.waitstatus_to_exitcode(wait_status)
        if code < 0:
            return Outcome(exit_code=128 - code, signal=-code)
        return Outcome(exit_code=code)


def error_from(report):
    """The :class:`SandboxError` for a step failure C or D reported."""
    code = report.get("exit_code")
    if code == 127 and report.get("step", "").startswith("exec: missing"):
        # the command is there, its ELF loader or #! interpreter is not
        return SandboxError(report["step"], report.get("errno"), exit_code=code,
                            message="%s. Fix: %s" % (report.get("detail"), report.get("fix")))
    if code in (126, 127):  # like a shell: "CMD: command not found"
        return SandboxError(
            "exec", report.get("errno"), exit_code=code,
            message="%s: %s" % (report.get("detail"),
                                "command not found" if code == 127 else "permission denied"),
        )
    return SandboxError(
        report.get("step", "set-up"), report.get("errno"), report.get("fix"), report.get("detail"),
        exit_code=SETUP_FAILED,
    )


def carry_out(actions):
    """The actions every driver carries out the same way: kills and fd closes (the
    others — start the network, a started command, a timeout — are the driver's own)."""
    for action in actions:
        if isinstance(action, Kill):
            kill(action.pid, action.sig)
        elif isinstance(action, CloseFds):
            for fd in action.fds:
                os.close(fd)


def kill(pid, sig):
    """Signal ``pid``; a process already gone is not an error."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
