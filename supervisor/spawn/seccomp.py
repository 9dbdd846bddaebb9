"""The sandboxed command's seccomp filter (issue 5) — stdlib + ctypes against
the system's libseccomp (``libseccomp.so.2``, Debian/Ubuntu ``libseccomp2``,
Fedora ``libseccomp``).  No fallback: when a filter is asked for and cannot be
built or loaded, the sandbox is not started (fail closed).

The filter allows by default and denies, with EPERM, what a sandboxed build
has no business doing and what has a long record of kernel bugs or escapes:

- ``ioctl(fd, TIOCSTI | TIOCLINUX, …)``: pushing input into the terminal the
  command shares with the user (terminal injection).  The request is compared
  on its low 32 bits (the kernel's ``cmd`` is an ``unsigned int``): a filter
  comparing all 64 bits misses ``TIOCSTI | 1 << 32`` (CVE-2019-10063).
- the kernel keyring, bpf, perf_event_open, userfaultfd, kexec, modules,
  iopl/ioperm, swap, reboot, open_by_handle_at;
- unless ``allow_nested``: every mount call, old and new API (the mounts are
  done by then), and new user namespaces: ``unshare`` and ``clone`` with
  ``CLONE_NEWUSER``, and ``setns``.  ``clone3`` passes its flags in a struct
  that seccomp cannot read, so it gets ENOSYS: glibc (2.34+), musl and Go then
  fall back to ``clone``, whose flags the filter does see (the same trick as
  Docker, Podman and systemd-nspawn).

Architectures: the filter covers the native ABI and the compat ABIs the same
kernel runs (x86_64: i386 and x32; aarch64: arm), each with the same rules, so
a 32-bit program inside is as filtered as a 64-bit one.  Any other
architecture token kills the process.
"""

import ctypes
import errno
import os

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
CLONE_NEWUSER = 0x10000000

# Denied outright (EPERM), whatever the arguments.
DENIED = (
    # kernel keyring: shared per-uid state, a long CVE list
    "keyctl", "add_key", "request_key",
    # large kernel attack surfaces with no use in a build
    "bpf", "perf_event_open", "userfaultfd",
    # the machine itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "iopl", "ioperm", "swapon", "swapoff", "reboot",
    # file handles bypass path-based checks (the "shocker" escape)
    "open_by_handle_at",
)
# Mounts are done before the command starts.  With allow_nested they stay
# allowed: they then work only in user namespaces the command creates (it has
# no capability in the sandbox's own), where a nested corral needs them.
MOUNTS = (
    "mount", "umount2", "pivot_root",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
)

# libseccomp's ABI (seccomp.h, stable since 2.0).
_ACT_KILL_PROCESS = 0x80000000
_ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000
_ATTR_ACT_BADARCH = 2
_CMP_MASKED_EQ = 7
_COMPAT_ARCHES = {"x86_64": ("x86", "x32"), "aarch64": ("arm",)}
_LIBRARY = "libseccomp.so.2"


class SeccompError(OSError):
    """The filter could not be built or loaded; ``fix`` says what to do."""

    def __init__(self, err, message, fix=None):
        super().__init__(err, message)
        self.fix = fix


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def rules(deny=(), allow_nested=False):
    """The filter as data: ``(syscall, errno, condition)`` tuples, where
    ``condition`` is None or ``(arg_index, mask, value)`` meaning
    ``args[arg_index] & mask == value``."""
    out = [(name, errno.EPERM, None) for name in DENIED]
    out += [("ioctl", errno.EPERM, (1, 0xFFFFFFFF, request)) for request in (TIOCSTI, TIOCLINUX)]
    if not allow_nested:
        out += [(name, errno.EPERM, None) for name in MOUNTS]
        flags_arg = 1 if os.uname().machine.startswith("s390") else 0  # clone(stack, flags) there
        out += [
            ("unshare", errno.EPERM, (0, CLONE_NEWUSER, CLONE_NEWUSER)),
            ("clone", errno.EPERM, (flags_arg, CLONE_NEWUSER, CLONE_NEWUSER)),
            ("clone3", errno.ENOSYS, None),
            ("setns", errno.EPERM, None),
        ]
    seen = {name for name, _, cond in out if cond is None}
    out += [(name, errno.EPERM, None) for name in deny if name not in seen]
    return out


def _library():
    try:
        lib = ctypes.CDLL(_LIBRARY)
    except OSError as exc:
        raise SeccompError(
            errno.ENOENT, "cannot load %s (%s)" % (_LIBRARY, exc),
            "install libseccomp (Debian/Ubuntu: apt install libseccomp2; Fedora: dnf install "
            "libseccomp), or run without the filter with --seccomp off",
        ) from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    return lib


class Filter:
    """A filter built in pid 1 (where errors can be reported) and loaded in
    the command's process just before execve (:meth:`load`)."""

    def __init__(self, rule_list):
        self._lib = lib = _library()
        self._ctx = lib.seccomp_init(_ACT_ALLOW)
        if not self._ctx:
            raise SeccompError(errno.ENOMEM, "seccomp_init failed")
        for arch in _COMPAT_ARCHES.get(os.uname().machine, ()):
            token = lib.seccomp_arch_resolve_name(arch.encode())
            rc = lib.seccomp_arch_add(self._ctx, token) if token else 0
            if rc not in (0, -errno.EEXIST):
                raise SeccompError(-rc, "seccomp_arch_add %s: %s" % (arch, os.strerror(-rc)))
        lib.seccomp_attr_set(self._ctx, _ATTR_ACT_BADARCH, _ACT_KILL_PROCESS)
        for name, err, cond in rule_list:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                raise SeccompError(errno.EINVAL, "unknown system call %r in the seccomp filter" % name,
                                   "check the names in the --seccomp file (as in `man 2 syscalls`)")
            args = (_ArgCmp * 1)()
            count = 0
            if cond is not None:
                index, mask, value = cond
                args[0] = _ArgCmp(index, _CMP_MASKED_EQ, mask, value)
                count = 1
            rc = lib.seccomp_rule_add_array(self._ctx, _ACT_ERRNO | err, number, count, args)
            if rc != 0:
                raise SeccompError(-rc, "seccomp rule for %s: %s" % (name, os.strerror(-rc)))

    def load(self):
        rc = self._lib.seccomp_load(self._ctx)
        if rc != 0:
            raise SeccompError(-rc, "seccomp_load: %s" % os.strerror(-rc))
