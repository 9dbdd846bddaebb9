"""The supervisor's side of starting a sandbox (P in DESIGN §2).

:func:`prepare` turns a :class:`~corral.config.Config` and an argv into the spec
stage-1 needs (mount plan, environment, namespaces) and a scratch directory;
:func:`fork_stage1` / :func:`exec_stage1` start stage-1 (a fork when this process runs no threads
and no Go, else a fresh interpreter); :func:`run_blocking` is the whole
supervisor for sandboxes without a userspace network: no trio, nothing heavy
imported, so ``corral run --net none`` starts fast.
"""

import errno
import fcntl
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

import attrs

from . import _supervise, hardening
from ._remove import remove_tree  # noqa: F401 (public here)
from ._supervise import KEYBOARD_SIGNALS, SETUP_FAILED, error_from  # noqa: F401 (public here)
from .errors import ConfigError, SandboxError
from .spawn import stage1

log = logging.getLogger("corral.launch")

# vnet_hdr: the direct path turns on checksum offload on it (netstack_go/tap.go:
# +14% up, +13% down through iperf3); the pump strips and adds the header.
TAP = {"name": "tap0", "mtu": 65520, "ipv4": "10.0.2.100/24", "gateway4": "10.0.2.2",
       "ipv6": "fd00::100/64", "gateway6": "fd00::2", "txqueuelen": 10000, "vnet_hdr": True}
SANDBOX_RESOLV_CONF = "nameserver 10.0.2.3\noptions edns0 trust-ad\n"


@attrs.frozen(kw_only=True)
class Result:
    """How a sandboxed command ended."""

    exit_code: int
    signal: int | None = None
    timed_out: str | None = None  # None, "term" (ended after SIGTERM) or "kill"
    stdout: bytes | None = None
    stderr: bytes | None = None
    events: tuple = ()
    scratch: str | None = None
    report: dict | None = None  # the audit report (corral audit, --report, --suggest)


@attrs.frozen(kw_only=True)
class Launch:
    """A sandbox ready to start: the spec for stage-1 and where it keeps state."""

    spec: dict
    scratch: str
    warnings: tuple = ()
    keep: object = None  # --keep-changes: a corral.fs.outputs.KeptDir held from before the start
    env_dropped: tuple = ()  # names of the caller's variables the scrub left out


def default_scratch_root():
    return _scratch_place(None).path


def _scratch_place(explicit):
    """Where the per-sandbox scratch directories go: ``--scratch DIR``, else
    $TMPDIR (or /tmp)/corral-<uid> — a filesystem that takes overlayfs upper
    layers — unless another user owns that; then a private place (the
    Place's ``note`` says so)."""
    from . import state

    if explicit:
        path = os.path.abspath(explicit)
        return state.Place(os.path.dirname(path), (os.path.basename(path),))
    shared = state.shared_dir()
    if state.claimable(shared):
        return shared
    fallback = state.private_fallback(os.environ, "scratch", shared.path)
    return attrs.evolve(fallback, names=fallback.names + ("scratch",))


def _private_dir(place):
    """Create (or check) a directory only we can enter; refuse one that
    someone else could have planted, or a symlink.  Return its fd."""
    try:
        return place.open()
    except SandboxError as exc:
        raise ConfigError("scratch directory %s: %s. Fix: remove it, or pass --scratch DIR "
                          "naming a directory of yours" % (place.path, exc.detail or exc.strerror)) from None


def _new_private_dir(parent_fd, parent, prefix):
    """mkdtemp without the tempfile module (random, shutil…: ~4 ms of start-up)."""
    for _ in range(100):
        name = prefix + os.urandom(6).hex()
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            return os.path.join(parent, name)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused name in %s" % parent)


def _hidden_sockets(environ):
    found = []
    sock = environ.get("SSH_AUTH_SOCK")
    if sock and os.path.exists(sock):
        found.append(sock)
    bus = environ.get("DBUS_SESSION_BUS_ADDRESS", "")
    for part in bus.split(";"):
        if part.startswith("unix:"):
            for kv in part[5:].split(","):
                if kv.startswith("path=") and os.path.exists(kv[5:]):
                    found.append(kv[5:])
    runtime = environ.get("XDG_RUNTIME_DIR")
    for name in ("bus", "gnupg", "keyring", "ssh-agent.socket", "gcr", "pulse", "docker.sock"):
        if runtime and os.path.exists(os.path.join(runtime, name)):
            found.append(os.path.join(runtime, name))
    return tuple(dict.fromkeys(found))


def prepare(config, argv, *, environ=None, stdin_is_tty=None):
    """Validate and plan; create the per-sandbox scratch directory."""
    from .fs import plan as fsplan

    argv = [os.fspath(a) for a in argv]
    if not argv:
        raise ConfigError("no command given. Fix: corral run [OPTIONS] -- CMD [ARGS...]")
    environ = os.environ if environ is None else environ
    cwd = _sandbox_cwd(config)
    if not os.path.isdir(cwd):
        raise ConfigError("--cwd %s: no such directory" % cwd)
    _check_status_fd(config.json_status_fd)
    harden = hardening.spec(config)  # may reject input: before anything is created
    keep = None
    if config.keep_changes:
        from .fs.outputs import KeptDir

        keep = KeptDir.prepare(config.keep_changes)
    try:
        place = _scratch_place(config.scratch)
        root_fd = _private_dir(place)
        try:
            scratch = _new_private_dir(root_fd, place.path, "sb-")
        except OSError as exc:
            raise ConfigError(
                "scratch directory %s is not writable (%s). Fix: pass --scratch DIR naming a "
                "writable directory" % (place.path, exc.strerror)
            ) from None
        finally:
            os.close(root_fd)
        notes = [p.note for p in (place,) if p.note]
        protect = _protected(place, notes)
    except BaseException:
        if keep is not None:
            keep.close()
        raise
    try:
        plan = _plan(config, environ, cwd, scratch, protect)
    except BaseException:
        remove_tree(scratch)
        if keep is not None:
            keep.close()
        raise
    if stdin_is_tty is None:
        stdin_is_tty = os.isatty(0)
    env, env_dropped = config.scrub_env(environ)
    spec = {
        "argv": argv,
        "env": env,
        "cwd": cwd,
        "hostname": config.hostname,
        "root": config.root,
        "net": config.net,
        "plan": plan.to_json(),
        "tty": stdin_is_tty,
        "wait_go": config.net == "filtered",
        "tap": TAP,
        "harden": harden,
    }
    return Launch(spec=spec, scratch=scratch, warnings=tuple(notes) + tuple(plan.warnings),
                  keep=keep, env_dropped=tuple(env_dropped))


def _sandbox_cwd(config):
    return os.path.realpath(config.cwd or os.getcwd())


def _protected(place, notes):
    """What every view masks: the scratch place, the default scratch root, the state dir."""
    return [place.path, default_scratch_root(), _state_root(notes)]


def _plan(config, environ, cwd, scratch, protect):
    from .fs import plan as fsplan

    fs_spec = fsplan.FsSpec(
        mode=config.mode,
        cwd=cwd,
        home=os.path.expanduser("~"),
        paths=config.path_actions(),
        hide_secrets=config.hide_secrets,
        hidden_extra=_hidden_sockets(environ),
        scratch=scratch,
        resolv_conf=SANDBOX_RESOLV_CONF if config.net == "filtered" else None,
        runtime_dir=environ.get("XDG_RUNTIME_DIR") or None,
        tmp_size=config.tmp_size,
        allow_sockets=config.allow_socket,
        allow_persist=config.allow_persist,
        protect=protect,
    )
    return fsplan.build_plan(fs_spec, _read("/proc/self/mountinfo"))


def replan(launch, config, environ=None):
    """The plan :func:`prepare` would make now for ``launch``'s sandbox (same
    scratch), as JSON: a sandbox made ready earlier serves a command only while
    this still equals its own (corral warm)."""
    environ = os.environ if environ is None else environ
    protect = _protected(_scratch_place(config.scratch), [])
    return _plan(config, environ, _sandbox_cwd(config), launch.scratch, protect).to_json()


def planned_overlays(launch):
    """``[(upper, host_path)]`` of every overlay in the plan: what the change
    report reads, from the supervisor's memory rather than from a file."""
    from .fs import plan as fsplan

    return fsplan.overlays_of(launch.spec["plan"])


def _state_root(notes):
    """The state directory, created now so that the plan masks it (one made
    later under a writable directory of the view would be visible inside)."""
    from . import state

    place = state.state_place()
    try:
        os.close(place.open())
    except SandboxError as exc:
        notes.append("this sandbox will not appear in `corral ps`: %s" % exc)
    if place.note:
        notes.append(place.note)
    return place.path


def _check_status_fd(fd):
    """--json-status-fd must name an fd open for writing, checked before anything runs."""
    if fd is None:
        return
    fix = "Fix: open it in the shell, e.g. corral run --json-status-fd 3 ... 3>status.jsonl"
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise ConfigError("--json-status-fd %r: expected a file descriptor number. %s" % (fd, fix))
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise ConfigError("--json-status-fd %d: not an open file descriptor. %s" % (fd, fix)) from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise ConfigError("--json-status-fd %d: open for reading only. %s" % (fd, fix))


def _read(path):
    with open(path) as f:
        return f.read()


def can_fork():
    """Forking is safe only while this process runs a single thread and has
    not loaded the Go runtime (DESIGN §2)."""
    return threading.active_count() == 1 and "corral.bindings._netstack" not in sys.modules


def fork_stage1(launch, relay=None, stdio=None):
    """Start C as a fork of this process (only while :func:`can_fork`, from
    the main thread: PR_SET_PDEATHSIG follows the forking thread).  Return
    (pid, ctl socket).  In library mode the child comes back out of this call
    as E, raising :class:`corral.spawn.stage1.Entered`.  ``relay`` (a
    :class:`corral._stdio.Relay`) puts its pipes on C's fds 0-2; ``stdio``,
    three fds or None (``STDOUT``: fd 1's) for C's 0-2 (see :func:`spawn_stage1`)."""
    ours, theirs = _ctl_pair()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        ours.close()

        def prelude():
            if stdio is not None:
                _dup_stdio(stdio)
            if relay is not None:
                relay.dup_into_child()
            if launch.spec["argv"] is not None:  # not corral.enter: its program goes on in E
                _forget_parent(theirs.fileno())

        stage1.stage1(theirs, launch.spec, parent, prelude)  # never returns, but in E
    theirs.close()
    return pid, ours


def _ctl_pair():
    """The ctl socketpair (ours, theirs), both above fd 2: with a closed stdin or
    stdout (``<&-``) an end would land on 0-2, and C would pass it on to the
    command as its stdio."""
    pair = []
    for sock in socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET):
        if sock.fileno() <= 2:
            fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
            sock.close()
            sock = socket.socket(fileno=fd)
        pair.append(sock)
    stage1.passcred(pair[0])
    return tuple(pair)


def _dup_stdio(stdio):
    """In a forked C: put ``stdio`` (fds, None: keep ours, STDOUT: fd 1's) on 0-2, as Popen would."""
    import subprocess

    staged = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) if fd is not None and fd >= 0 else None
              for fd in stdio]  # above 2 first: a source may itself be 0, 1 or 2
    for index, fd in enumerate(staged):
        if fd is not None:
            os.dup2(fd, index)
            os.close(fd)
    if stdio[2] == subprocess.STDOUT:
        os.dup2(1, 2)


def _forget_parent(keep):
    """In a forked C: hold what a fresh interpreter would (stdio and the ctl socket
    ``keep``, as exec_stage1's Popen passes them), not P's other fds (another
    sandbox's pipes, whose EOF would wait for this one), and not an event loop's
    signal handling: its wakeup fd is P's, its handlers P's."""
    os.closerange(3, keep)
    os.closerange(keep + 1, stage1.FD_CEILING)
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig not in stage1.KEEP_OUT and callable(signal.getsignal(sig)):
            signal.signal(sig, signal.SIG_DFL)


class ForkedStage1:
    """A forked C, with the part of :class:`subprocess.Popen` the drivers use."""

    def __init__(self, pid, stdin=None, stdout=None, stderr=None):
        self.pid = pid
        self.returncode = None
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr

    def wait(self):
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def spawn_stage1(launch, relay, stdio=(None, None, None)):
    """Start C from the calling (main) thread: a fork while :func:`can_fork`
    (no interpreter to start), else :func:`exec_stage1`.  ``stdio`` are
    Popen's stdin/stdout/stderr (None, PIPE, DEVNULL, STDOUT, an fd or a file
    object), the relay's pipes in place of what it relays.  Return (process,
    ctl); the process has Popen's ``pid``, ``wait()``, ``returncode`` and, for
    PIPE, ``stdin``/``stdout``/``stderr``."""
    stdio = relay.popen_stdio(stdio)
    if not can_fork():
        return exec_stage1(launch, stdio)
    import subprocess

    child, ours, opened = [None, None, None], [None, None, None], []
    try:
        for index, value in enumerate(stdio):
            if value == subprocess.PIPE:
                r, w = os.pipe2(os.O_CLOEXEC)
                theirs, mine = (r, w) if index == 0 else (w, r)
                opened.append(theirs)
                ours[index] = open(mine, "wb" if index == 0 else "rb", buffering=0)
                child[index] = theirs
            elif value == subprocess.DEVNULL:
                child[index] = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                opened.append(child[index])
            elif value == subprocess.STDOUT and index == 2:
                child[index] = value
            elif value is not None:
                child[index] = value if isinstance(value, int) else value.fileno()
        pid, ctl = fork_stage1(launch, relay, child)
    except BaseException:
        for stream in ours:
            if stream is not None:
                stream.close()
        raise
    finally:
        for fd in opened:
            os.close(fd)
    return ForkedStage1(pid, *ours), ctl


def exec_stage1(launch, stdio=(None, None, None)):
    """Start C as a fresh interpreter (safe from any process, threads and Go
    included).  ``stdio`` are Popen's stdin/stdout/stderr.  Return (Popen, ctl)."""
    import subprocess

    ours, theirs = _ctl_pair()
    fd = theirs.fileno()
    argv = [sys.executable, "-I", "-m", "corral.spawn.stage1", str(fd), str(os.getpid())]
    stdin, stdout, stderr = stdio
    try:
        proc = subprocess.Popen(argv, pass_fds=(fd,), stdin=stdin, stdout=stdout, stderr=stderr)
    finally:
        theirs.close()
    stage1.send(ours, launch.spec)
    return proc, ours


@attrs.define(eq=False)
class Started:
    """A stage-1 started before the supervisor's heavy imports (``corral run``:
    trio, the network, the policy load while C builds the sandbox; issue 11).
    The command waits for P's go (``wait_go``); the trio driver adopts this
    (:meth:`corral.api.Sandbox.start`), and until then :meth:`abandon` kills it
    and releases everything."""

    launch: Launch
    process: object  # ForkedStage1 or Popen
    ctl: socket.socket
    relay: object  # corral._stdio.Relay
    sweeper: "Sweeper | None" = None
    adopted: bool = False
    go: tuple | None = None  # (message, fds) for P's go, when it carries the command

    def take_command(self, config, argv):
        """This sandbox was made ready before its command was known (a warm
        server's spare, started with our fds 0-2 on /dev/null): it runs ``argv``,
        with the environment and stdio this process has now, sent with go."""
        env, dropped = config.scrub_env(os.environ)
        self.launch.spec.update(argv=list(argv), env=env, tty=False)
        self.launch = attrs.evolve(self.launch, env_dropped=tuple(dropped))
        self.relay.close()
        self.relay = stdio_relay()
        present, fds = [], []
        try:
            for index, mine in enumerate(self.relay.child_fds):
                fd = index if mine is None else mine
                try:
                    fds.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3))
                    present.append(True)
                except OSError:  # closed: the command gets it closed
                    present.append(False)
            self.relay.spawned()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.go = ({"go": True, "argv": list(argv), "env": env, "stdio": present}, fds)

    def abandon(self):
        """Not adopted (bad input found later, an exception, Ctrl-C): kill C,
        whose death takes D with it, reap it and remove its scratch (nothing
        ran: nothing for --keep-changes to keep)."""
        if self.adopted:
            return
        self.adopted = True
        try:
            _supervise.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        finally:
            self.ctl.close()
            self.relay.finish()
            if self.sweeper is not None:
                self.sweeper.abandon()
            _discard_scratch(self.launch)


def _discard_scratch(launch):
    """Nothing ran: remove the scratch tree, keep no --keep-changes record."""
    if launch.keep is not None:
        launch.keep.close()
    remove_tree(launch.scratch)


def start_early(config, argv, *, on_warning=None):
    """``corral run``'s start for the trio supervisor: plan, then start C at
    once (a fork: nothing heavy is loaded yet) with the command held until P
    says go, so that P's imports and network set-up overlap C's namespaces and
    mounts.  Return a :class:`Started`."""
    launch = prepare(config, argv)
    launch.spec["wait_go"] = True  # nothing runs before P has its events, outputs, network
    process, ctl, relay, sweeper = _start(launch, on_warning)
    relay.spawned()
    return Started(launch=launch, process=process, ctl=ctl, relay=relay, sweeper=sweeper)


def _start(launch, on_warning):
    """Say the plan's warnings, start C with the stdio relay, then (while this
    process may still fork) the :class:`Sweeper`; (process, ctl, relay, sweeper).
    If C cannot be started, nothing ran: its scratch goes, no record is kept."""
    for warning in launch.warnings:
        if on_warning:
            on_warning(warning)
    relay = stdio_relay()
    try:
        process, ctl = spawn_stage1(launch, relay)
    except BaseException:
        relay.close()
        _discard_scratch(launch)
        raise
    return process, ctl, relay, Sweeper.fork()


def in_terminal_foreground():
    """True when keyboard signals (Ctrl-C…) reach the sandboxed command
    directly because it shares our foreground process group."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class StatusWriter:
    """--json-status-fd: bubblewrap-style JSON lines about the command."""

    def __init__(self, fd):
        self._fd = fd

    def write(self, **fields):
        if self._fd is None:
            return
        try:
            os.write(self._fd, (json.dumps(fields) + "\n").encode())
        except OSError as exc:
            log.warning("cannot write to --json-status-fd %d: %s", self._fd, exc)


def run_blocking(config, argv, *, on_warning=None, on_timeout=None, started=None):
    """Run ``argv`` in a sandbox without a userspace network (``net`` none or
    host) and return its :class:`Result`.  ``started``: a sandbox a warm server
    made ready for it (:meth:`Started.take_command` done)."""
    if config.net == "filtered":
        raise ConfigError("run_blocking() has no network stack; use corral.run() for net='filtered'")
    if started is not None:
        started.adopted = True
        return supervise_blocking(config, started.launch, started.process.pid, started.ctl,
                                  on_timeout=on_timeout, relay=started.relay,
                                  sweeper=started.sweeper, go=started.go)
    launch = prepare(config, argv)
    process, ctl, relay, sweeper = _start(launch, on_warning)
    return supervise_blocking(config, launch, process.pid, ctl, on_timeout=on_timeout, relay=relay,
                              sweeper=sweeper)


def stdio_relay(fds=(0, 1, 2)):
    """The :class:`corral._stdio.Relay` standing in for these stdio fds where
    they name reopenable objects (regular files…; docs/security.md)."""
    from . import _stdio

    return _stdio.Relay(fds)


def supervise_blocking(config, launch, pid, ctl, *, on_timeout=None, relay=None, sweeper=None,
                       go=None):
    """Supervise a started stage-1 without trio: forward SIGTERM, SIGHUP,
    SIGUSR1, SIGUSR2 (and keyboard signals when they cannot reach the command
    by themselves), enforce ``timeout``, relay stdio, return the
    :class:`Result`; what is left to remove goes to ``sweeper`` (a
    :class:`Sweeper`), else :func:`cleanup_later`.  An exception (or a signal
    handler's) kills everything inside before it propagates.  ``go``: (message,
    fds) to send when pid 1 is ready (a stage-1 that waits for its command,
    :attr:`Started.go`)."""
    status = StatusWriter(config.json_status_fd)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in stage1.FORWARDED}
    old_wakeup = signal.set_wakeup_fd(wake_w)
    machine = _supervise.Supervision(
        stage1_pid=pid, now=time.monotonic(), timeout=config.timeout,
        kill_grace=config.kill_grace, keyboard_direct=in_terminal_foreground(),
        wait_go=go is not None)
    registration = []  # the `corral ps` entry: reserved, then listed once the command runs
    left_early = False
    try:
        if relay is not None:
            relay.spawned()
        try:
            left_early = _drive_blocking(
                machine, ctl, wake_r, status, on_timeout, launch, registration, config.timeout,
                leave_early=launch.keep is None and (relay is None or not relay.active), go=go)
        except BaseException:
            _supervise.carry_out(machine.teardown())
            raise
        finally:
            wait_status = _wait_stage1(pid, block=not left_early)
            if relay is not None:
                relay.finish()
        outcome = machine.outcome(wait_status)
        status.write(**{"exit-code": outcome.exit_code})
        for entry in registration:
            if entry.published:  # (the command ran)
                entry.write_event(exit_record(outcome.exit_code, outcome.signal, entry.id))
        if outcome.error is not None:
            raise outcome.error
        return Result(exit_code=outcome.exit_code, signal=outcome.signal,
                      timed_out=outcome.timed_out, scratch=launch.scratch)
    finally:
        left = [entry.close(remove=False) for entry in registration]
        ctl.close()
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)
        (sweeper.finish if sweeper is not None else cleanup_later)([_scratch_left(launch), *left])


def _drive_blocking(machine, ctl, wake_r, status, on_timeout, launch, registration, timeout,
                    leave_early, go=None):
    """The select loop around :class:`corral._supervise.Supervision`; True when it
    left once pid 1 reported the command's exit (``leave_early``), not waiting for
    stage-1's exit."""
    leave = False
    reserve = True
    while not machine.finished:
        if reserve and machine.d_pid is not None:  # while pid 1 builds the sandbox
            reserve = False
            registration.extend(_reserve(launch, machine.d_pid))
        timer = machine.next_timer()
        wait = None if timer is None else max(0.0, timer - time.monotonic())
        try:
            ready, _, _ = select.select([ctl, wake_r], [], [], wait)
        except InterruptedError:
            continue
        actions = []
        if wake_r in ready:
            for sig in os.read(wake_r, 64):
                actions += machine.signalled(sig)
        if ctl in ready:
            message, fds = stage1.recv(ctl)
            actions += machine.received(message, fds)
        actions += machine.tick(time.monotonic())
        for action in actions:
            if isinstance(action, _supervise.CommandStarted):
                status.write(**{"child-pid": action.pid})
                _register(launch, registration, action.pid)
            elif isinstance(action, _supervise.TimedOut):
                if on_timeout:
                    on_timeout(timeout)
            elif isinstance(action, _supervise.StartNetwork):
                os.close(action.fd)  # no userspace network on this path
            elif isinstance(action, _supervise.CommandExited):
                leave = leave_early
            elif isinstance(action, _supervise.SendGo):
                message, fds = go
                try:
                    stage1.send(ctl, message, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
            else:
                _supervise.carry_out([action])
        if leave:
            return True
    return False


def _wait_stage1(pid, block=True):
    """Stage-1's wait status.  Without ``block``, when it has not exited yet, 0: the
    command's exit was reported and nothing more is read from inside, so its exit
    (pid 1's and its own: the end of every process inside, a few ms) is not waited
    for; it is reaped later (:func:`_reap_helpers`), or by init once this process
    exits, which kills it if it still runs (PR_SET_PDEATHSIG)."""
    done, wait_status = os.waitpid(pid, 0 if block else os.WNOHANG)
    if not done:
        _UNREAPED.append(pid)
    return wait_status


def _cleanup_scratch(launch):
    """Keep the overlay record where --keep-changes asks, else remove scratch, now."""
    scratch = _scratch_left(launch)
    if scratch is not None:
        remove_tree(scratch)


def _scratch_left(launch):
    """--keep-changes: move the scratch tree where it asks, and return None (also when it
    cannot: the changes then stay in scratch, and a warning says where); else the scratch
    tree, to remove."""
    if launch.keep is None:
        return launch.scratch
    try:
        why = launch.keep.keep(launch.scratch)
    finally:
        launch.keep.close()
    if why is not None:
        log.warning("cannot keep changes in %s (%s); they are in %s", launch.keep.path, why,
                    launch.scratch)
    return None


class Sweeper:
    """A helper forked at the start, while this process may fork (no threads, no
    Go), that removes what the sandbox leaves once this process is done with it:
    the scratch tree (10-20 ms for a few dozen overlay directories), the state
    entry, and the last close of fds given to it (a TAP device's: unregistering it
    waits for RCU grace periods, ~40 ms).  At the end, :meth:`finish` is one
    message on a socket: nothing to start then (a vfork and exec waits for the
    exec, which on a busy host waits for a CPU: 3-20 ms).  It holds nothing of
    ours but that socket (/dev/null as stdio: a pipe reading our output ends with
    us), is in a session of its own (Ctrl-C is not for it) and ends on the
    socket's end: removing nothing when it ends without a message (this process
    was killed: nothing it did not finish is removed, a --keep-changes record
    included)."""

    def __init__(self, sock, pid):
        self._sock = sock
        self.pid = pid

    def __repr__(self):
        return "<Sweeper pid=%d%s>" % (self.pid, "" if self._sock else " done")

    @classmethod
    def fork(cls):
        """The helper, or None when this process may not fork (or the fork fails:
        :func:`cleanup_later` then does the work at the end)."""
        _reap_helpers()
        if not can_fork():
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as exc:
            log.debug("no sweeper (%s): cleaning up at the end", exc)
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            try:
                _sweep(theirs)
            finally:
                os._exit(0)
        theirs.close()
        return cls(ours, pid)

    def finish(self, paths, fds=()):
        """Have ``paths`` (None ones skipped) removed and ``fds`` closed last, by
        the helper, once this process has closed them (here: ours are closed)."""
        paths = [os.fsencode(path) for path in paths if path is not None]
        message = b"".join(path + b"\0" for path in paths) or b"\0"
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]
        try:
            if self._sock is None:
                raise BrokenPipeError(errno.EPIPE, "already ended")
            self._sock.sendmsg([message], rights if fds else [])
            paths = []
        except OSError as exc:  # the helper is gone: do it here
            log.debug("the sweeper is gone (%s): cleaning up here", exc)
        finally:
            for fd in fds:
                os.close(fd)
            self.abandon()
        for path in paths:
            remove_tree(os.fsdecode(path))

    def abandon(self):
        """End the helper without a word: it removes nothing."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            _UNREAPED.append(self.pid)


def _sweep(sock):
    """The Sweeper's body, in the forked helper."""
    os.setsid()
    signal.set_wakeup_fd(-1)  # an event loop's, closed below
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, stage1.FD_CEILING)
    message, _, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
    for path in message.split(b"\0")[:-1]:  # the fds passed stay open until we exit
        if path:
            remove_tree(os.fsdecode(path))


def cleanup_later(paths, fds=()):
    """Leave to a detached helper what this process need not wait for: removing
    ``paths`` (None ones skipped: a scratch tree, 10-20 ms for a few dozen overlay
    directories; a state entry) and the last close of ``fds`` (a TAP device's:
    unregistering it waits for RCU grace periods, ~40 ms), which happens when the
    helper exits.  The helper is a fresh interpreter without site-packages running
    :mod:`corral._remove` (stdlib only: a few ms of CPU, in the background), started
    by vfork and exec: safe from a process that runs threads or Go, and well under a
    millisecond of this one's time.  Call it last: the helper's start then competes
    with nothing this process still does.  Nobody waits for it: it outlives a
    process that exits, and one that goes on reaps it later (:func:`_reap_helpers`).
    ``fds`` are closed here either way; if the helper cannot start, the paths are
    removed here."""
    paths = [os.fspath(path) for path in paths if path is not None]
    if AFTER_EXIT is not None:  # a warm worker: after it has reported the exit status
        AFTER_EXIT.append(lambda: _cleanup_now(paths, fds))
        return
    _reap_helpers()
    try:
        if paths or fds:
            import subprocess

            from . import _remove

            _HELPERS.append(subprocess.Popen(
                [sys.executable, "-I", "-S", _remove.__file__, *paths], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=tuple(fds),
                start_new_session=True))
            paths = []
    except OSError as exc:
        log.debug("the clean-up helper did not start (%s): cleaning up here", exc)
    finally:
        for fd in fds:
            os.close(fd)
    for path in paths:
        remove_tree(path)


def _cleanup_now(paths, fds):
    for path in paths:
        remove_tree(path)
    for fd in fds:
        os.close(fd)


# A list in a warm server's worker (corral.warm.server), which reports the exit
# status first and then runs these itself: no helper process needed.
AFTER_EXIT = None


def _reap_helpers():
    """Reap the clean-up helpers, sweepers and stage-1 processes that have exited
    since (a process that runs many sandboxes keeps no zombie but the last ones)."""
    _HELPERS[:] = [helper for helper in _HELPERS if helper.poll() is None]
    _UNREAPED[:] = [pid for pid in _UNREAPED if not reaped(pid)]


def reaped(pid):
    """Whether our child ``pid`` has ended (and is reaped now), without waiting."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return bool(done)


_HELPERS = []  # cleanup_later's helpers: reaped when done, as the next one starts
_UNREAPED = []  # pids of sweepers and of stage-1s not waited for (_wait_stage1): likewise


def _reserve(launch, d_pid):
    """The `corral ps` entry, made while pid 1 builds the sandbox: [it], or []
    when the state directory is unusable (a warning says so)."""
    from . import state

    entry = state.reserve_quietly(spec=launch.spec, supervisor_pid=os.getpid(), d_pid=d_pid)
    return [] if entry is None else [entry]


def _register(launch, registration, child):
    """The command runs: list the reserved entry for `corral ps/logs/stop/exec` (no
    events stream here: the start and exit records are written directly)."""
    for entry in list(registration):
        try:
            entry.publish(child)
        except OSError as exc:
            log.warning("this sandbox will not appear in `corral ps`: %s", exc)
            registration.remove(entry)
            entry.close()
            continue
        entry.write_event(start_record(launch.spec["argv"], child, entry.id,
                                       env_dropped=launch.env_dropped))


# The blocking path cannot import corral.events (trio, the policy package: tens of
# ms of start-up); these are SandboxStartEvent/SandboxExitEvent's to_dict(), which
# tests/test_supervise.py checks field for field.
def start_record(argv, pid, sandbox_id, mode="run", env_dropped=()):
    return {"type": "sandbox_start", "argv": list(argv or ()), "pid": pid,
            "sandbox_id": sandbox_id, "mode": mode, "env_dropped": list(env_dropped),
            "ts": time.time()}


def exit_record(exit_code, sig, sandbox_id):
    return {"type": "sandbox_exit", "exit_code": exit_code, "signal": sig,
            "sandbox_id": sandbox_id, "ts": time.time()}
