"""Thin ctypes wrappers for the Linux calls the stage-1 / pid-1 code needs.

Standard library only (it runs in the sandbox's first processes, where import
time is start-up time).  Every wrapper raises ``OSError(errno, "<call> <args>:
<strerror>")`` on failure, so a caller can report the step, the errno and the
arguments without guessing.  Calls that glibc does not wrap (pivot_root,
mount_setattr) go through ``syscall(2)`` with the number for this machine.
"""

import ctypes
import os
import socket

_libc = ctypes.CDLL(None, use_errno=True)

# unshare(2) / clone(2)
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2)
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000

# umount2(2)
MNT_FORCE = 0x1
MNT_DETACH = 0x2

# mount_setattr(2), Linux 5.12+
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

# statvfs f_flag bits -> the mount flags a bind remount must repeat (in a user
# namespace the kernel refuses to clear a flag that the parent locked).
_STATVFS_TO_MS = (
    (os.ST_RDONLY, MS_RDONLY),
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)

_SYS_PIVOT_ROOT = {
    "x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41,
    "ppc64le": 203, "ppc64": 203, "s390x": 217, "i686": 217, "i386": 217,
    "armv7l": 218, "armv6l": 218,
}
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (5.12+)
# The new mount API (5.2+), numbered alike on every architecture too.
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _fail(call, args):
    err = ctypes.get_errno()
    return OSError(err, "%s %s: %s" % (call, args, os.strerror(err)))


def _b(value):
    return None if value is None else os.fsencode(value)


def unshare(flags):
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        raise _fail("unshare", hex(flags))


def setns(fd, nstype=0):
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        raise _fail("setns", "fd %d type %#x" % (fd, nstype))


def mount(source, target, fstype=None, flags=0, data=None):
    if _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)) != 0:
        raise _fail("mount", "%r on %r (type %s, flags %#x, %r)" % (source, target, fstype, flags, data))


def umount2(target, flags=0):
    if _libc.umount2(_b(target), ctypes.c_int(flags)) != 0:
        raise _fail("umount2", "%r flags %#x" % (target, flags))


def pivot_root(new_root, put_old):
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(38, "pivot_root: no syscall number known for %s" % os.uname().machine)
    if _libc.syscall(ctypes.c_long(number), _b(new_root), _b(put_old)) != 0:
        raise _fail("pivot_root", "%r %r" % (new_root, put_old))


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path, attr_set, attr_clr=0, *, recursive=False, dirfd=AT_FDCWD):
    """Change mount attributes (Linux 5.12+; ENOSYS before).  Unlike a bind
    remount, it leaves the flags it is not asked to change alone."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    rc = _libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(dirfd), _b(path),
                       ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    if rc != 0:
        raise _fail("mount_setattr", "%r set %#x clear %#x%s" % (
            path, attr_set, attr_clr, " recursive" if recursive else ""))


def fsmount(fstype, options, attr_flags):
    """A detached mount of a new ``fstype`` superblock configured with ``options``
    (``[(key, value or None for a flag)]``): its fd, for :func:`move_mount`."""
    fs = _libc.syscall(ctypes.c_long(_SYS_FSOPEN), _b(fstype), ctypes.c_uint(FSOPEN_CLOEXEC))
    if fs < 0:
        raise _fail("fsopen", fstype)
    try:
        for key, value in options:
            cmd = FSCONFIG_SET_FLAG if value is None else FSCONFIG_SET_STRING
            if _libc.syscall(ctypes.c_long(_SYS_FSCONFIG), ctypes.c_int(fs), ctypes.c_uint(cmd),
                             _b(key), _b(value), ctypes.c_int(0)) != 0:
                raise _fail("fsconfig", "%s %s=%r" % (fstype, key, value))
        if _libc.syscall(ctypes.c_long(_SYS_FSCONFIG), ctypes.c_int(fs),
                         ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0)) != 0:
            raise _fail("fsconfig", "%s create" % fstype)
        fd = _libc.syscall(ctypes.c_long(_SYS_FSMOUNT), ctypes.c_int(fs),
                           ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attr_flags))
        if fd < 0:
            raise _fail("fsmount", fstype)
        return fd
    finally:
        os.close(fs)


def move_mount(fd, target):
    """Attach the detached mount ``fd`` (from :func:`fsmount`) at ``target``."""
    if _libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(fd), b"",
                     ctypes.c_int(AT_FDCWD), _b(target),
                     ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)) != 0:
        raise _fail("move_mount", "fd %d to %r" % (fd, target))


def locked_flags(path):
    """The MS_* flags of the mount holding ``path`` that a MS_REMOUNT|MS_BIND
    must repeat (read with statvfs)."""
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _STATVFS_TO_MS if f_flag & st)


def remount_bind_ro(path):
    """Make the one mount at ``path`` read-only the pre-5.12 way, keeping the
    flags the user namespace may not clear."""
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | locked_flags(path))


def prctl(option, arg2=0, arg3=0, arg4=0, arg5=0):
    rc = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                     ctypes.c_ulong(arg4), ctypes.c_ulong(arg5))
    if rc < 0:
        raise _fail("prctl", "%d %d" % (option, arg2))
    return rc


def set_pdeathsig(sig):
    prctl(PR_SET_PDEATHSIG, int(sig))


def set_no_new_privs():
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def sethostname(name):
    try:
        socket.sethostname(name)
    except OSError as exc:
        raise OSError(exc.errno, "sethostname %r: %s" % (name, os.strerror(exc.errno))) from None


def set_link_up(ifname):
    """Bring a network interface up (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        name = ifname.encode()
        try:
            ifreq = fcntl.ioctl(sock, _SIOCGIFFLAGS, struct.pack("16sH22x", name, 0))
            (flags,) = struct.unpack_from("H", ifreq, 16)
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", name, flags | _IFF_UP))
        except OSError as exc:
            raise OSError(exc.errno, "ioctl SIOCSIFFLAGS %s up: %s" % (ifname, os.strerror(exc.errno))) from None
