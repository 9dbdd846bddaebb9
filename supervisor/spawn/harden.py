"""What the command's process (E) loses just before execve (issue 5):
resource limits, every capability, and the seccomp filter.  Standard library
only.

:func:`prepare` runs in pid 1 before the fork (so a problem is a set-up error
reported to the supervisor, and the command never runs); :func:`apply` runs in
E after ``no_new_privs``.  The spec (built by ``corral.hardening.spec``)::

    {"seccomp": "default" | "off", "deny": [syscall names], "allow_nested": bool,
     "rlimits": {"AS": bytes, "NPROC": n, "CPU": seconds, "NOFILE": n, "FSIZE": bytes}}
"""

import ctypes
import errno
import resource

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

OPTION_OF = {"AS": "--memory", "NPROC": "--pids", "CPU": "--cpu-time", "NOFILE": "--nofile",
             "FSIZE": "--fsize"}


class HardenError(OSError):
    def __init__(self, err, message, fix=None):
        super().__init__(err, message)
        self.fix = fix


class Prepared:
    def __init__(self, rlimits, seccomp_filter):
        self.rlimits = rlimits  # [(resource constant, value)]
        self.filter = seccomp_filter


def prepare(spec):
    """Check the limits against the hard limits we run under and build the
    seccomp filter.  Raises :class:`HardenError` or ``seccomp.SeccompError``."""
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
    seccomp_filter = None
    if spec.get("seccomp", "default") != "off":
        from . import seccomp

        seccomp_filter = seccomp.Filter(seccomp.rules(spec.get("deny", ()),
                                                      spec.get("allow_nested", False)))
    return Prepared(rlimits, seccomp_filter)


def apply(prepared):
    """In E: limits, then no capabilities at all, then the filter (last: it
    may deny what comes before it)."""
    for which, value in prepared.rlimits:
        resource.setrlimit(which, (value, value))
    drop_capabilities()
    if prepared.filter is not None:
        prepared.filter.load()


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
