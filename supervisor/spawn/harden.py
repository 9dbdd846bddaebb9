"""What the command's process (E) loses just before execve (issue 5):
resource limits, every capability, the abstract unix sockets of others
(Landlock scoping, where the kernel has it) and the seccomp filter.  Standard
library only.

:func:`prepare` runs in pid 1 before the fork (so a problem is a set-up error
reported to the supervisor, and the command never runs); :func:`apply` runs in
E after ``no_new_privs``.  The spec (built by ``corral.hardening.spec``)::

    {"seccomp": "default" | "off", "deny": [syscall names], "allow_nested": bool,
     "rlimits": {"AS": bytes, "NPROC": n, "CPU": seconds, "NOFILE": n, "FSIZE": bytes}}
"""

import ctypes
import errno
import os
import resource

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

OPTION_OF = {"AS": "--memory", "NPROC": "--pids", "CPU": "--cpu-time", "NOFILE": "--nofile",
             "FSIZE": "--fsize"}

# Landlock (the same system call numbers on every architecture).
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1  # ABI 6 (Linux 6.12)
LANDLOCK_SCOPE_ABI = 6


class HardenError(OSError):
    def __init__(self, err, message, fix=None):
        super().__init__(err, message)
        self.fix = fix


class Prepared:
    def __init__(self, rlimits, seccomp_program, landlock_fd=None):
        self.rlimits = rlimits  # [(resource constant, value)]
        self.program = seccomp_program  # BPF bytes (seccomp.build_program), or None: no filter
        self.landlock_fd = landlock_fd  # a ruleset scoping abstract unix sockets, or None


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


def landlock_abi():
    """(ABI version, None), or (0, why) when this kernel has no usable Landlock."""
    from . import libc

    version = libc._libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None,
                                 ctypes.c_size_t(0),
                                 ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    if version < 0:
        err = ctypes.get_errno()
        why = {errno.ENOSYS: "not built into this kernel",
               errno.EOPNOTSUPP: "built in but not enabled (add landlock to the lsm= boot option)"}
        return 0, why.get(err, errno.errorcode.get(err, str(err)))
    return version, None


def _abstract_socket_scope():
    """A Landlock ruleset that handles no access right but scopes abstract
    unix sockets: once restricted, the command can connect() or sendto()
    only abstract sockets created inside the sandbox.  None when the kernel
    lacks it (Landlock ABI < 6): the network namespace is the only layer
    then, and ``--net host`` shares the host's abstract sockets."""
    abi, _why = landlock_abi()
    if abi < LANDLOCK_SCOPE_ABI:
        return None
    from . import libc

    attr = _RulesetAttr(0, 0, LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET)
    fd = libc._libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                            ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise HardenError(err, "landlock_create_ruleset (scope abstract unix sockets): %s"
                          % errno.errorcode.get(err, err), "report this as a corral bug")
    return fd


def _restrict_self(fd):
    from . import libc

    rc = libc._libc.syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd),
                            ctypes.c_uint32(0))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "landlock_restrict_self: %s" % errno.errorcode.get(err, err))


def wants_seccomp(spec):
    return (spec or {}).get("seccomp", "default") != "off"


def seccomp_program(spec):
    """The command's seccomp filter for ``spec`` as a BPF program (bytes), or None
    when it runs without one (``--seccomp off``).  Raises ``seccomp.SeccompError``."""
    if not wants_seccomp(spec):
        return None
    from . import seccomp

    return seccomp.build_program(seccomp.rules(spec.get("deny", ()),
                                               spec.get("allow_nested", False)))


BUILD = object()


def prepare(spec, program=BUILD):
    """Check the limits against the hard limits we run under; ``program``: the
    seccomp filter :func:`seccomp_program` built for this ``spec`` elsewhere
    (stage-1 builds it while pid 1 mounts), else built here.  Raises
    :class:`HardenError` or ``seccomp.SeccompError``."""
    if program is BUILD:
        program = seccomp_program(spec)
    spec = spec or {}
    rlimits = []
    for name, value in sorted((spec.get("rlimits") or {}).items()):
        which = getattr(resource, "RLIMIT_" + name)
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and value > hard:
            raise HardenError(
                errno.EPERM, "%s %d is above the hard limit corral runs under (%d)"
                % (OPTION_OF[name], value, hard),
                "ask for at most %d, or raise the hard limit (ulimit -H) before starting corral"
                % hard,
            )
        rlimits.append((which, value))
    return Prepared(rlimits, program, _abstract_socket_scope())


def apply(prepared):
    """In E: limits, then no capabilities at all, then the Landlock scope
    (needs no_new_privs, set before), then the filter (last: it may deny what
    comes before it)."""
    for which, value in prepared.rlimits:
        resource.setrlimit(which, (value, value))
    drop_capabilities()
    if prepared.landlock_fd is not None:
        _restrict_self(prepared.landlock_fd)
        os.close(prepared.landlock_fd)
    if prepared.program is not None:
        from . import seccomp

        seccomp.load(prepared.program)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities():
    """Empty the bounding, ambient, inheritable, permitted and effective sets.

    E holds every capability of the sandbox's user namespace until execve.  As
    a non-zero uid, execve would drop them; as uid 0 (``--root``) it would
    keep them, and in library mode there is no execve at all.  With the
    bounding and inheritable sets empty, no later execve — of a root-owned or
    file-capability binary — can give any back."""
    from . import libc

    last = _cap_last_cap()
    for cap in range(last + 1):
        try:
            libc.prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a capability this kernel lacks
                raise
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc._libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "capset to empty sets: %s" % errno.errorcode.get(err, err))


def _cap_last_cap():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63
