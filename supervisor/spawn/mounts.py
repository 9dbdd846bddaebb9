"""Build the sandbox's root from a mount plan (DESIGN §3).  Standard library only.

:func:`setup_root` runs in pid 1 of the sandbox, already inside its own user,
mount and pid namespaces (uid/gid maps written, full capabilities there).  It
carries out the operations of :class:`corral.fs.plan.Plan` on a fresh root
under ``<scratch>/root``, then pivots into it and detaches the host's root.
Any failure raises :class:`MountError` — the command never runs with less
isolation than asked — except an overlay that cannot be mounted, which
becomes a read-only bind (recorded in ``<scratch>/overlays.json`` with the
upper directory of every overlay and the host path it records changes to).
A bind passes ``connect()`` through to the host's unix sockets, so the
sockets a bind or overlay op lists (``"sockets"``) are covered with an empty
file after a bind.  A ``snapshot`` op copies a host directory (its bind-mounted
files' content included, sockets left out) to a private tmpfs, the lower layer
of one writable overlay; over its bounds it runs the plan's ``split`` instead.
"""

import errno as _errno
import json
import os
import socket
import stat
import struct

from . import libc

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))
MANIFEST = "overlays.json"
WATCH_ENTRIES = 2000  # entries fingerprinted below one watched directory

_NOSUID_NODEV = libc.MS_NOSUID | libc.MS_NODEV
_FIXES = {
    ("mount proc", _errno.EPERM): "the kernel allows a fresh /proc only where the host's /proc is "
    "fully visible; inside docker/podman run the container with "
    "--security-opt systempaths=unconfined, or run corral outside the container",
    ("pivot_root", _errno.EINVAL): "the host root cannot be pivoted away (an initramfs root?); "
    "run `corral doctor`",
}
_ERRNO_FIXES = {
    _errno.EPERM: "the kernel refused a mount in the user namespace; run `corral doctor` "
    "(unprivileged user namespaces, AppArmor/SELinux restrictions)",
    _errno.EACCES: "a path on the way is not accessible to your user; check its permissions",
    _errno.ENOENT: "the path is missing (it changed while the sandbox started?); check that it "
    "exists, then retry",
    _errno.EROFS: "the mount point is missing in a read-only part of the view; create it on the "
    "host first, or mount its parent with --tmpfs or --rw",
    _errno.ENOSPC: "the scratch directory's filesystem is full; free space or pass --scratch DIR",
    _errno.ENOMEM: "out of memory or of mounts (sysctl fs.mount-max); close other sandboxes",
}



def _tmpfs_data(options, op):
    """tmpfs options, with the size limit the plan carries (a filler inside
    must not eat the host's memory: tmpfs defaults to half of RAM)."""
    size = op.get("size")
    return options + (",size=%d" % size if size else "")


def fingerprint(path, limit=WATCH_ENTRIES):
    """``{path: [kind, size, mtime_ns, ctime_ns, ino, mode]}`` of ``path`` and, for a
    directory, what lies below it (symlinks not followed, at most ``limit`` entries):
    compared before and after a run, it says what changed (any write moves ctime)."""
    out = {}
    todo = [path]
    while todo and len(out) < limit:
        current = todo.pop()
        try:
            st = os.lstat(current)
        except OSError:
            continue
        kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
        out[current] = [kind, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                        stat.S_IMODE(st.st_mode)]
        if kind == "dir":
            try:
                names = sorted(os.listdir(current), reverse=True)
            except OSError:
                continue
            todo.extend(os.path.join(current, name) for name in names)
    return out


class MountError(Exception):
    """A step of :func:`setup_root` failed: ``step``, ``path``, ``errno`` and a
    ``fix`` for the user."""

    def __init__(self, step, path, errno):
        self.step = step
        self.path = path
        self.errno = errno
        self.fix = _FIXES.get((step, errno)) or _ERRNO_FIXES.get(errno) or (
            "run `corral doctor` and report this step and errno")
        super().__init__("%s %s: %s (%s). Fix: %s" % (
            step, path, os.strerror(errno), _errno.errorcode.get(errno, errno), self.fix))


def setup_root(plan_ops, helper=None):
    """Carry out ``plan_ops`` (``Plan.to_json()``, or its JSON text).  ``helper``:
    a socket to a process running :func:`premake_overlays` on the same plan, in
    the same user and mount namespaces (closed here)."""
    if isinstance(plan_ops, str):
        plan_ops = json.loads(plan_ops)
    builder = _Builder(helper)
    umask = os.umask(0)  # modes in the plan are exact
    try:
        builder.run(plan_ops)
    finally:
        os.umask(umask)
        builder.close_helper()


def premake_overlays(plan_ops, sock):
    """Make the writable overlays of ``plan_ops`` (top level) while :func:`setup_root`
    works through the plan in another process, from the last one back: an overlay's
    superblock (its work directory's checks: ~0.8 ms each) is most of the cost of a
    mount, and so runs on another CPU.  Each is made as a detached mount (the new
    mount API) and sent on ``sock`` with its upper directory's path; setup_root
    attaches it where the plan says, in the plan's order.  Whoever creates an
    overlay's work directory first makes it (``mkdir`` is the claim): this stops at
    the first one setup_root has claimed, and never reports an error: on any
    failure it sends the path alone, and setup_root makes that overlay itself,
    its errors and fallbacks included.  Closes ``sock``."""
    if isinstance(plan_ops, str):
        plan_ops = json.loads(plan_ops)
    os.umask(0)  # modes in the plan are exact
    try:
        for op in reversed(plan_ops):
            if op.get("op") != "overlay" or op.get("ro") or "upper" not in op:
                continue
            if not _plain(op["path"], op["upper"], op["work"]):
                continue  # left to setup_root's own mount
            scratch = os.path.dirname(os.path.dirname(op["work"]))
            for layer in (scratch + "/upper", scratch + "/work"):
                try:
                    os.mkdir(layer, 0o700)
                except FileExistsError:
                    pass
            try:
                os.mkdir(op["work"], 0o700)
            except FileExistsError:
                return  # setup_root got there first: it makes this one and those before
            fds = []
            try:
                try:
                    os.mkdir(op["upper"], op.get("mode", 0o755))
                except FileExistsError:
                    pass
                fds.append(libc.fsmount("overlay", (
                    ("lowerdir", op["path"]), ("upperdir", op["upper"]),
                    ("workdir", op["work"]), ("userxattr", None)),
                    libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NODEV))
            except OSError:
                pass  # setup_root tries it itself
            try:
                _send_mount(sock, op["upper"], fds)
            finally:
                for fd in fds:
                    os.close(fd)
    except OSError:
        pass  # setup_root's end is gone; an overlay claimed here becomes its own (EOF)
    finally:
        sock.close()


def _plain(*paths):
    """No character the overlay options' syntax would need escaped."""
    return not any(c in p for p in paths for c in ",:\\")


def _send_mount(sock, upper, fds):
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(fds[0]))] if fds else []
    sock.sendmsg([os.fsencode(upper)], ancillary)


_FD = struct.Struct("i")
_SNAPSHOT_MODE = 0o1777  # no setuid/setgid bits in a copy (the tmpfs is nosuid anyway)
# A subdirectory of a snapshot with more entries than that below it is an overlay of its
# own rather than copied: an overlay costs what ~20-50 entries cost to copy.
SNAPSHOT_COPY_AT_MOST = 64


def scan_tree(top, limit):
    """Yield the entries below directory ``top`` (``os.DirEntry``, depth first, never
    following a symlink; an unreadable directory counts as empty), stopping after
    ``limit + 1`` of them: a caller that got more than ``limit`` knows the tree is
    larger than that, without a walk of all of it."""
    seen, todo = 0, [top]
    while todo:
        try:
            it = os.scandir(todo.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                seen += 1
                yield entry
                if seen > limit:
                    return
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)


def _holds_more_than(path, limit):
    """Whether directory ``path`` has more than ``limit`` entries below it (counting
    stops there; an unreadable part counts as empty)."""
    return sum(1 for _ in scan_tree(path, limit)) > limit


def _copy_tree(src, dst, max_entries, max_bytes, skip=()):
    """Copy directory ``src`` to a new ``dst``: directories, regular files (content,
    mode, mtime) and symlinks, read with the command's own rights, never following a
    symlink or opening anything but a regular file; sockets, fifos and devices are left
    out.  Returns the host paths to bind read-only over their placeholder (unreadable
    files, directories the command cannot enter), or None when the copy is over
    ``max_entries`` / ``max_bytes`` or meets a directory it may enter but not list
    (its entries could not be carried).  The directories in ``skip`` are copied
    empty (something is mounted over them)."""
    entries = size = 0
    binds = []
    todo = [(src, dst)]
    done = []  # (copy, host stat): modes and mtimes are set last, children first
    while todo:
        host, copy = todo.pop()
        try:
            fd = os.open(host, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            done.append((copy, os.fstat(fd)))
            os.mkdir(copy, 0o700)
            with os.scandir(fd) as it:
                listed = list(it)
            for entry in listed:  # kinds from the directory itself: no stat per entry
                entries += 1
                if entries > max_entries:
                    return None
                name = entry.name
                h, c = host + "/" + name, copy + "/" + name
                try:
                    if entry.is_symlink():
                        os.symlink(os.readlink(name, dir_fd=fd), c)
                    elif entry.is_dir(follow_symlinks=False):
                        if h in skip:
                            os.mkdir(c, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                                     & _SNAPSHOT_MODE)
                        elif os.access(name, os.X_OK, dir_fd=fd):
                            if not os.access(name, os.R_OK, dir_fd=fd):
                                return None
                            todo.append((h, c))
                        else:  # the command cannot enter it either: the host's, read-only
                            os.mkdir(c, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                                     & _SNAPSHOT_MODE)
                            binds.append(h)
                    elif entry.is_file(follow_symlinks=False):
                        copied = _copy_file(name, fd, c, max_bytes - size)
                        if copied is None:
                            return None
                        if copied == -1:
                            binds.append(h)
                        size += max(copied, 0)
                except FileNotFoundError:
                    continue  # gone since the listing
        finally:
            os.close(fd)
    for copy, st in reversed(done):
        os.chmod(copy, stat.S_IMODE(st.st_mode) & _SNAPSHOT_MODE)
        os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    return binds


def _copy_file(name, dir_fd, copy, budget):
    """Copy regular file ``name`` (in ``dir_fd``) to a new ``copy`` (mode and times
    too): the bytes copied, 0 when it is no longer a regular file (left out), -1 when
    it cannot be read (``copy`` is then an empty placeholder, its mode the host's),
    None over ``budget``."""
    try:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                      dir_fd=dir_fd)
    except PermissionError:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        os.close(os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         stat.S_IMODE(st.st_mode) & _SNAPSHOT_MODE))
        return -1
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):  # replaced since the listing
            return 0
        out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                      stat.S_IMODE(st.st_mode) & _SNAPSHOT_MODE)
        try:
            copied = 0
            while True:
                n = os.sendfile(out, src, None, 1 << 20)
                copied += n
                if copied > budget:
                    return None
                if not n or copied >= st.st_size:  # as large as it was: done
                    break
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            return copied
        finally:
            os.close(out)
    finally:
        os.close(src)


def _unescape(field):
    """Undo mountinfo's octal escapes (``\\040`` for a space...)."""
    parts = field.split("\\")
    out = [parts[0]]
    for part in parts[1:]:
        out.append(chr(int(part[:3], 8)) + part[3:])
    return "".join(out)


def _overlay_escape(path):
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


class _Builder:
    def __init__(self, helper=None):
        self.helper = helper  # a socket to premake_overlays, or None
        self.premade = {}  # upper dir -> detached mount fd (None: make it here)
        self.root = None
        self.scratch = None
        self.setattr_works = True
        self.empty_file = None
        self.empty_dir = None
        self.files = 0
        self.layer_dirs = False
        self.overlays = {}
        self.fallbacks = {}
        self.copies = {}
        self.watched = {}
        self.repos = None
        self.snap_root = None
        self.snapshots = []

    # ---------------------------------------------------------------- helpers

    def run(self, plan_ops):
        for op in plan_ops:
            method = getattr(self, "op_" + op.get("op", ""), None)
            if method is None:
                raise MountError("plan", repr(op), _errno.EINVAL)
            try:
                method(op)
            except OSError as exc:
                raise MountError(op["op"], op.get("path", ""), exc.errno) from None

    def at(self, path):
        return self.root if path == "/" else self.root + path

    def mount(self, step, shown, source, target, fstype=None, flags=0, data=None):
        try:
            libc.mount(source, target, fstype, flags, data)
        except OSError as exc:
            raise MountError(step, shown, exc.errno) from None

    def mkdir(self, target, mode=0o755, parents=False):
        try:
            os.mkdir(target, mode)
        except FileExistsError:
            pass
        except FileNotFoundError:
            if not parents:
                raise MountError("mkdir", target, _errno.ENOENT) from None
            self.mkdir(os.path.dirname(target), 0o755, parents=True)
            self.mkdir(target, mode)
        except OSError as exc:
            if not os.path.isdir(target):
                raise MountError("mkdir", target, exc.errno) from None

    def create(self, op, target):
        """Make the mount point when the plan says it is not there yet."""
        if not op.get("create"):
            return
        if op.get("dir", True):
            self.mkdir(target, parents=True)
            return
        self.mkdir(os.path.dirname(target), parents=True)
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise MountError("create mount point", op["path"], exc.errno) from None

    def make_ro(self, target, shown, recursive):
        if self.setattr_works:
            try:
                libc.mount_setattr(target, libc.MOUNT_ATTR_RDONLY, recursive=recursive)
                return
            except OSError as exc:
                if exc.errno != _errno.ENOSYS:
                    raise MountError("make read-only", shown, exc.errno) from None
                self.setattr_works = False  # Linux < 5.12
        try:
            for point in self.mounts_under(target) if recursive else (target,):
                libc.remount_bind_ro(point)
        except OSError as exc:
            raise MountError("make read-only", shown, exc.errno) from None

    @staticmethod
    def mounts_under(target):
        with open("/proc/self/mountinfo") as f:
            points = [_unescape(line.split()[4]) for line in f]
        return [p for p in points if p == target or p.startswith(target + "/")]

    def bind(self, step, op, src, target, ro, recursive=True):
        self.mount(step, op["path"], src, target, None, libc.MS_BIND | (libc.MS_REC if recursive else 0))
        if ro:
            self.make_ro(target, op["path"], recursive)

    def empty(self):
        """An empty read-only file in the scratch dir, to bind over things."""
        if self.empty_file is None:
            self.empty_file = self.scratch + "/empty"
            try:
                os.close(os.open(self.empty_file, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))
            except OSError as exc:
                raise MountError("create", self.empty_file, exc.errno) from None
        return self.empty_file

    def mask_sockets(self, op):
        """Cover the host sockets ``op`` lists with an empty file; one that
        is gone (or no longer a socket) since the plan was made is skipped."""
        for path in op.get("sockets", ()):
            target = self.at(path)
            try:
                if not stat.S_ISSOCK(os.lstat(target).st_mode):
                    continue
            except OSError:
                continue
            self.bind("mask the host socket", {"path": path}, self.empty(), target, ro=True,
                      recursive=False)

    # ---------------------------------------------------------------- ops

    def op_root(self, op):
        self.scratch = op["scratch"]
        self.root = self.scratch + "/root"
        self.mount("make / private", "/", None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
        try:
            os.mkdir(self.root, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise MountError("mkdir", self.root, exc.errno) from None
        self.mount("mount the root tmpfs", "/", "tmpfs", self.root, "tmpfs", _NOSUID_NODEV, "mode=0755")

    def op_mkdir(self, op):
        self.mkdir(self.at(op["path"]), op.get("mode", 0o755))

    def op_symlink(self, op):
        target = self.at(op["path"])
        try:
            os.symlink(op["target"], target)
        except FileExistsError:
            pass
        except FileNotFoundError:
            self.mkdir(os.path.dirname(target), parents=True)
            try:
                os.symlink(op["target"], target)
            except OSError as exc:
                raise MountError("symlink", op["path"], exc.errno) from None
        except OSError as exc:
            raise MountError("symlink", op["path"], exc.errno) from None

    def op_overlay(self, op):
        if op.get("ro"):
            self.ro_overlay(op)
            return
        path, upper, work = op["path"], op["upper"], op["work"]
        target = self.at(path)
        self.create(op, target)
        data = "lowerdir=%s,upperdir=%s,workdir=%s,userxattr" % (
            _overlay_escape(path), _overlay_escape(upper), _overlay_escape(work))
        premade = self.premade_mount(op)
        if premade is not None:
            try:
                libc.move_mount(premade, target)
                self.overlays[upper] = path
                return
            except OSError:
                pass  # then made here, as if there were no helper
            finally:
                os.close(premade)
        try:
            self.make_layer_dirs(op)
            libc.mount("overlay", target, "overlay", _NOSUID_NODEV, data)
        except (OSError, MountError) as exc:
            self.overlay_refused(op, target, exc)
            return
        self.overlays[upper] = path

    def make_layer_dirs(self, op):
        """The upper and work directories of a writable overlay."""
        self.make_layer_roots()
        self.mkdir(op["upper"], op.get("mode", 0o755))
        self.mkdir(op["work"], 0o700)

    def make_layer_roots(self):
        if not self.layer_dirs:
            self.mkdir(self.scratch + "/upper", 0o700)
            self.mkdir(self.scratch + "/work", 0o700)
            self.layer_dirs = True

    def premade_mount(self, op):
        """Overlay ``op`` as a detached mount made by :func:`premake_overlays`, or
        None when this process is to make it: it claims the overlay by creating
        its work directory, unless the helper did so first (then it waits for
        the helper's mount, or its word that it failed)."""
        if self.helper is None:
            return None
        self.make_layer_roots()
        try:
            os.mkdir(op["work"], 0o700)
            return None
        except FileExistsError:
            pass
        except OSError:
            return None  # make_layer_dirs says why
        while op["upper"] not in self.premade:
            try:
                data, ancdata, _flags, _addr = self.helper.recvmsg(4096, socket.CMSG_SPACE(_FD.size))
            except OSError:
                data = b""
            if not data:  # the helper is gone
                self.close_helper()
                return None
            fds = [_FD.unpack_from(payload)[0] for level, kind, payload in ancdata
                   if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   and len(payload) >= _FD.size]
            self.premade[os.fsdecode(data)] = fds[0] if fds else None
        return self.premade.pop(op["upper"])

    def close_helper(self):
        if self.helper is not None:
            self.helper.close()
            self.helper = None
        for fd in self.premade.values():
            if fd is not None:
                os.close(fd)
        self.premade.clear()

    def op_snapshot(self, op):
        """Host directory ``path`` holds mounts of files only (a bind-mounted
        ``/etc/resolv.conf``): overlayfs refuses it as a lower layer (the mounts are
        locked), so a copy of it, taken now on a private tmpfs, is the lower layer of
        one writable overlay, recorded like any other.  What the copy cannot read is
        shown by a read-only bind of the host's own entry (an unreadable file; a
        directory the command cannot enter either); a large subdirectory is the
        split's overlay of it instead.  Over its bounds, or if it meets a directory it
        can enter but not list, the plan's ``split`` runs instead."""
        path = op["path"]
        if self.snap_root is None:
            self.snap_root = self.scratch + "/snapshot"
            self.mkdir(self.snap_root, 0o700)
            self.mount("mount the snapshot tmpfs", path, "tmpfs", self.snap_root, "tmpfs",
                       _NOSUID_NODEV, "mode=0700")
        copy = "%s/%d" % (self.snap_root, len(self.snapshots))
        self.snapshots.append(copy)
        # a large subdirectory with nothing mounted below it is its own overlay, as
        # in the split, rather than copied entry by entry (/etc/alternatives: ~400)
        own = {o["path"]: o for o in op["split"] if o["op"] == "overlay" and "upper" in o
               and os.path.dirname(o["path"]) == path}
        large = {p for p in own if _holds_more_than(p, SNAPSHOT_COPY_AT_MOST)}
        try:
            binds = _copy_tree(path, copy, op["max_entries"], op["max_bytes"], large)
        except OSError:  # whatever went wrong, the split needs no copy
            binds = None
        if binds is None:
            self.run(op["split"])
            return
        target = self.at(path)
        self.create(op, target)
        self.make_layer_dirs(op)
        data = "lowerdir=%s,upperdir=%s,workdir=%s,userxattr" % (
            _overlay_escape(copy), _overlay_escape(op["upper"]), _overlay_escape(op["work"]))
        try:
            libc.mount("overlay", target, "overlay", _NOSUID_NODEV, data)
        except OSError:
            self.run(op["split"])
            return
        self.overlays[op["upper"]] = path
        for host in binds:
            self.bind("bind read-only (unreadable)", {"path": host}, host, self.at(host), ro=True)
        for sub in sorted(large):
            self.op_overlay(own[sub])

    def ro_overlay(self, op):
        """A read-only view of a host directory that, unlike a read-only
        bind, does not let connect() reach the host's sockets in it: an
        overlay of lower layers only (overlayfs wants two: the directory and
        an empty one)."""
        path = op["path"]
        target = self.at(path)
        self.create(op, target)
        try:
            if self.empty_dir is None:
                self.mkdir(self.scratch + "/empty-lower", 0o755)
                self.empty_dir = self.scratch + "/empty-lower"
            libc.mount("overlay", target, "overlay", _NOSUID_NODEV | libc.MS_RDONLY,
                       "lowerdir=%s:%s" % (_overlay_escape(path), _overlay_escape(self.empty_dir)))
        except (OSError, MountError) as exc:
            self.overlay_refused(op, target, exc)

    def overlay_refused(self, op, target, exc):
        path = op["path"]
        self.fallbacks[path] = _errno.errorcode.get(exc.errno, str(exc.errno))
        self.bind("bind read-only (overlay refused)", op, path, target, ro=True)
        self.mask_sockets(op)

    def op_bind(self, op):
        target = self.at(op["path"])
        self.create(op, target)
        self.bind("bind read-only" if op["ro"] else "bind", op, op["src"], target, op["ro"])
        self.mask_sockets(op)

    def op_tmpfs(self, op):
        target = self.at(op["path"])
        self.create(op, target)
        flags = _NOSUID_NODEV | (libc.MS_RDONLY | libc.MS_NOEXEC if op.get("ro") else 0)
        self.mount("tmpfs", op["path"], "tmpfs", target, "tmpfs", flags,
                   _tmpfs_data("mode=%o" % op.get("mode", 0o755), op))

    def op_hide_file(self, op):
        target = self.at(op["path"])
        self.create(dict(op, dir=False), target)
        self.bind("hide", op, self.empty(), target, ro=True, recursive=False)

    def op_proc(self, op):
        target = self.root + "/proc"
        self.mkdir(target, 0o555)
        self.mount("mount proc", "/proc", "proc", target, "proc", _NOSUID_NODEV | libc.MS_NOEXEC)

    def op_dev(self, op):
        dev = self.root + "/dev"
        self.mkdir(dev)
        self.mount("mount /dev", "/dev", "tmpfs", dev, "tmpfs", libc.MS_NOSUID | libc.MS_NOEXEC, "mode=0755")
        for name in DEV_NODES:
            node = dev + "/" + name
            os.close(os.open(node, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            try:
                libc.mount("/dev/" + name, node, None, libc.MS_BIND)
            except OSError as exc:
                if exc.errno != _errno.ENOENT:  # a node the host lacks is left out
                    raise MountError("bind", "/dev/" + name, exc.errno) from None
                os.unlink(node)
        os.mkdir(dev + "/pts", 0o755)
        os.mkdir(dev + "/shm", 0o1777)
        self.mount("mount devpts", "/dev/pts", "devpts", dev + "/pts", "devpts",
                   libc.MS_NOSUID | libc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
        self.mount("mount /dev/shm", "/dev/shm", "tmpfs", dev + "/shm", "tmpfs", _NOSUID_NODEV,
                   _tmpfs_data("mode=1777", op))
        for name, target in DEV_LINKS:
            os.symlink(target, dev + "/" + name)

    def op_sys(self, op):
        target = self.root + "/sys"
        self.mkdir(target, 0o555)
        self.bind("bind /sys", {"path": "/sys"}, "/sys", target, ro=True)

    def op_tmp(self, op):
        target = self.root + "/tmp"
        self.mkdir(target, 0o1777)
        self.mount("mount /tmp", "/tmp", "tmpfs", target, "tmpfs", _NOSUID_NODEV,
                   _tmpfs_data("mode=1777", op))

    def op_file(self, op):
        self.files += 1
        source = "%s/file-%d" % (self.scratch, self.files)
        try:
            fd = os.open(source, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            with open(fd, "w") as f:
                f.write(op["content"])
        except OSError as exc:
            raise MountError("write", source, exc.errno) from None
        target = self.at(op["path"])
        if not os.path.lexists(target):
            self.create(dict(op, create=True, dir=False), target)
        self.bind("bind", op, source, target, ro=True, recursive=False)

    def op_protect_file(self, op):
        """A private copy of host file ``path`` (taken now, before the command runs),
        bound over it: the command writes the copy, the host file stays as it was,
        and the copy is compared with it at exit (corral.fs.changes)."""
        copy = op["copy"]
        self.mkdir(os.path.dirname(copy), 0o700)
        src = os.open(op["path"], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(_errno.EINVAL, "not a regular file")
            dst = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                          stat.S_IMODE(st.st_mode))
            try:
                while chunk := os.read(src, 1 << 16):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(dst, view):]
            finally:
                os.close(dst)
        finally:
            os.close(src)
        self.bind("protect", op, copy, self.at(op["path"]), ro=False, recursive=False)
        self.copies[copy] = op["path"]

    def op_watch(self, op):
        """Fingerprint host paths left writable on purpose (before the command runs);
        keep the git repositories found for the audit (corral.fs.changes)."""
        for path in op["paths"]:
            self.watched[path] = fingerprint(path)
        self.repos = op.get("repos")

    def op_remount_ro(self, op):
        self.make_ro(self.at(op["path"]), op["path"], recursive=False)

    def op_enter(self, op):
        if self.overlays or self.fallbacks or self.copies or self.watched or self.repos:
            try:
                with open(self.scratch + "/" + MANIFEST, "w") as f:
                    # Upper dirs relative to scratch: --keep-changes moves it.
                    overlays = {os.path.relpath(upper, self.scratch): host
                                for upper, host in self.overlays.items()}
                    copies = {os.path.relpath(copy, self.scratch): host
                              for copy, host in self.copies.items()}
                    json.dump({"overlays": overlays, "fallbacks": self.fallbacks,
                               "copies": copies, "watched": self.watched, "repos": self.repos}, f)
            except OSError as exc:
                raise MountError("write", self.scratch + "/" + MANIFEST, exc.errno) from None
        self.make_ro(self.root, "/", recursive=False)
        try:
            os.chdir(self.root)
        except OSError as exc:
            raise MountError("chdir", self.root, exc.errno) from None
        try:
            libc.pivot_root(".", ".")
        except OSError as exc:
            raise MountError("pivot_root", self.root, exc.errno) from None
        try:
            libc.umount2(".", libc.MNT_DETACH)
        except OSError as exc:
            raise MountError("detach the old root", "/", exc.errno) from None
        try:
            os.chdir(op["cwd"])
        except OSError as exc:
            raise MountError("chdir", op["cwd"], exc.errno) from None
