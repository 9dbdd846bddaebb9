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
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_INSN_SIZE = 8  # struct sock_filter
_BPF_MAXINSNS = 4096
_lib = None


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
    """libseccomp, loaded once (stage-1 loads it while the host's /usr is its root)."""
    global _lib
    if _lib is not None:
        return _lib
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
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    _lib = lib
    return lib


def build_program(rule_list):
    """The filter of ``rule_list`` (:func:`rules`) as a classic BPF program: the
    bytes of its ``struct sock_filter`` array, built with libseccomp where an
    error can still be reported (stage-1, or ``corral exec``'s helper) and loaded
    by :func:`load` in the command's process, which so runs no libseccomp code
    between its fork and its execve."""
    lib = _library()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise SeccompError(errno.ENOMEM, "seccomp_init failed")
    try:
        _add_rules(lib, ctx, rule_list)
        # a memfd, not a pipe: the export never blocks, whatever its size
        fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc != 0:
                raise SeccompError(-rc, "seccomp_export_bpf: %s" % os.strerror(-rc))
            size = os.lseek(fd, 0, os.SEEK_CUR)
            program = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    if not program or len(program) % _INSN_SIZE or len(program) // _INSN_SIZE > _BPF_MAXINSNS:
        raise SeccompError(errno.EINVAL, "libseccomp exported a filter of %d bytes" % len(program),
                           "report this as a corral bug")
    return program


def _add_rules(lib, ctx, rule_list):
    for arch in _COMPAT_ARCHES.get(os.uname().machine, ()):
        token = lib.seccomp_arch_resolve_name(arch.encode())
        rc = lib.seccomp_arch_add(ctx, token) if token else 0
        if rc not in (0, -errno.EEXIST):
            raise SeccompError(-rc, "seccomp_arch_add %s: %s" % (arch, os.strerror(-rc)))
    lib.seccomp_attr_set(ctx, _ATTR_ACT_BADARCH, _ACT_KILL_PROCESS)
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
        rc = lib.seccomp_rule_add_array(ctx, _ACT_ERRNO | err, number, count, args)
        if rc != 0:
            raise SeccompError(-rc, "seccomp rule for %s: %s" % (name, os.strerror(-rc)))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load(program):
    """Install ``program`` (from :func:`build_program`) on the calling thread, as
    seccomp_load does (``no_new_privs`` must be set before)."""
    from . import libc

    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // _INSN_SIZE, ctypes.addressof(buf))
    try:
        libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog))
    except OSError as exc:
        raise SeccompError(exc.errno, "loading the seccomp filter: %s" % os.strerror(exc.errno)) from None
