"""Stage-1 (C) and pid 1 (D) of a sandbox — DESIGN §2.  Standard library only.

    P  supervisor ──ctl socket (SOCK_SEQPACKET, JSON + SCM_RIGHTS)──┐
    └─ C  stage-1: unshare(USER|NS|PID|UTS|IPC|CGROUP[|NET]), uid/gid maps;
         │   while D mounts: hostname, lo, the seccomp program (sent to D)
         ├─ U  forked before the unshare, joins C's user and mount namespaces,
         │     makes overlays for D (mounts.premake_overlays), ends with C:
         │     the mount tree's teardown happens in U's exit
         └─ D  pid 1: TAP, mounts + pivot_root, then forks E,
              reaps, forwards signals, reports E's exit and exits with it
              └─ E  the user's command (exec)

C is either a fork of P (when P runs no threads and no Go) or a fresh
``python -I -m corral.spawn.stage1 CTL_FD PARENT_PID`` reading its spec from the
ctl socket.  C and D die with their parent (PR_SET_PDEATHSIG), and D is pid 1
of the sandbox's pid namespace, so the supervisor's death — even SIGKILL —
kills everything inside.

Messages to P (one JSON object per datagram):
  {"d_pid": N}                       C: D's pid in P's pid namespace
  {"tap": "tap0", "diag": bool}       D: the TAP device (net=filtered) + SCM_RIGHTS fd,
                                     and its sock_diag socket when "diag"
  {"ready": true}                    D: namespaces, network and mounts done
  {"child": N}                       D: E's pid inside the sandbox
  {"exit": code, "signal": N|null}   D: E ended
  {"error": {...}}                   C or D: a step failed; nothing was run
P may answer {"go": true} after "ready" (required when ``spec["wait_go"]``); a sandbox
made ready before its command was known gets it with go: {"go": true, "argv": [...],
"env": {...}, "stdio": [bool, bool, bool]} + SCM_RIGHTS of the stdio fds (corral warm).
"""

import errno
import fcntl
import json
import os
import select
import signal
import socket
import stat
import struct
import sys

from . import harden, libc, mounts, seccomp

SI_KERNEL = 0x80
# Signals pid 1 passes on to the command (issue 2: SIGINT SIGTERM SIGHUP
# SIGQUIT SIGUSR1 SIGUSR2 SIGWINCH).
FORWARDED = (
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH,
)
MAX_MESSAGE = 1 << 20
# Signals C ignores: it dies only with P (PR_SET_PDEATHSIG), D decides the rest.
KEEP_OUT = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM)

FIXES = {
    "unshare": "check `corral doctor`: unprivileged user namespaces must be enabled "
    "(sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0, and on "
    "Ubuntu 24.04+ kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile)",
    "uid_map": "the kernel refused the uid map; run `corral doctor`",
    "gid_map": "the kernel refused the gid map; run `corral doctor`",
    "setgroups": "the kernel refused setgroups=deny; run `corral doctor`",
    "tap": "the sandbox needs /dev/net/tun readable and writable: "
    "`sudo chmod 666 /dev/net/tun` (most desktops ship it 0666), or use --net none",
}


class StepError(Exception):
    """A set-up step failed in C or D; reported to P, which raises SandboxError."""

    def __init__(self, step, err=None, detail=None, fix=None, exit_code=1):
        super().__init__(step)
        self.step = step
        self.exit_code = exit_code
        self.errno = err
        self.detail = detail
        self.fix = fix if fix is not None else FIXES.get(step.split()[0])

    def to_dict(self):
        return {"step": self.step, "errno": self.errno, "detail": self.detail, "fix": self.fix,
                "exit_code": self.exit_code}


_CREDS = struct.Struct("iII")  # struct ucred: pid, uid, gid


def send(ctl, message, fds=(), pid=None):
    """One JSON datagram, with fds (SCM_RIGHTS) and/or a pid (SCM_CREDENTIALS).

    A pid sent as credentials arrives translated into the receiver's pid
    namespace: that is how pid 1 tells the supervisor the command's host pid
    without a race against the command exiting (the kernel checks that the
    sender may vouch for it: pid 1 has CAP_SYS_ADMIN over its pid namespace)."""
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds)))
    if pid is not None:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS,
                          _CREDS.pack(pid, os.getuid(), os.getgid())))
    ctl.sendmsg([json.dumps(message).encode()], ancillary)


def recv(ctl):
    """(message, fds) — message is None at EOF.  A pid sent as credentials is
    in ``message["pid"]``, in our pid namespace (needs SO_PASSCRED on ctl)."""
    data, ancdata, _flags, _addr = ctl.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4)
                                               + socket.CMSG_SPACE(_CREDS.size))
    fds = []
    pid = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(struct.unpack("%di" % (usable // 4), payload[:usable]))
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = _CREDS.unpack(payload[:_CREDS.size])[0]
    if not data:
        return None, fds
    message = json.loads(data)
    if pid is not None and "child" in message:
        message["pid"] = pid
    return message, fds


def passcred(sock):
    """Let ``sock`` receive SCM_CREDENTIALS (set before the peer sends)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)


def _report(ctl, exc):
    try:
        send(ctl, {"error": exc.to_dict()})
    except OSError:
        pass


# ---------------------------------------------------------------- stage-1 (C)


class Entered(BaseException):
    """Raised in E when the spec has no argv (library mode, ``corral.enter``):
    the calling Python code goes on inside the sandbox."""


def _run_and_exit(ctl, role, body, *args):
    """Run C's or D's body, report a failure to P, and _exit with the code;
    only E, in library mode, gets out (by raising :class:`Entered`)."""
    try:
        code = body(ctl, *args)
    except Entered:
        raise
    except StepError as exc:
        _report(ctl, exc)
        code = exc.exit_code
    except BaseException as exc:  # never let a traceback replace the report
        _report(ctl, StepError(role, getattr(exc, "errno", None), repr(exc)))
        code = 1
    os._exit(code)


def stage1(ctl, spec, parent_pid, prelude=None):
    """Run as C; never returns (except in E, by raising :class:`Entered`).
    ``prelude()``: what a C forked from P does first, once it dies with P
    (its stdio, dropping P's fds); a failure there is reported like a step's."""
    _run_and_exit(ctl, "stage-1", _stage1, spec, parent_pid, prelude)


def _stage1(ctl, spec, parent_pid, prelude=None):
    libc.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # P died before PDEATHSIG was armed
        return 1
    # Keyboard signals reach the whole foreground process group; C must
    # outlive them (D decides what happens), and dies only with P.
    for sig in KEEP_OUT:
        signal.signal(sig, signal.SIG_IGN)
    if prelude is not None:
        prelude()
    closed = _hold_stdio()
    helper, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    undertaker, joined = _fork_undertaker(spec, theirs)
    theirs.close()
    _enter_namespaces(spec)
    if harden.wants_seccomp(spec.get("harden")):
        _hardening(seccomp._library)  # now: D pivots C's root away too
    os.write(undertaker, b"u")  # kept open: its end tells U that C is gone
    lifeline_r, lifeline_w = os.pipe()
    program_r, program_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(lifeline_w)
        os.close(program_w)
        pid1(ctl, spec, lifeline_r, joined, closed, program_r, helper)  # never returns, but in E
    helper.close()
    os.close(lifeline_r)
    os.close(joined)
    os.close(program_r)
    send(ctl, {"d_pid": pid})
    _share_of_d(ctl, spec, program_w)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return 1
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


_LENGTH = struct.Struct("I")


def _share_of_d(ctl, spec, program_w):
    """C, while D mounts (on another CPU when there is one): what of D's set-up
    needs only the namespaces C is in (hostname, loopback, ICMP echo sockets),
    then the command's seccomp program, passed to D length first (0: none).  On
    failure report why and pass nothing: D then starts nothing (fail closed)."""
    try:
        _setup_host(spec)
        program = _hardening(harden.seccomp_program, spec.get("harden")) or b""
        data = memoryview(_LENGTH.pack(len(program)) + program)
        while data:
            data = data[os.write(program_w, data):]
    except StepError as exc:
        _report(ctl, exc)
    except OSError:
        pass  # D is gone
    finally:
        os.close(program_w)


def _receive_program(spec, program_r):
    """D: the program C built (None: the spec asks for no filter), once C has done
    its share (_share_of_d); raises :class:`Unfiltered` when C sent nothing (it
    reported why), a truncated program, or none where the spec asks for one."""
    chunks = []
    while chunk := os.read(program_r, 1 << 16):
        chunks.append(chunk)
    os.close(program_r)
    data = b"".join(chunks)
    if len(data) < _LENGTH.size or _LENGTH.unpack_from(data)[0] != len(data) - _LENGTH.size:
        raise Unfiltered()
    program = data[_LENGTH.size:]
    if bool(program) != harden.wants_seccomp(spec.get("harden")):
        raise Unfiltered()
    return program or None


class Unfiltered(Exception):
    """D did not get from C what it must have to start the command."""


def _hold_stdio():
    """Put /dev/null on those of fds 0-2 that are closed (``corral run ... <&-``,
    a daemon's stdio) and return them: else the next fd C or D opens (a pipe, the
    lifeline) lands there, and the command would get it as its stdin or stdout.
    The command gets them closed again, as it was given them (_spawn_command)."""
    closed = []
    for fd in (0, 1, 2):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd, inheritable=False)
                os.close(null)
            closed.append(fd)
    return tuple(closed)


def _fork_undertaker(spec, helper):
    """Fork U, which outlives C by a moment and so drops the sandbox's namespaces
    last: unmounting the sandbox's mount tree (an RCU grace period and every
    overlay, ~100-300 ms under load) then happens in U's exit, which nobody
    waits for, instead of delaying C's, which P waits for (issue 11: corral
    exits right after the command).  U is forked before the unshare (a child
    forked after it would land in the sandbox's pid namespace, where it dies
    with D), holds nothing of P's (no ctl, no stdio), joins C's user and mount
    namespaces once C writes to the returned pipe, and ends when C does (the
    pipe's end, or PR_SET_PDEATHSIG).  Returns the pipe's write end (close-on-exec:
    only C and D hold it), and the read end of a pipe that ends once U has joined
    (or given up): D waits for that before it starts the command, because U then
    counts against the sandbox's RLIMIT_NPROC (hardening.HELPER_PROCESSES).
    Once in, U makes overlays of the plan for D on the other CPU, sent on the
    socket ``helper`` (mounts.premake_overlays)."""
    c_pid = os.getpid()
    ready_r, ready_w = os.pipe()
    joined_r, joined_w = os.pipe()
    if os.fork() != 0:
        os.close(ready_r)
        os.close(joined_w)
        return ready_w, joined_r
    try:
        libc.set_pdeathsig(signal.SIGKILL)
        start = 0
        for fd in sorted((ready_r, joined_w, helper.fileno())):
            os.closerange(start, fd)
            start = fd + 1
        os.closerange(start, 1 << 16)
        if os.getppid() == c_pid and os.read(ready_r, 1):  # else C is gone
            for name, nstype in (("user", libc.CLONE_NEWUSER), ("mnt", libc.CLONE_NEWNS)):
                fd = os.open("/proc/%d/ns/%s" % (c_pid, name), os.O_RDONLY | os.O_CLOEXEC)
                libc.setns(fd, nstype)
                os.close(fd)
            os.close(joined_w)
            mounts.premake_overlays(spec["plan"], helper)
            os.read(ready_r, 1)  # EOF when C exits; PR_SET_PDEATHSIG then kills U
    finally:
        os._exit(0)


def _enter_namespaces(spec):
    flags = (libc.CLONE_NEWUSER | libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWUTS
             | libc.CLONE_NEWIPC | libc.CLONE_NEWCGROUP)
    if spec["net"] != "host":
        flags |= libc.CLONE_NEWNET
    uid, gid = os.getuid(), os.getgid()
    try:
        libc.unshare(flags)
    except OSError as exc:
        detail, fix = _nesting_fix(exc.errno)
        raise StepError("unshare", exc.errno, detail, fix) from None
    inner_uid, inner_gid = (0, 0) if spec["root"] else (uid, gid)
    for step, path, text in (
        ("setgroups", "/proc/self/setgroups", "deny"),
        ("uid_map", "/proc/self/uid_map", "%d %d 1" % (inner_uid, uid)),
        ("gid_map", "/proc/self/gid_map", "%d %d 1" % (inner_gid, gid)),
    ):
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise StepError(step, exc.errno, "writing %r to %s" % (text, path)) from None


def _nesting_fix(err):
    """(detail, fix) for a failed unshare: inside a corral sandbox (or another
    seccomp filter) blocking user namespaces, say so; else the generic fix."""
    generic = "creating user, mount, pid and other namespaces", None
    if err != errno.EPERM:
        return generic
    if os.environ.get("CORRAL_SANDBOX"):
        return ("corral cannot nest inside corral (user namespaces are blocked by the "
                "sandbox's seccomp filter)", "--allow-nested on the outer sandbox")
    try:
        with open("/proc/self/status") as f:
            filtered = any(line.split() == ["Seccomp:", "2"] for line in f)
    except OSError:
        filtered = False
    if filtered:
        return ("a seccomp filter on this process (a container's?) blocks user namespaces",
                "run corral outside it, or allow unshare(CLONE_NEWUSER) in that filter")
    return generic


# ---------------------------------------------------------------- pid 1 (D)


def pid1(ctl, spec, lifeline, joined, closed, program, helper):
    """Run as D, pid 1 of the sandbox; never returns (except in E).
    ``closed``: the stdio fds the command gets closed (see _hold_stdio);
    ``program``: the pipe C sends the seccomp program on (_send_program);
    ``helper``: the socket U sends overlays on (mounts.premake_overlays)."""
    _run_and_exit(ctl, "pid 1", _pid1, spec, lifeline, joined, closed, program, helper)


def _pid1(ctl, spec, lifeline, joined, closed, program, helper):
    libc.set_pdeathsig(signal.SIGKILL)
    if select.select([lifeline], [], [], 0)[0]:  # C died before we armed it
        return 1
    mask = set(FORWARDED) | {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    _setup_tap(ctl, spec)
    _setup_root(spec, helper)
    try:
        hardened = _prepare_hardening(spec, _receive_program(spec, program))
    except Unfiltered:
        return 1
    send(ctl, {"ready": True})
    if spec.get("wait_go"):
        message, fds = recv(ctl)
        if not message or not message.get("go"):
            for fd in fds:
                os.close(fd)
            return 1  # P went away or refused: run nothing
        if "argv" in message:  # made ready before its command was known (corral warm)
            closed = _take_command(spec, message, fds)
    os.read(joined, 1)  # the undertaker is in (long since, in practice): see _fork_undertaker
    os.close(joined)
    child = _spawn_command(ctl, spec, lifeline, hardened, closed)
    send(ctl, {"child": child}, pid=child)
    code, sig = _supervise(child, mask)
    send(ctl, {"exit": code, "signal": sig})
    return code


def _take_command(spec, message, fds):
    """The command, its environment and its stdio, sent with go: the fds go on
    0-2 (``message["stdio"]``: for each of 0, 1, 2 whether an fd came, in that
    order); return the stdio fds the command gets closed."""
    stdio = message.get("stdio")
    if (not isinstance(message.get("argv"), list) or not message["argv"]
            or not isinstance(message.get("env"), dict) or not isinstance(stdio, list)
            or len(stdio) != 3 or sum(map(bool, stdio)) != len(fds)):
        for fd in fds:
            os.close(fd)
        raise StepError("go", errno.EINVAL, "a malformed command", fix="report this as a corral bug")
    spec["argv"], spec["env"], spec["tty"] = message["argv"], message["env"], False
    received = iter(fds)
    closed = []
    for index, present in enumerate(stdio):
        if present:
            fd = next(received)
            os.dup2(fd, index)
            os.close(fd)
        else:
            closed.append(index)  # /dev/null held there (_hold_stdio); closed for the command
    return tuple(closed)


def _setup_host(spec):
    """The hostname, and the network namespace's loopback and ping range: C does
    it (the namespaces are C's), while D mounts."""
    try:
        libc.sethostname(spec["hostname"])
    except OSError as exc:
        raise StepError("sethostname", exc.errno, spec["hostname"]) from None
    if spec["net"] == "host":
        return
    try:
        libc.set_link_up("lo")
    except OSError as exc:
        raise StepError("loopback", exc.errno, "bringing lo up") from None
    # Unprivileged ICMP echo sockets for the sandbox's own group, so `ping`
    # works without CAP_NET_RAW; the echo is still a policy-checked flow.
    gid = os.getgid()
    try:
        with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
            f.write("%d %d" % (gid, gid))
    except OSError as exc:
        raise StepError("ping_group_range", exc.errno, "allowing ICMP echo sockets") from None


def _setup_tap(ctl, spec):
    """D: the TAP device (net=filtered), sent to P with a sock_diag socket.  Opened
    here, before the mounts take /dev/net/tun out of view."""
    if spec["net"] == "filtered":
        from . import tap  # only loaded when there is a network

        try:
            fd = tap.create(spec["tap"])
        except OSError as exc:
            raise StepError("tap", exc.errno, "creating %s" % spec["tap"]["name"]) from None
        # The sock_diag socket the supervisor attributes flows with (corral.net.owner):
        # opened here, it asks this network namespace.  NETLINK_SOCK_DIAG = 4.
        fds = [fd]
        try:
            diag = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 4)
            fds.append(diag.detach())
        except OSError:
            pass  # the supervisor records why flows have no process
        send(ctl, {"tap": spec["tap"]["name"], "diag": len(fds) > 1}, fds)
        for one in fds:
            os.close(one)


def _setup_root(spec, helper):
    try:
        mounts.setup_root(spec["plan"], helper)
    except mounts.MountError as exc:
        raise StepError(
            "mount %s (%s)" % (exc.path, exc.step), exc.errno, str(exc), getattr(exc, "fix", None)
        ) from None


FD_CEILING = 1 << 20  # above any RLIMIT_NOFILE a user can set (fs.nr_open's default)


def _spawn_command(ctl, spec, lifeline, hardened, closed=()):
    argv = spec["argv"]
    # Tells a corral started inside that it is nested (see _nesting_fix).
    env = dict(spec["env"], CORRAL_SANDBOX="1")
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        if argv is None:  # library mode: this process goes on as E
            os.close(err_r)
            os.close(err_w)
            os.close(lifeline)
            ctl.close()
            for fd in closed:
                os.close(fd)
            _become_command(spec, hardened)
            # ...but as the Python program it was, not as a fresh exec.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            os.environ.clear()
            os.environ.update(env)
            raise Entered()
        failed_step = 1
        try:
            os.close(err_r)
            _become_command(spec, hardened)
            # Nothing but stdio goes inside: not the caller's extra fds (`5>>~/file`),
            # not ours (the fork path inherits everything corral holds).
            os.closerange(3, err_w)
            os.closerange(err_w + 1, FD_CEILING)
            for fd in closed:
                os.close(fd)
            failed_step = 0
            os.execve(_which(argv[0], env.get("PATH", os.defpath)), argv, env)
        except OSError as exc:
            os.write(err_w, struct.pack("ii", exc.errno or errno.EIO, failed_step))
        finally:
            os._exit(127)
    os.close(err_w)
    data = os.read(err_r, 8)
    os.close(err_r)
    if data:
        err, failed_step = struct.unpack("ii", data)
        os.waitpid(pid, 0)
        if failed_step:
            raise StepError("preparing the command (cwd, limits, capabilities, seccomp)", err,
                            os.strerror(err), fix="report this as a corral bug")
        raise exec_error(argv[0], err, env.get("PATH", os.defpath))
    return pid


def exec_error(name, err, path):
    """The :class:`StepError` for an execve of ``name`` (found on ``path``)
    that failed with ``err``, run in the sandbox's view after the failure."""
    missing = _missing_to_start(name, path) if err == errno.ENOENT else None
    if missing:
        return StepError(
            "exec: missing " + missing[1], err, "%s: cannot start: %s %s is missing inside "
            "the sandbox (the command itself is there)" % (name, missing[1], missing[0]),
            exit_code=127, fix="show the directory that holds it (e.g. --ro %s)"
            % os.path.dirname(missing[0]),
        )
    return StepError(
        "exec", err, name, exit_code=127 if err == errno.ENOENT else 126,
        fix="check the command name, and that it exists and is executable inside "
        "the sandbox's view",
    )


def _missing_to_start(name, path):
    """execve gives ENOENT both when the command is missing and when what it
    needs to start is: the ELF loader it names (PT_INTERP, e.g.
    /lib64/ld-linux-x86-64.so.2 in a hermetic view without /lib64) or the
    interpreter on its ``#!`` line.  Return (path, "ELF loader" or
    "#! interpreter") in the second case, None in the first."""
    try:
        fd = os.open(_which(name, path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            head = f.read(256)
            if head.startswith(b"#!"):
                words = head[2:].split(b"\n", 1)[0].split()
                needed, what = (os.fsdecode(words[0]) if words else None), "#! interpreter"
            elif head.startswith(b"\x7fELF"):
                needed, what = _elf_interpreter(f, head), "ELF loader"
            else:
                return None
    except (OSError, ValueError, IndexError, struct.error):  # not a well-formed program
        return None
    if needed and not os.path.exists(needed):
        return needed, what
    return None


def _elf_interpreter(f, head):
    """The PT_INTERP path of the ELF file ``f`` (``head``: its first bytes), or None."""
    wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
    if wide:
        phoff, = struct.unpack_from(order + "Q", head, 32)
        entsize, count = struct.unpack_from(order + "HH", head, 54)
        layout = order + "II QQQ QQQ"  # p_type p_flags p_offset p_vaddr p_paddr p_filesz ...
    else:
        phoff, = struct.unpack_from(order + "I", head, 28)
        entsize, count = struct.unpack_from(order + "HH", head, 42)
        layout = order + "I I III I"  # p_type p_offset p_vaddr p_paddr p_filesz
    size = struct.calcsize(layout)
    if not size <= entsize <= 256 or count > 512:
        return None
    f.seek(phoff)
    table = f.read(entsize * count)
    for i in range(len(table) // entsize):
        fields = struct.unpack_from(layout, table, i * entsize)
        if fields[0] == 3:  # PT_INTERP
            offset, length = (fields[2], fields[5]) if wide else (fields[1], fields[4])
            if length > 4096:
                return None
            f.seek(offset)
            return os.fsdecode(f.read(length).split(b"\0", 1)[0]) or None
    return None


def _which(name, path):
    """Find ``name`` like a shell does: the first executable file on PATH;
    ENOENT when there is none (exit 127), EACCES when only non-executable
    ones exist (exit 126)."""
    if "/" in name:
        return name
    denied = None
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = candidate
    if denied:
        return denied  # execve reports EACCES
    raise FileNotFoundError(errno.ENOENT, "command not found", name)


def _prepare_hardening(spec, program=harden.BUILD):
    return _hardening(harden.prepare, spec.get("harden"), program)


def _hardening(step, *args):
    try:
        return step(*args)
    except (harden.HardenError, seccomp.SeccompError) as exc:
        raise StepError("seccomp" if isinstance(exc, seccomp.SeccompError) else "limits",
                        exc.errno, exc.strerror, exc.fix) from None


def _become_command(spec, hardened):
    if not spec.get("tty"):
        os.setsid()  # no controlling terminal to push input into
    libc.set_no_new_privs()
    # Python ignores SIGPIPE and SIGXFSZ at start-up; the command must not
    # inherit that, nor D's blocked mask.
    for sig in FORWARDED + (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTSTP,
                            signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    os.chdir(spec["cwd"])
    harden.apply(hardened)  # last: limits, no capabilities, seccomp


def _supervise(child, mask):
    """Reap everything, forward signals to the command; return its status."""
    while True:
        info = signal.sigwaitinfo(mask)
        if info.si_signo == signal.SIGCHLD:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return 1, None
                if pid == 0:
                    break
                if pid == child:
                    if os.WIFSIGNALED(status):
                        sig = os.WTERMSIG(status)
                        return 128 + sig, sig
                    return os.WEXITSTATUS(status), None
        elif info.si_code != SI_KERNEL:
            # A signal the terminal generated reached the command directly
            # (same process group); only forward what someone sent to us.
            try:
                os.kill(child, info.si_signo)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------- entry point


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ctl_fd, parent_pid = int(argv[0]), int(argv[1])
    ctl = socket.socket(fileno=ctl_fd)
    flags = fcntl.fcntl(ctl_fd, fcntl.F_GETFD)
    fcntl.fcntl(ctl_fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    spec, _ = recv(ctl)
    if spec is None:
        os._exit(1)
    stage1(ctl, spec, parent_pid)


if __name__ == "__main__":
    main()
