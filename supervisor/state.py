"""Running sandboxes: a per-user state directory that ``corral ps``, ``logs``,
``stop`` and ``exec`` read.

    $XDG_RUNTIME_DIR/corral/            (when XDG_RUNTIME_DIR is set and usable)
    /tmp/corral-<uid>/run/              (otherwise)
      <id>/info.json                    who runs what: pids, argv, net mode, the
                                        spec another process inside needs
      <id>/events.jsonl                 every event of the sandbox, flushed live

Every directory is 0700 and must be owned by the caller (a directory someone
else planted is refused).  A sandbox registers when its command starts and
removes its directory when it ends; an entry whose supervisor is gone (a
crash, SIGKILL) is stale and :func:`list_running` prunes it.  Pids are checked
together with their start time, so a recycled pid is not taken for the
supervisor.  Standard library and attrs only: the blocking supervisor imports
this.
"""

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import stat
import time

import attrs

from .errors import ConfigError, SandboxError

log = logging.getLogger("corral.state")

FALLBACK = "/tmp/corral-%d/run"
INFO = "info.json"
EVENTS = "events.jsonl"
ID_HEX = 8
# Spec keys another process inside needs: everything but the mount plan and
# the TAP settings (pid 1 already applied those).  Whatever E-restrictions
# ``stage1._become_command`` reads (seccomp, capabilities, rlimits…) come along.
_SPEC_SKIP = ("plan", "tap", "argv", "wait_go")


def state_root(environ=None):
    """The state directory for this user (not created)."""
    environ = os.environ if environ is None else environ
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and _usable(runtime):
        return os.path.join(runtime, "corral")
    return FALLBACK % os.getuid()


def _usable(path):
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and os.access(path, os.W_OK | os.X_OK))


def _private_dir(path):
    """Create ``path`` 0700 (parents too), or check that it is ours."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise SandboxError("state directory", exc.errno, detail=path,
                           fix="set XDG_RUNTIME_DIR to a directory you own") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SandboxError(
            "state directory", errno.EPERM,
            detail="%s is not a directory owned by you (uid %d)" % (path, os.getuid()),
            fix="remove it, or set XDG_RUNTIME_DIR to a directory you own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def _ensure_root(root):
    if root.startswith(FALLBACK.split("%")[0]):
        _private_dir(os.path.dirname(root))  # /tmp/corral-<uid> itself
    _private_dir(root)
    return root


def proc_start_time(pid):
    """The start time of ``pid`` (clock ticks since boot), or None when it is
    gone; a pid plus this identifies one process across pid reuse."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19])  # field 22 overall


def alive(pid, start_time):
    return pid is not None and start_time is not None and proc_start_time(pid) == start_time


@attrs.frozen(kw_only=True)
class Running:
    """One registered sandbox, as ``info.json`` describes it."""

    id: str
    path: str
    info: dict = attrs.field(repr=False)

    @property
    def events_path(self):
        return os.path.join(self.path, EVENTS)

    @property
    def supervisor_pid(self):
        return self.info["supervisor_pid"]

    @property
    def d_pid(self):
        return self.info["d_pid"]

    @property
    def argv(self):
        return self.info.get("argv") or []

    @property
    def started(self):
        return self.info["started"]

    @property
    def net(self):
        return self.info.get("net")

    @property
    def spec(self):
        return self.info["spec"]

    def supervisor_alive(self):
        return alive(self.info["supervisor_pid"], self.info.get("supervisor_start"))

    def pid1_alive(self):
        return alive(self.info["d_pid"], self.info.get("d_start"))

    def __repr__(self):
        return "<Running id=%s pid=%s %s>" % (self.id, self.supervisor_pid, " ".join(self.argv)[:40])


class Registration:
    """A sandbox's entry while it runs: write events with :meth:`write_event`,
    end it with :meth:`close` (idempotent; removes the directory)."""

    def __init__(self, id, path):
        self.id = id
        self.path = path
        self.events_path = os.path.join(path, EVENTS)
        self._events = None

    def __repr__(self):
        return "<Registration id=%s %s>" % (self.id, "closed" if self.path is None else self.path)

    def open_events(self):
        """The events file, opened for appending (the caller owns it)."""
        return open(self.events_path, "a", encoding="utf-8")

    def write_event(self, record):
        """Append one event record (a dict with at least ``type``), flushed."""
        if self.path is None:
            return
        if self._events is None:
            self._events = self.open_events()
        self._events.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
        self._events.flush()

    def close(self):
        if self.path is None:
            return
        if self._events is not None:
            self._events.close()
            self._events = None
        shutil.rmtree(self.path, ignore_errors=True)
        self.path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def register(*, spec, supervisor_pid, d_pid, command_pid=None, root=None):
    """Record a sandbox whose command just started; return its
    :class:`Registration`.  Raises SandboxError when the state directory is
    unusable (see :func:`register_quietly`)."""
    root = _ensure_root(root or state_root())
    for _ in range(16):
        sandbox_id = os.urandom(ID_HEX // 2).hex()  # (the secrets module costs ~5 ms of start-up)
        path = os.path.join(root, sandbox_id)
        try:
            os.mkdir(path, 0o700)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise SandboxError("state directory", exc.errno, detail=path,
                               fix="set XDG_RUNTIME_DIR to a directory you own") from None
    else:
        raise SandboxError("state directory", errno.EEXIST, detail="no free sandbox id in " + root)
    info = {
        "id": sandbox_id,
        "argv": spec.get("argv"),
        "cwd": spec.get("cwd"),
        "net": spec.get("net"),
        "supervisor_pid": supervisor_pid,
        "supervisor_start": proc_start_time(supervisor_pid),
        "d_pid": d_pid,
        "d_start": proc_start_time(d_pid) if d_pid else None,
        "command_pid": command_pid,
        "started": time.time(),
        "spec": {k: v for k, v in spec.items() if k not in _SPEC_SKIP},
    }
    registration = Registration(sandbox_id, path)
    try:
        _write_json(os.path.join(path, INFO), info)
        open(registration.events_path, "a").close()
    except OSError as exc:
        registration.close()
        raise SandboxError("state directory", exc.errno, detail=path) from None
    log.debug("registered sandbox %s in %s", sandbox_id, path)
    return registration


def register_quietly(**kw):
    """:func:`register`, but a state directory problem is a warning, not a
    failure: the sandbox runs either way, it just cannot be listed."""
    try:
        return register(**kw)
    except SandboxError as exc:
        log.warning("this sandbox will not appear in `corral ps`: %s", exc)
        return None


def _write_json(path, data):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.rename(tmp, path)


def _load(root, name):
    path = os.path.join(root, name)
    try:
        with open(os.path.join(path, INFO), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return Running(id=name, path=path, info=info)


def list_running(root=None, *, prune=True):
    """Every registered sandbox whose supervisor still runs, oldest first.
    With ``prune``, entries whose supervisor is gone are removed."""
    root = root or state_root()
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if len(name) != ID_HEX or name.strip("0123456789abcdef"):
            continue
        entry = _load(root, name)
        if entry is None:
            # Being created (info.json not yet renamed in) or half removed:
            # stale only once it is old.
            _prune_partial(os.path.join(root, name), prune)
            continue
        if entry.supervisor_alive():
            found.append(entry)
        elif prune:
            log.info("pruning stale sandbox %s (supervisor %s is gone)", name, entry.supervisor_pid)
            shutil.rmtree(entry.path, ignore_errors=True)
    return sorted(found, key=lambda e: e.started)


def _prune_partial(path, prune, age=60.0):
    with contextlib.suppress(OSError):
        if prune and time.time() - os.lstat(path).st_mtime > age:
            shutil.rmtree(path, ignore_errors=True)


def find(id_or_prefix, root=None):
    """The running sandbox whose id is, or starts with, ``id_or_prefix``
    (unique, like a git hash).  ConfigError when none or several match."""
    prefix = id_or_prefix.lower()
    if not prefix or prefix.strip("0123456789abcdef"):
        raise ConfigError("%r is not a sandbox id (hex digits). Fix: see `corral ps`" % id_or_prefix)
    matches = [e for e in list_running(root) if e.id.startswith(prefix)]
    if not matches:
        raise ConfigError("no running sandbox with id %s. Fix: see `corral ps`" % id_or_prefix)
    if len(matches) > 1:
        raise ConfigError("sandbox id %s is ambiguous (%s). Fix: give more digits"
                          % (id_or_prefix, ", ".join(e.id for e in matches)))
    return matches[0]


# ---------------------------------------------------------------- reading events


def read_events(entry_or_path):
    """The sandbox's events so far, as dicts (a torn last line is skipped)."""
    path = getattr(entry_or_path, "events_path", entry_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    return list(_parse_lines(text.split("\n")[:-1]))


def _parse_lines(lines):
    for line in lines:
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                log.debug("skipping a malformed event line: %r", line[:80])


def open_connections(events):
    """Connections the sandbox has open: allowed connect events without their
    close event."""
    opened = set()
    for ev in events:
        if ev.get("type") == "connect" and ev.get("verdict") == "allow":
            opened.add(ev.get("id"))
        elif ev.get("type") == "close":
            opened.discard(ev.get("id"))
    return len(opened)


def follow_events(entry, *, poll=0.2, until_exit=True):
    """Yield the sandbox's events, then new ones as they are written, until its
    exit record (or, with no exit record, until its supervisor is gone)."""
    try:
        f = open(entry.events_path, encoding="utf-8")
    except FileNotFoundError:
        return  # ended between find() and here
    with f:
        partial = ""
        while True:
            chunk = f.read()
            if chunk:
                lines = (partial + chunk).split("\n")
                partial = lines.pop()
                for ev in _parse_lines(lines):
                    yield ev
                    if until_exit and ev.get("type") == "sandbox_exit":
                        return
                continue
            if not entry.supervisor_alive():
                # One last read: the supervisor may have written before leaving.
                for ev in _parse_lines((partial + f.read()).split("\n")):
                    yield ev
                return
            time.sleep(poll)


# ---------------------------------------------------------------- stop


def stop(entry, *, grace=10.0, wait=5.0):
    """Stop a running sandbox: SIGTERM to its pid 1 (which forwards it to the
    command, as the supervisor does with a SIGTERM it receives), SIGKILL to
    pid 1 after ``grace`` seconds (ending everything inside), then wait for
    the supervisor to record the exit and leave.  Return "term", "kill" or
    "gone" (it had already ended).  SandboxError if the supervisor does not
    leave within ``wait`` seconds of the SIGKILL."""
    if not entry.supervisor_alive():
        return "gone"
    how = "term"
    if entry.pid1_alive():
        _signal(entry.d_pid, signal.SIGTERM)
        if not _wait_gone(entry, grace):
            how = "kill"
            if entry.pid1_alive():
                _signal(entry.d_pid, signal.SIGKILL)
    if not _wait_gone(entry, wait if how == "kill" else grace):
        if entry.pid1_alive():
            raise SandboxError("stop", errno.ETIMEDOUT, detail="sandbox %s (pid 1 %d) did not die"
                               % (entry.id, entry.d_pid))
        # pid 1 is gone but the supervisor hangs on: it is no longer supervising anything.
        _signal(entry.supervisor_pid, signal.SIGKILL)
        _wait_gone(entry, wait)
    return how


def _signal(pid, sig):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(entry, timeout):
    """Wait until the supervisor exits (pidfd, no polling)."""
    import select

    try:
        fd = os.pidfd_open(entry.supervisor_pid)
    except ProcessLookupError:
        return True
    try:
        if not entry.supervisor_alive():  # the pid was reused before pidfd_open
            return True
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


# ---------------------------------------------------------------- exec


def exec_in(entry, argv, *, env=None, cwd=None):
    """Run ``argv`` inside the running sandbox ``entry`` (its namespaces, its
    root, its network and policy, the command's restrictions and environment,
    plus ``env`` overrides) and return its exit status (128+N for signal N).
    SIGTERM, SIGHUP, SIGUSR1, SIGUSR2 (and keyboard signals that do not reach
    it directly) are forwarded.  SandboxError when it cannot be entered or the
    command cannot be executed (``exit_code`` 125, or 127/126 like a shell)."""
    from . import launch
    from .spawn import enter

    argv = [os.fspath(a) for a in argv]
    if not argv:
        raise ConfigError("no command given. Fix: corral exec ID -- CMD [ARGS...]")
    if not entry.pid1_alive():
        raise SandboxError("exec", errno.ESRCH, detail="sandbox %s has ended" % entry.id,
                           fix="see `corral ps`", exit_code=125)
    spec = dict(entry.spec)
    spec["env"] = {**spec["env"], **(env or {})}
    if cwd is not None:
        spec["cwd"] = cwd
    spec["tty"] = os.isatty(0)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, enter.SIGNALS)
    try:
        try:
            pid = _start_enter(entry.d_pid, spec, argv, err_r, err_w)
        finally:
            os.close(err_w)
        code = _relay(pid)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    with open(err_r, "rb") as f:
        report = f.read()
    if report:
        raise launch.error_from(json.loads(report))
    return code


def _start_enter(d_pid, spec, argv, err_r, err_w):
    """Start Y: a fork when this process is single-threaded without Go (setns
    into a user namespace needs that), else a fresh interpreter."""
    import sys

    from . import launch
    from .spawn import enter

    parent = os.getpid()
    if launch.can_fork():
        pid = os.fork()
        if pid == 0:
            os.close(err_r)
            enter.run(d_pid, spec, argv, err_w, parent)  # never returns
        return pid
    request = os.memfd_create("corral-exec")
    try:
        os.write(request, json.dumps({"d_pid": d_pid, "spec": spec, "argv": argv}).encode())
        os.lseek(request, 0, os.SEEK_SET)
        os.set_inheritable(request, True)
        os.set_inheritable(err_w, True)
        return os.posix_spawn(
            sys.executable,
            [sys.executable, "-I", "-m", "corral.spawn.enter", str(request), str(err_w), str(parent)],
            os.environ)
    finally:
        os.close(request)


def _relay(pid):
    """Wait for Y, forwarding signals sent to us (not the terminal's copies,
    which reach the command directly when it shares our process group)."""
    from .spawn import enter, stage1

    while True:
        info = signal.sigwaitinfo(enter.SIGNALS)
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                return 128 - code if code < 0 else code
        elif info.si_code != stage1.SI_KERNEL:
            _signal(pid, info.si_signo)
