"""`corral run` through a warm server: the client side, standard library only
(it runs before anything heavy is imported, and decides in well under a
millisecond whether the run goes warm or starts cold as before).

The run goes warm only when all of this holds, else :func:`run` returns None
and ``corral run`` starts cold exactly as it would without a server:

- the command is ``run`` or ``audit``, ``CORRAL_WARM`` is not ``off`` and
  stdin is not a terminal (job control needs the caller's own session);
- a server's socket exists for these namespaces (:func:`socket_path`) and it
  answers within :data:`READY_TIMEOUT`;
- the server is this user's and exactly as confined as we are
  (:func:`same_confinement`), so that nothing planted — another sandbox's
  socket on a shared directory — receives our environment and fds;
- the server accepts (same interpreter and corral, our limits applicable).

The client then hands over everything a fresh ``corral`` would inherit — its
arguments, environment, cwd, umask, resource limits, nice value, CPU
affinity, OOM score, ignored and blocked signals and every open fd at its own
number — and waits for the exit status, forwarding SIGINT, SIGTERM, SIGHUP,
SIGUSR1 and SIGUSR2 to the worker through a pidfd.  Once it has said go the
run is the worker's: a worker that dies without a status is an error (125),
never a second, cold run.

The wire format is NUL-separated bytes (nothing the OS hands a process —
argv, environment, paths — can contain NUL), with counts before each list:
see :func:`encode_request` and :func:`decode_request`.
"""

import _socket as socket  # not `socket`: its enums cost ~4 ms of start-up, and only these calls are used
import array
import os
import resource
import signal
import stat
import struct
import sys
import time
import zlib

PROTOCOL = b"corral-warm/1"
RETRY = b"retry"  # a spare that is not for this run: connect once more
READY_TIMEOUT = 2.0  # seconds a server has to answer before the run starts cold
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
WARM_COMMANDS = ("run", "audit")
MAX_FDS = 250  # SCM_RIGHTS carries at most 253 fds; more open fds: start cold
MESSAGE_MAX = 4 << 20  # a request (the environment is most of it)
SO_PEERPIDFD = 77  # Linux 6.5; older kernels: SO_PEERCRED's pid, checked against reuse
# What a process hands a sandbox it starts and a server must match exactly.
NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "time",
              "time_for_children", "user", "uts")
STATUS_KEYS = (b"Uid", b"Gid", b"Groups", b"CapInh", b"CapPrm", b"CapEff", b"CapBnd",
               b"CapAmb", b"NoNewPrivs", b"Seccomp", b"Seccomp_filters")
RESOURCES = tuple(sorted(getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_")))


class Refused(Exception):
    """The run cannot go warm; the text says why (`corral warm status` shows it)."""


# ---------------------------------------------------------------- where


def namespace_key():
    """A short name for the namespaces a server serves: a server is per user,
    mount, network and pid namespace (a container and its host, or two
    `ip netns exec` shells, each get their own)."""
    links = "".join(os.readlink("/proc/self/ns/" + ns) for ns in ("user", "mnt", "net", "pid"))
    return "%08x" % zlib.crc32(links.encode())  # a clash only means a cold start


def state_dirs(environ):
    """Where corral's state directory may be, in :func:`corral.state.state_place`'s
    order (the directories' ownership is not checked here: the socket's owner is,
    and the server's identity on the connection)."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        yield os.path.join(runtime, "corral")
    uid = os.getuid()
    yield os.path.join("/tmp", "corral-%d" % uid, "run")
    home = environ.get("XDG_STATE_HOME")
    if not home or not os.path.isabs(home):
        home = os.path.join(os.path.expanduser("~"), ".local", "state")
    yield os.path.join(home, "corral", "run")


def socket_name():
    return "warm-%s.sock" % namespace_key()


def socket_path(environ):
    """The first server socket for our namespaces that is ours, or None.  A socket
    file belongs to whoever bound it: one another user planted (a /tmp/corral-UID
    that is theirs) is passed over unconnected — it could only have stalled us, the
    server's identity being checked on the connection anyway."""
    name = socket_name()
    uid = os.getuid()
    for directory in state_dirs(environ):
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == uid:
            return path
    return None


# ---------------------------------------------------------------- who


def confinement(pid):
    """Everything about process ``pid`` that a sandbox started for it inherits:
    namespaces, root directory, credentials, capabilities, no_new_privs,
    seccomp, cgroup and LSM label.  Raises OSError when unreadable."""
    base = "/proc/%s/" % pid
    links = tuple(os.readlink(base + "ns/" + ns) for ns in NAMESPACES)
    root = os.stat(base + "root")
    with open(base + "status", "rb") as f:
        status = f.read()
    with open(base + "cgroup", "rb") as f:
        cgroup = f.read()
    try:
        with open(base + "attr/current", "rb") as f:
            label = f.read()
    except OSError:
        label = None
    fields = tuple(line for line in status.splitlines()
                   if line.split(b":", 1)[0] in STATUS_KEYS)
    return links, (root.st_dev, root.st_ino), fields, cgroup, label


def peer_pidfd(sock):
    """A pidfd of the process at the other end of ``sock`` (for a listening
    server: the one that listened).  Raises Refused when it cannot be pinned."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pass
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if pid <= 0:
        raise Refused("the peer's process is not visible from here")
    since_boot = _ticks_since_boot()
    try:
        fd = os.pidfd_open(pid)
    except OSError as exc:
        raise Refused("the peer has gone (%s)" % exc.strerror) from None
    try:
        started = _start_ticks(pid)
    except (OSError, ValueError, IndexError):
        started = None
    if started is None or started > since_boot:  # the pid was reused after the connection
        os.close(fd)
        raise Refused("the peer has gone")
    return fd


def _ticks_since_boot():
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK")) + 1


def _start_ticks(pid):
    with open("/proc/%d/stat" % pid, "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[19])


def same_confinement(sock):
    """Return a pidfd of the peer when it is this user's and confined exactly as
    we are; raise Refused otherwise.  The peer is read through /proc while its
    pidfd pins it: it is still alive afterwards, so the pid was not reused."""
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != os.getuid():
        raise Refused("the peer is uid %d, not %d" % (uid, os.getuid()))
    fd = peer_pidfd(sock)
    try:
        pid = _pidfd_pid(fd)
        try:
            theirs = confinement(pid)
            ours = confinement("self")
        except OSError as exc:
            raise Refused("cannot read the peer's process (%s)" % exc.strerror) from None
        try:
            signal.pidfd_send_signal(fd, 0)
        except ProcessLookupError:
            raise Refused("the peer has gone") from None
        if theirs != ours:
            raise Refused("the peer is confined differently (%s)" % _difference(theirs, ours))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pidfd_pid(fd):
    with open("/proc/self/fdinfo/%d" % fd, "rb") as f:
        for line in f:
            if line.startswith(b"Pid:"):
                pid = int(line.split()[1])
                if pid > 0:
                    return pid
    raise Refused("the peer is in a pid namespace not visible from here")


def _difference(theirs, ours):
    names = ("namespaces", "root directory", "credentials or seccomp", "cgroup", "LSM label")
    return ", ".join(n for n, a, b in zip(names, theirs, ours) if a != b)


# ---------------------------------------------------------------- what


def encode(items):
    """NUL-joined fields; a field holding NUL is a bug (nothing from the OS can)."""
    for item in items:
        if b"\0" in item:
            raise ValueError("a protocol field holds NUL")
    return b"\0".join(items)


def encode_request(kind, argv, environ, cwd, fds):
    """The request a client sends (fds travel beside it, in this order)."""
    items = [PROTOCOL, kind.encode(), os.fsencode(sys.executable),
             os.fsencode(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
             cwd, b"%d" % _umask(), b"%d" % os.getpriority(os.PRIO_PROCESS, 0),
             _oom_score_adj()]
    items += _counted([os.fsencode(a) for a in argv])
    items += _counted([k + b"=" + v for k, v in environ.items()])
    items += _counted([b"%d" % fd for fd in fds])
    limits = []
    for res in RESOURCES:
        soft, hard = resource.getrlimit(res)
        limits += [b"%d" % res, b"%d" % soft, b"%d" % hard]
    items += _counted(limits)
    items += _counted([b"%d" % cpu for cpu in sorted(os.sched_getaffinity(0))])
    items += _counted([b"%d" % s for s in sorted(_ignored_signals())])
    items += _counted([b"%d" % s for s in sorted(signal.pthread_sigmask(signal.SIG_BLOCK, ()))])
    return encode(items)


def _counted(items):
    return [b"%d" % len(items), *items]


def _umask():
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _oom_score_adj():
    try:
        with open("/proc/self/oom_score_adj", "rb") as f:
            return f.read().strip()
    except OSError:
        return b"0"


def _ignored_signals():
    return [s for s in signal.valid_signals()
            if s not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(s) == signal.SIG_IGN]


class Reader:
    """Consumes a decoded request field by field; anything malformed is Refused."""

    def __init__(self, data):
        self.parts = data.split(b"\0")
        self.at = 0

    def field(self):
        if self.at >= len(self.parts):
            raise Refused("the request is truncated")
        self.at += 1
        return self.parts[self.at - 1]

    def number(self, low=None, high=None):
        value = _int(self.field())
        if (low is not None and value < low) or (high is not None and value > high):
            raise Refused("a number in the request is out of range")
        return value

    def items(self, limit):
        count = self.number(0, limit)
        return [self.field() for _ in range(count)]

    def end(self):
        if self.at != len(self.parts):
            raise Refused("the request has trailing fields")


def decode_request(data):
    """The inverse of :func:`encode_request`: a dict, or Refused."""
    r = Reader(data)
    if r.field() != PROTOCOL:
        raise Refused("another protocol version")
    req = {"kind": r.field().decode("ascii", "replace"), "exe": r.field(), "package": r.field(),
           "cwd": r.field(), "umask": r.number(0, 0o777), "nice": r.number(-20, 19),
           "oom_score_adj": r.number(-1000, 1000)}
    req["argv"] = r.items(1 << 16)
    env = {}
    for entry in r.items(1 << 16):
        key, sep, value = entry.partition(b"=")
        if not sep or not key:
            raise Refused("an environment entry is malformed")
        env[key] = value
    req["env"] = env
    req["fds"] = [_fd_number(f) for f in r.items(MAX_FDS)]
    limits = r.items(3 * len(RESOURCES))
    if len(limits) % 3:
        raise Refused("the resource limits are malformed")
    req["limits"] = [tuple(_int(v) for v in limits[i:i + 3]) for i in range(0, len(limits), 3)]
    req["cpus"] = [_int(c) for c in r.items(1 << 14)]
    req["ignored"] = [_int(s) for s in r.items(128)]
    req["blocked"] = [_int(s) for s in r.items(128)]
    r.end()
    if len(set(req["fds"])) != len(req["fds"]):
        raise Refused("an fd number appears twice")
    return req


def _int(raw):
    if not raw or len(raw) > 24 or not raw.lstrip(b"-").isdigit():
        raise Refused("a number in the request is malformed")
    return int(raw)


def _fd_number(raw):
    fd = _int(raw)
    if not 0 <= fd < (1 << 20):
        raise Refused("an fd number is out of range")
    return fd


def open_fds(skip):
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd != skip:
            try:
                os.fstat(fd)  # the listing's own directory fd is closed by now
            except OSError:
                continue
            fds.append(fd)
    return sorted(fds)


# ---------------------------------------------------------------- run


def console():
    """The ``corral`` command (console script, ``python -m corral``): through a
    warm server when one serves us, else cold (:func:`corral.cli.console`),
    without loading the command line's own modules first."""
    code = run(sys.argv[1:])
    if code is None:
        from ..cli import console as cold

        cold()  # exits
    os._exit(code)


def run(argv):
    """``corral`` with ``argv`` (without the program name) through the warm
    server: its exit status, or None to start cold."""
    if (not argv or argv[0] not in WARM_COMMANDS or os.environ.get("CORRAL_WARM") == "off"
            or _isatty(0)):
        return None
    try:
        path = socket_path(os.environ)
    except OSError:
        return None
    if path is None:
        return None
    for attempt in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(READY_TIMEOUT)
            pidfd = _handshake(sock, path, ["corral", *argv])
        except Refused as exc:
            sock.close()
            if str(exc) != RETRY.decode():
                return None
            continue
        except OSError:
            sock.close()
            return None
        return _wait(sock, pidfd)
    return None


def _isatty(fd):
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _handshake(sock, path, argv):
    """Connect, check the server, send the request; the worker's pidfd once it
    is ready and has been told to go.  OSError or Refused: start cold."""
    sock.connect(path)
    os.close(same_confinement(sock))
    fds = open_fds(sock.fileno())
    if len(fds) > MAX_FDS:
        raise Refused("too many open fds to hand over")
    request = encode_request("run", argv, os.environb, os.getcwdb(), fds)
    sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    msg, fds_in = receive(sock, 4096, 1)
    if msg != b"ready" or len(fds_in) != 1:
        for fd in fds_in:
            os.close(fd)
        raise Refused(msg.decode("utf-8", "replace") or "the server closed the connection")
    sock.send(b"go")
    return fds_in[0]


def receive(sock, size, max_fds):
    """One message and the fds that came with it (every received fd is kept or
    closed: none leaks into the sandbox)."""
    fds = array.array("i")
    msg, anc, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(max_fds * fds.itemsize),
                                      socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise Refused("a message was truncated")
    return msg, list(fds)


def _wait(sock, pidfd):
    """Forward signals to the worker until it reports the exit status."""

    def forward(sig, frame):
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except OSError:
            pass

    for sig in FORWARDED:
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, forward)
    sock.settimeout(None)
    try:
        msg = sock.recv(64)
    except OSError:
        msg = b""
    if msg.startswith(b"exit\0"):
        try:
            return int(msg[5:])
        except ValueError:
            pass
    os.write(2, b"corral: the warm server's worker ended without the command's exit status "
             b"(killed?). Fix: see `corral warm status`; CORRAL_WARM=off starts cold\n")
    return 125
