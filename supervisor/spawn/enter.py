"""``corral exec``: start another process inside a running sandbox.  Standard
library only.

    X  corral exec (the caller)            waits, forwards signals to Y
    └─ Y  a fresh single-threaded child    setns() into the namespaces of the
          │                                sandbox's pid 1 (D), forwards signals
          └─ Z  the command                pid N of the sandbox (fork after
                                           setns(pid)); E's restrictions
                                           (``stage1._become_command``), exec

Y joins the user namespace first (setns into a user namespace needs a
single-threaded process; its owner gets every capability in it, which the
other setns calls need), then mount, pid, uts, ipc, net and cgroup.
setns(CLONE_NEWNS) sets root and cwd to the root of the sandbox's mount
namespace — the root pid 1 pivoted into; Y checks that ``/`` is now the same
directory as ``/proc/<D>/root`` and refuses to go on otherwise.  Namespaces
the caller already shares (the host network with ``--net host``) are left
alone.  Sharing the network namespace means sharing ``tap0`` and so the
supervisor's netstack and policy: nothing else is needed for the same rules.

Y keeps only fds 0, 1, 2 (and its error pipe, close-on-exec) of what the
caller passed, as ``corral run`` gives the command nothing else: a
``5>>~/file`` on the ``corral exec`` command line must not reach inside.

Z dies with Y, Y with X (PR_SET_PDEATHSIG), and Z is in the sandbox's pid
namespace, so it dies with the sandbox too.  Failures reach X as one JSON
object (:meth:`stage1.StepError.to_dict`) on an error pipe; Y exits with Z's
status (128+N for signal N).

Run as ``python -I -m corral.spawn.enter REQUEST_FD ERROR_FD PARENT_PID``
(REQUEST_FD: a JSON ``{"d_pid", "spec", "argv"}``), or forked: :func:`run`.
"""

import errno
import json
import os
import select
import signal
import sys

from . import libc, stage1

# setns order: user first (it grants the capabilities the others need).
NAMESPACES = (
    ("user", libc.CLONE_NEWUSER),
    ("mnt", libc.CLONE_NEWNS),
    ("pid", libc.CLONE_NEWPID),
    ("uts", libc.CLONE_NEWUTS),
    ("ipc", libc.CLONE_NEWIPC),
    ("net", libc.CLONE_NEWNET),
    ("cgroup", libc.CLONE_NEWCGROUP),
)
SIGNALS = set(stage1.FORWARDED) | {signal.SIGCHLD}
MAX_FD = 1 << 30  # above any RLIMIT_NOFILE (closerange uses close_range(2))


def run(d_pid, spec, argv, err_w, parent_pid):
    """Y: never returns."""
    try:
        code = _run(d_pid, spec, argv, err_w, parent_pid)
    except stage1.StepError as exc:
        _report(err_w, exc)
        code = exc.exit_code
    except BaseException as exc:
        _report(err_w, stage1.StepError("exec", getattr(exc, "errno", None), repr(exc),
                                        exit_code=125))
        code = 125
    os._exit(code)


def _report(err_w, exc):
    try:
        os.write(err_w, json.dumps(exc.to_dict()).encode())
    except OSError:
        pass


def _run(d_pid, spec, argv, err_w, parent_pid):
    libc.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:
        return 1
    keep_only_stdio(err_w)
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    enter_namespaces(d_pid)
    hardened = stage1._prepare_hardening(spec)  # inside: the same filter E got
    lifeline_r, lifeline_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(lifeline_w)
        _command(spec, hardened, argv, err_w, lifeline_r)  # never returns
    os.close(lifeline_r)
    code, _sig = stage1._supervise(child, SIGNALS)
    return code


def keep_only_stdio(err_w):
    """Close every fd but 0, 1, 2 and ``err_w`` (close-on-exec)."""
    os.closerange(3, err_w)
    os.closerange(err_w + 1, MAX_FD)


def enter_namespaces(d_pid):
    """setns() into every namespace of ``d_pid`` that differs from ours."""
    fds = []
    try:
        try:
            root = os.open("/proc/%d/root" % d_pid, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            for name, nstype in NAMESPACES:
                target = "/proc/%d/ns/%s" % (d_pid, name)
                if _same_file(target, "/proc/self/ns/" + name):
                    continue
                fds.append((name, nstype, os.open(target, os.O_RDONLY | os.O_CLOEXEC)))
        except OSError as exc:
            raise stage1.StepError(
                "exec: open namespaces", exc.errno, "/proc/%d (the sandbox's pid 1)" % d_pid,
                fix="the sandbox has ended, or it belongs to another user: see `corral ps`",
                exit_code=125) from None
        for name, nstype, fd in fds:
            try:
                libc.setns(fd, nstype)
            except OSError as exc:
                raise stage1.StepError(
                    "exec: setns %s" % name, exc.errno, str(exc),
                    fix="run `corral exec` as the user who started the sandbox, from the "
                    "same place (not from inside another namespace)", exit_code=125) from None
        want, got = os.fstat(root), os.stat("/")
        if (want.st_dev, want.st_ino) != (got.st_dev, got.st_ino):
            raise stage1.StepError("exec: root", errno.EXDEV,
                                   "/ after setns is not the sandbox's root", exit_code=125)
        os.close(root)
    finally:
        for _name, _nstype, fd in fds:
            os.close(fd)


def _same_file(a, b):
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _command(spec, hardened, argv, err_w, lifeline):
    """Z: the command, in the sandbox's pid namespace."""
    try:
        libc.set_pdeathsig(signal.SIGKILL)
        if select.select([lifeline], [], [], 0)[0]:  # Y died before we armed it
            os._exit(1)
        os.close(lifeline)
        # The environment E got (stage1._spawn_command adds CORRAL_SANDBOX).
        env = dict(spec["env"], CORRAL_SANDBOX="1")
        stage1._become_command(spec, hardened)
    except BaseException as exc:
        _report(err_w, stage1.StepError(
            "preparing the command (cwd, limits, capabilities, seccomp)",
            getattr(exc, "errno", None), repr(exc), exit_code=125))
        os._exit(125)
    try:
        os.execve(stage1._which(argv[0], env.get("PATH", os.defpath)), argv, env)
    except OSError as exc:
        err = exc.errno or errno.EIO
        code = 127 if err == errno.ENOENT else 126
        _report(err_w, stage1.exec_error(argv[0], err, env.get("PATH", os.defpath)))
        os._exit(code)
    finally:
        os._exit(125)


# ---------------------------------------------------------------- entry point


def main(args=None):
    args = sys.argv[1:] if args is None else args
    req_fd, err_w, parent_pid = (int(a) for a in args)
    with open(req_fd, "rb") as f:
        request = json.loads(f.read())
    os.set_inheritable(err_w, False)
    run(request["d_pid"], request["spec"], request["argv"], err_w, parent_pid)


if __name__ == "__main__":
    main()
