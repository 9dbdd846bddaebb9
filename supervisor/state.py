"""Running sandboxes: a per-user state directory that ``corral ps``, ``logs``,
``stop`` and ``exec`` read.

    $XDG_RUNTIME_DIR/corral/            (when XDG_RUNTIME_DIR is set and usable)
    /tmp/corral-<uid>/run/              (otherwise, unless someone else owns
                                        /tmp/corral-<uid>; then
    ~/.local/state/corral/run/          ($XDG_STATE_HOME) — said once at `corral run`)
      <id>/info.json                    where the supervisor is: its pid, start
                                        time and the fd of its sealed record
      <id>/events.jsonl                 every event of the sandbox, flushed live

Every directory of corral's is 0700 and owned by the caller, checked at every
use: each component is opened with ``O_NOFOLLOW`` relative to its parent's fd
(a symlink, or a directory someone else planted, is refused).  No sandbox can
reach the state directory: the mount plan masks it in every view
(:mod:`corral.fs.plan`, ``protect``).  Even so nothing that matters is trusted
from a file: what a sandbox is (its pids, argv, the spec ``corral exec`` needs)
lives in a sealed memfd the supervisor holds, read through
``/proc/<supervisor>/fd/<n>`` after checking that the supervisor is the same
process (pid plus start time) in our own user and pid namespaces — a sandboxed
process can be neither.  A sandbox registers when its command starts and
removes its directory when it ends; an entry whose supervisor is gone (a
crash, SIGKILL) is stale and :func:`list_running` prunes it.  Standard library
and attrs only: the blocking supervisor imports this.
"""

import contextlib
import errno
import fcntl
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

SHARED = "/tmp"  # /tmp/corral-<uid>: the fallback state root's parent and the default scratch root
INFO = "info.json"
EVENTS = "events.jsonl"
ID_HEX = 8
RECORD_MAX = 16 * 1024 * 1024  # a supervisor's record (the spec holds the environment)
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# Spec keys another process inside needs: everything but the mount plan and
# the TAP settings (pid 1 already applied those).  Whatever E-restrictions
# ``stage1._become_command`` reads (seccomp, capabilities, rlimits…) come along.
_SPEC_SKIP = ("plan", "tap", "argv", "wait_go")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@attrs.frozen
class Place:
    """A private directory: ``base`` (a directory that is not corral's, such
    as /tmp or $XDG_RUNTIME_DIR) and the components corral creates below it,
    each 0700 and owned by the caller.  ``note``: why this place and not the
    usual one (a fallback), else None."""

    base: str
    names: tuple
    note: str | None = None

    @property
    def path(self):
        return os.path.join(self.base, *self.names)

    def open(self, create=True):
        """A directory fd of :attr:`path`, every corral component checked."""
        return open_private(self.base, self.names, create=create)


def shared_dir():
    """/tmp/corral-<uid> (TMPDIR's, when set): scratch and the fallback state."""
    return Place(os.environ.get("TMPDIR") or SHARED, ("corral-%d" % os.getuid(),))


def private_fallback(environ, what, foreign):
    """Where corral keeps ``what`` when the shared place ``foreign`` belongs
    to someone else: under $XDG_STATE_HOME (~/.local/state), which no other
    user can plant."""
    home = environ.get("XDG_STATE_HOME")
    if not home or not os.path.isabs(home):
        home = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Place(home, ("corral",), note="%s is not yours (another user's, or a symlink): corral "
                 "keeps its %s in %s instead" % (foreign, what, os.path.join(home, "corral")))


def claimable(place):
    """Whether ``place`` is ours to use: each component missing, or a real
    directory (not a symlink) owned by the caller."""
    path = place.base
    for name in place.names:
        path = os.path.join(path, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False
    return True


def state_place(environ=None):
    """Where this user's state directory is (not created)."""
    environ = os.environ if environ is None else environ
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and _usable(runtime):
        return Place(runtime, ("corral",))
    shared = Place(SHARED, ("corral-%d" % os.getuid(), "run"))
    if claimable(shared):
        return shared
    fallback = private_fallback(environ, "state", os.path.dirname(shared.path))
    return attrs.evolve(fallback, names=fallback.names + ("run",))


def state_root(environ=None):
    """The state directory for this user (not created)."""
    return state_place(environ).path


def _usable(path):
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and os.access(path, os.W_OK | os.X_OK))


def open_private(base, names, *, create=True):
    """Open ``base/names...`` as a directory fd: each of ``names`` created
    0700 when missing (with ``create``), opened with ``O_NOFOLLOW`` relative
    to its parent and checked (a directory, ours, no access for others).
    SandboxError when one is not."""
    path = base
    try:
        if create:
            os.makedirs(base, 0o700, exist_ok=True)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _dir_error(base, exc) from None
    try:
        for name in names:
            path = os.path.join(path, name)
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(fd, name):
                    exc.errno = errno.ELOOP
                raise _dir_error(path, exc) from None
            os.close(fd)
            fd = child
            check_private(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_private(fd, path):
    """``fd`` must be a directory owned by the caller; access for anyone else
    is taken away (it can only be ours that granted it)."""
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SandboxError(
            "state directory", errno.EPERM,
            detail="%s is not a directory owned by you (uid %d)" % (path, os.getuid()),
            fix="remove it, or set XDG_RUNTIME_DIR to a directory you own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, 0o700)


def _is_link(dir_fd, name):
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _dir_error(path, exc):
    if exc.errno == errno.ELOOP:
        return SandboxError("state directory", errno.ELOOP, detail="%s is a symlink" % path,
                            fix="remove it; corral follows no symlink there")
    if exc.errno == errno.ENOTDIR:
        return SandboxError("state directory", errno.EPERM,
                            detail="%s is not a directory owned by you (uid %d)"
                            % (path, os.getuid()), fix="remove it")
    return SandboxError("state directory", exc.errno, detail=path,
                        fix="set XDG_RUNTIME_DIR to a directory you own")


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
    """A sandbox's entry while it runs: listed once :meth:`publish` put its sealed
    record in place, write events with :meth:`write_event`, end it with
    :meth:`close` (idempotent; removes the directory and the sealed record)."""

    def __init__(self, id, path, root_fd, entry_fd, record_fd, info=None):
        self.id = id
        self.path = path
        self.events_path = os.path.join(path, EVENTS)
        self._root_fd = root_fd
        self._entry_fd = entry_fd
        self._record_fd = record_fd
        self._info = info
        self._events = None
        self.published = False

    def publish(self, command_pid=None):
        """List the entry (made ahead by :func:`reserve`): its sealed record, with the
        command's pid, takes the place of the fd the pointer names, in one dup2 (until
        then that is /dev/null, which no reader takes for a record).  OSError if it
        cannot."""
        info = dict(self._info, command_pid=command_pid, started=time.time())
        fd = _sealed(info)
        try:
            os.dup2(fd, self._record_fd, inheritable=False)
        finally:
            os.close(fd)
        self.published = True

    def __repr__(self):
        return "<Registration id=%s %s>" % (self.id, "closed" if self.path is None else self.path)

    def open_events(self):
        """The events file, opened for appending (the caller owns it)."""
        fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=self._entry_fd)
        return open(fd, "a", encoding="utf-8")

    def write_event(self, record):
        """Append one event record (a dict with at least ``type``), flushed."""
        if self.path is None:
            return
        if self._events is None:
            self._events = self.open_events()
        self._events.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
        self._events.flush()

    def close(self, remove=True):
        """End the entry: its files and its sealed record are closed (`corral ps` no longer
        lists it) and its directory removed; or, without ``remove``, left for the caller to
        remove, whose path this returns (None once closed)."""
        if self.path is None:
            return None
        if self._events is not None:
            self._events.close()
            self._events = None
        os.close(self._entry_fd)
        if remove:
            shutil.rmtree(self.id, dir_fd=self._root_fd, ignore_errors=True)
        os.close(self._root_fd)
        os.close(self._record_fd)
        path, self.path = self.path, None
        return None if remove else path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def register(*, spec, supervisor_pid, d_pid, command_pid=None, place=None):
    """Record a sandbox whose command just started; return its
    :class:`Registration`.  Raises SandboxError when the state directory is
    unusable (see :func:`register_quietly`)."""
    registration = reserve(spec=spec, supervisor_pid=supervisor_pid, d_pid=d_pid, place=place)
    try:
        registration.publish(command_pid)
    except OSError as exc:
        registration.close()
        raise SandboxError("state directory", exc.errno, detail=registration.path) from None
    return registration


def reserve(*, spec, supervisor_pid, d_pid, place=None):
    """The entry of a sandbox whose command is about to start, made ahead: its
    directory, events file and pointer, the slow part (a few ms, spent while pid 1
    starts the command rather than once it runs: issue 11); `corral ps` lists it once
    :meth:`Registration.publish` says which command runs.  Raises SandboxError
    when the state directory is unusable."""
    place = place or state_place()
    root = place.open()
    try:
        for _ in range(16):
            sandbox_id = os.urandom(ID_HEX // 2).hex()  # (the secrets module costs ~5 ms of start-up)
            try:
                os.mkdir(sandbox_id, 0o700, dir_fd=root)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise _dir_error(os.path.join(place.path, sandbox_id), exc) from None
        else:
            raise SandboxError("state directory", errno.EEXIST,
                               detail="no free sandbox id in " + place.path)
        path = os.path.join(place.path, sandbox_id)
        entry = os.open(sandbox_id, _DIR_FLAGS, dir_fd=root)
    except BaseException:
        os.close(root)
        raise
    info = {
        "id": sandbox_id,
        "argv": spec.get("argv"),
        "cwd": spec.get("cwd"),
        "net": spec.get("net"),
        "supervisor_pid": supervisor_pid,
        "supervisor_start": proc_start_time(supervisor_pid),
        "d_pid": d_pid,
        "d_start": proc_start_time(d_pid) if d_pid else None,
        "spec": {k: v for k, v in spec.items() if k not in _SPEC_SKIP},
    }
    try:
        placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # publish's dup2 target
    except OSError as exc:
        os.close(entry)
        os.close(root)
        raise SandboxError("state directory", exc.errno, detail=path) from None
    registration = Registration(sandbox_id, path, root, entry, placeholder, info)
    try:
        _write_json(entry, INFO, {"id": sandbox_id, "supervisor_pid": supervisor_pid,
                                  "supervisor_start": info["supervisor_start"],
                                  "record_fd": registration._record_fd})
        os.close(os.open(EVENTS, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=entry))
    except OSError as exc:
        registration.close()
        raise SandboxError("state directory", exc.errno, detail=path) from None
    log.debug("registered sandbox %s in %s", sandbox_id, path)
    return registration


def register_quietly(**kw):
    """:func:`register`, but a state directory problem is a warning, not a
    failure: the sandbox runs either way, it just cannot be listed."""
    return _quietly(register, kw)


def reserve_quietly(**kw):
    """:func:`reserve`, quietly (see :func:`register_quietly`)."""
    return _quietly(reserve, kw)


def _quietly(make, kw):
    try:
        return make(**kw)
    except SandboxError as exc:
        log.warning("this sandbox will not appear in `corral ps`: %s", exc)
        return None


def _sealed(info):
    """The supervisor's record of a sandbox: a memfd nobody can change (not
    even us), which ``corral ps/exec/stop`` read through /proc."""
    fd = os.memfd_create("corral-sandbox", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        data = memoryview(json.dumps(info).encode())
        while data:
            data = data[os.write(fd, data):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_json(dir_fd, name, data):
    tmp = name + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _load(root_fd, root, name):
    """The entry ``name``: its pointer file, then the record its supervisor
    holds.  None when either is missing or does not check out."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=root_fd)
    except OSError:
        return None, None
    try:
        if os.fstat(fd).st_uid != os.getuid():
            return None, None
        info_fd = os.open(INFO, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        with open(info_fd, encoding="utf-8") as f:
            pointer = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None, None
    finally:
        os.close(fd)
    if not isinstance(pointer, dict):
        return None, None
    pid, start, record = (pointer.get(k) for k in ("supervisor_pid", "supervisor_start", "record_fd"))
    if not all(type(v) is int for v in (pid, start, record)):
        return None, None
    info = supervisor_record(pid, start, record)
    entry = None if info is None or info.get("id") != name else Running(
        id=name, path=os.path.join(root, name), info=info)
    return entry, alive(pid, start)


def supervisor_record(pid, start, fd):
    """The sealed record supervisor ``pid`` (started at ``start``) holds in
    its fd ``fd``, or None.  Only a process of our own user and pid namespaces
    counts: nothing inside a sandbox is one."""
    if not alive(pid, start) or not all(_same_ns(pid, ns) for ns in ("user", "pid")):
        return None
    try:
        mfd = os.open("/proc/%d/fd/%d" % (pid, fd), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if fcntl.fcntl(mfd, fcntl.F_GET_SEALS) & SEALS != SEALS:
            return None
        size = os.fstat(mfd).st_size
        if size > RECORD_MAX:
            return None
        data = os.pread(mfd, size, 0)
    except OSError:  # not a memfd (EINVAL)
        return None
    finally:
        os.close(mfd)
    if not alive(pid, start):  # the pid was reused while we opened its fd
        return None
    try:
        info = json.loads(data)
    except ValueError:
        return None
    if (not isinstance(info, dict) or info.get("supervisor_pid") != pid
            or info.get("supervisor_start") != start):
        return None
    return info


def _same_ns(pid, name):
    try:
        a, b = os.stat("/proc/%d/ns/%s" % (pid, name)), os.stat("/proc/self/ns/" + name)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def list_running(place=None, *, prune=True):
    """Every registered sandbox whose supervisor still runs, oldest first.
    With ``prune``, entries whose supervisor is gone are removed."""
    place = place or state_place()
    try:
        root_fd = place.open(create=False)
    except SandboxError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise
    try:
        found = []
        for name in os.listdir(root_fd):
            if len(name) != ID_HEX or name.strip("0123456789abcdef"):
                continue
            entry, supervisor_alive = _load(root_fd, place.path, name)
            if entry is not None:
                found.append(entry)
            elif supervisor_alive is False and prune:
                log.info("pruning stale sandbox %s (its supervisor is gone)", name)
                shutil.rmtree(name, dir_fd=root_fd, ignore_errors=True)
            elif supervisor_alive is None:
                # Being created (info.json not yet renamed in) or half removed:
                # stale only once it is old.
                _prune_partial(root_fd, name, prune)
    finally:
        os.close(root_fd)
    return sorted(found, key=lambda e: e.started)


def _prune_partial(root_fd, name, prune, age=60.0):
    with contextlib.suppress(OSError):
        st = os.lstat(name, dir_fd=root_fd)
        if prune and stat.S_ISDIR(st.st_mode) and time.time() - st.st_mtime > age:
            shutil.rmtree(name, dir_fd=root_fd, ignore_errors=True)


def find(id_or_prefix, place=None):
    """The running sandbox whose id is, or starts with, ``id_or_prefix``
    (unique, like a git hash).  ConfigError when none or several match."""
    prefix = id_or_prefix.lower()
    if not prefix or prefix.strip("0123456789abcdef"):
        raise ConfigError("%r is not a sandbox id (hex digits). Fix: see `corral ps`" % id_or_prefix)
    matches = [e for e in list_running(place) if e.id.startswith(prefix)]
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
        with _open_text(path) as f:
            text = f.read()
    except OSError:
        return []
    return list(_parse_lines(text.split("\n")[:-1]))


def _open_text(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return open(fd, encoding="utf-8", errors="replace")


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
        f = _open_text(entry.events_path)
    except OSError:
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
        _signal(entry, entry.d_pid, entry.info.get("d_start"), signal.SIGTERM)
        if not _wait_gone(entry, grace):
            how = "kill"
            if entry.pid1_alive():
                _signal(entry, entry.d_pid, entry.info.get("d_start"), signal.SIGKILL)
    if not _wait_gone(entry, wait if how == "kill" else grace):
        if entry.pid1_alive():
            raise SandboxError("stop", errno.ETIMEDOUT, detail="sandbox %s (pid 1 %d) did not die"
                               % (entry.id, entry.d_pid))
        # pid 1 is gone but the supervisor hangs on: it is no longer supervising anything.
        _signal(entry, entry.supervisor_pid, entry.info.get("supervisor_start"), signal.SIGKILL)
        _wait_gone(entry, wait)
    return how


def _signal(entry, pid, start, sig):
    """Signal ``pid`` if it is still the process that started at ``start``
    (through a pidfd: a pid reused after the check is not hit)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if proc_start_time(pid) == start:
            signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise SandboxError("stop", errno.EPERM, message="cannot stop sandbox %s: its pid %d "
                           "belongs to another user. Fix: run `corral stop` as the user who "
                           "started it" % (entry.id, pid)) from None
    finally:
        os.close(fd)


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
    # Regular files (and other reopenable objects) given as stdio go in as pipes, as
    # for `corral run` (docs/security.md): the command cannot reopen them with more rights.
    relay = launch.stdio_relay()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, enter.SIGNALS)
    try:
        try:
            pid = _start_enter(entry.d_pid, spec, argv, err_r, err_w, relay)
        finally:
            os.close(err_w)
        relay.spawned()
        code = _relay(pid)
        relay.finish()
    finally:
        relay.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    with open(err_r, "rb") as f:
        report = f.read()
    if report:
        raise launch.error_from(json.loads(report))
    return code


def _start_enter(d_pid, spec, argv, err_r, err_w, relay):
    """Start Y: a fork when this process is single-threaded without Go (setns
    into a user namespace needs that), else a fresh interpreter; its stdio is
    ``relay``'s pipes where ours are reopenable."""
    import sys

    from . import launch
    from .spawn import enter

    parent = os.getpid()
    if launch.can_fork():
        pid = os.fork()
        if pid == 0:
            os.close(err_r)
            relay.dup_into_child()
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
            os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, fd, index)
                                      for index, fd in enumerate(relay.child_fds) if fd is not None])
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
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, info.si_signo)
