"""The sandbox's filesystem view as a list of mount operations (DESIGN §3).

Pure: :func:`build_plan` reads nothing but what it is given — the text of
``/proc/self/mountinfo`` and a small filesystem probe (:class:`HostFs` by
default; tests pass a fake).  The result, a :class:`Plan`, is a JSON-able list
of operations that :func:`corral.spawn.mounts.setup_root` carries out inside
the sandbox's mount namespace.

Modes
-----
``default``
    The host is visible and nothing outside the working directory can be
    changed.  Every directory of the host is shown through overlayfs (host =
    lower layer, upper layer in the scratch directory) or, where overlayfs
    cannot stack (nfs, cifs, fuse — or the mount fails), as a read-only bind.
    Overlayfs refuses a lower directory with mounts below it inside a user
    namespace (they are "locked"), so a directory holding mount points is
    recreated as a plain directory on the sandbox's root tmpfs and each of its
    entries is planned on its own: directories become overlays (or are split
    again), symlinks are copied, files are bound read-only, sockets, fifos and
    devices are left out.  A directory whose mounts below are all sealed (read-only
    mount and filesystem: snaps) is one recursive read-only bind instead, so the
    plan does not grow with such mounts (home, /var/tmp and the working
    directory excepted: they stay writable).  A directory whose mounts below are
    all files (``/etc`` with a bind-mounted ``resolv.conf``, in ``ip netns exec``
    and containers) is a ``snapshot``: one overlay whose lower layer is a copy of
    it taken by pid 1 (bounded; the split is the fallback).
``readonly``
    The same view as ``default``, but every overlay is read-only: lower
    layers only, no upper layer (``lowerdir=DIR:EMPTY``).
``hermetic``
    An empty root: only the working directory and what ``--rw``/``--ro``/
    ``--overlay``/``--tmpfs`` name (plus ``/proc``, ``/dev``, ``/tmp``).  The
    symlinks on the way to those paths, and the host's top-level symlinks
    whose targets are shown (``/bin -> usr/bin``, ``/lib64``...), are recreated.

Host unix sockets
-----------------
``connect()`` on a path reaches the listening socket bound to that inode,
whatever the network namespace.  Through overlayfs it never does (the
overlay's inode is not the socket's), so host directories are shown read-only
as lowerdir-only overlays (``--ro``, readonly mode) rather than read-only
binds, which pass ``connect()`` through.  Where a bind must stay (the
writable working directory, ``--rw``, filesystems overlayfs cannot stack on,
a directory with mounts below), the listening sockets that the host's
``/proc/net/unix`` lists under it are masked with an empty file.  Only
``--allow-socket PATH`` shows a host socket (a bind of the socket itself).

In every mode ``/proc`` is fresh (the sandbox's pid namespace), ``/dev`` is
minimal, ``/tmp`` is an empty tmpfs and ``/sys`` is read-only (not in
``hermetic``).

Order
-----
Base view first, then the working directory, the hidden secrets and the user's
options sorted by depth (a parent before its children, so ``--rw ~/p --ro
~/p/.git`` works in either order).  On the same path the user's option wins
over a hidden secret (``--ro ~/.ssh``), and the last option wins over earlier
ones.  Paths are resolved on the host (symlinks followed) and mounted at their
real location.
"""

import json
import os
import stat

import attrs

from ..errors import ConfigError
from . import persist, secrets

MODES = ("default", "readonly", "hermetic")
CWD_ACCESS = ("rw", "ro", "overlay")
ACTIONS = ("rw", "ro", "overlay", "tmpfs", "hide")

# Built fresh inside the sandbox: host mounts at or below them are not shown.
FRESH = ("/proc", "/sys", "/dev", "/tmp")
# Kernel pseudo filesystems: never overlaid nor bound.
PSEUDO_FS = frozenset((
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs",
    "securityfs", "bpf", "fusectl", "binfmt_misc", "autofs", "configfs", "pstore",
    "efivarfs", "hugetlbfs", "rpc_pipefs", "nsfs", "devtmpfs",
))
# Filesystems overlayfs does not stack on well: shown read-only instead.
NO_OVERLAY = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse", "fuseblk", "9p", "ceph")

HOME_WRITABLE = "the whole home directory is writable, startup files included (secrets still hidden)"
# A directory copied for a snapshot (see _Planner.snapshottable) has at most that many
# entries and bytes, else it is split after all: an entry copies in ~20-30 us, a mount
# of the split costs ~0.3-1 ms (an overlay) for each entry of the directory itself, so
# the copy stops where it would cost more than the split it replaces (/etc here: 1,213
# entries, 142 of them its own).
SNAPSHOT_ENTRIES = 4000
SNAPSHOT_ENTRIES_PER_SPLIT_ENTRY = 20
SNAPSHOT_BYTES = 16 << 20
# Entries a bind's walk for sockets looks at, at most (only when some socket
# was bound by a relative path): ~2-5 us each on a busy 2-core machine.
SCAN_LIMIT = 20000


@attrs.frozen(kw_only=True)
class FsSpec:
    """What the filesystem view should be.  ``paths`` holds the user's
    ``(action, path)`` options in command-line order."""

    mode: str = attrs.field(default="default", validator=attrs.validators.in_(MODES))
    cwd: str
    cwd_access: str = attrs.field(default="rw", validator=attrs.validators.in_(CWD_ACCESS))
    home: str
    paths: tuple = attrs.field(default=(), converter=tuple)
    hide_secrets: bool = True
    hidden_extra: tuple = attrs.field(default=(), converter=tuple)
    scratch: str
    resolv_conf: str | None = None
    tmp_size: int | None = None  # bytes for each tmpfs (/tmp, /dev/shm, --tmpfs); None: kernel default
    runtime_dir: str | None = None  # $XDG_RUNTIME_DIR; None: /run/user/<uid> if it exists
    allow_sockets: tuple = attrs.field(default=(), converter=tuple)  # host sockets shown
    allow_persist: bool = False  # startup files and git hooks/config in writable dirs: see persist.py
    # corral's own directories (state and scratch roots; ``scratch`` always): never
    # visible, never movable inside
    protect: tuple = attrs.field(default=(), converter=tuple)


@attrs.frozen(kw_only=True)
class Plan:
    """Mount operations for :func:`corral.spawn.mounts.setup_root`, and what
    the CLI should tell the user."""

    ops: tuple
    warnings: tuple = ()

    def to_json(self):
        """The operations as a JSON-able list of dicts."""
        return [dict(op) for op in self.ops]

    def dumps(self):
        return json.dumps(self.to_json())


@attrs.frozen
class Stat:
    kind: str  # "dir" | "file" | "symlink" | "socket" | "other"
    mode: int = 0o755


class HostFs:
    """The probe :func:`build_plan` uses on the real host (one per plan: its
    lstat answers are remembered, the plan asks about some paths dozens of times)."""

    def __init__(self):
        self._stats = {}

    def lstat(self, path):
        if path not in self._stats:
            self._stats[path] = self._lstat(path)
        return self._stats[path]

    def _lstat(self, path):
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "symlink"
        elif stat.S_ISREG(mode):
            kind = "file"
        elif stat.S_ISSOCK(mode):
            kind = "socket"
        else:
            kind = "other"
        return Stat(kind, stat.S_IMODE(mode))

    def readlink(self, path):
        return os.readlink(path)

    def listdir(self, path):
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    def entries(self, path):
        """``[(name, kind)]`` of a directory, kinds from the directory itself (no stat)."""
        try:
            with os.scandir(path) as it:
                return [(e.name, "dir" if e.is_dir(follow_symlinks=False) else
                         "file" if e.is_file(follow_symlinks=False) else
                         "symlink" if e.is_symlink() else "other") for e in it]
        except OSError:
            return []

    def uid(self):
        return os.getuid()

    def unix_sockets(self):
        """The paths of the unix sockets bound in our network namespace, as
        ``/proc/net/unix`` shows them: as given to bind(2), so relative when
        bound by a relative path."""
        try:
            with open("/proc/net/unix", "rb") as f:
                lines = f.read().split(b"\n")[1:]
        except OSError:
            return ()
        paths = []
        for line in lines:
            fields = line.split(None, 7)
            if len(fields) == 8 and not fields[7].startswith(b"@"):  # @: abstract
                paths.append(os.fsdecode(fields[7]))
        return paths

    def find_sockets(self, top, limit):
        """The sockets below directory ``top``, looking at no more than
        ``limit`` entries (d_type, stat only for types readdir does not give).
        Returns (paths, complete)."""
        from ..spawn.mounts import scan_tree

        found, seen = [], 0
        for entry in scan_tree(top, limit):
            seen += 1
            if seen > limit:
                return found, False
            if (not entry.is_dir(follow_symlinks=False) and not entry.is_file(follow_symlinks=False)
                    and not entry.is_symlink()):
                try:
                    if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                        found.append(entry.path)
                except OSError:
                    pass
        return found, True


@attrs.frozen
class Mount:
    id: int
    parent: int
    point: str
    fstype: str
    # read-only for good: the mount and its filesystem (superblock) are both read-only,
    # so nothing can bind a socket, or write anything, on it
    sealed: bool = False


def parse_mountinfo(text):
    """The mounts of /proc/self/mountinfo, in file order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        sealed = ("ro" in fields[5].split(",") and len(fields) > sep + 3
                  and "ro" in fields[sep + 3].split(","))
        mounts.append(Mount(int(fields[0]), int(fields[1]), _unescape(fields[4]), fields[sep + 1],
                            sealed))
    return mounts


def _unescape(field):
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def visible_mounts(mounts):
    """The mounts one can reach by path: the top one on each mount point,
    and none below a mount that another one covers."""
    by_id = {m.id: m for m in mounts}
    covered = {m.parent for m in mounts if m.parent in by_id and by_id[m.parent].point == m.point}

    def reachable(m, depth=0):
        parent = by_id.get(m.parent)
        if parent is None or depth > len(mounts):
            return True
        if parent.point == m.point:
            return reachable(parent, depth + 1)
        return parent.id not in covered and reachable(parent, depth + 1)

    return [m for m in mounts if m.id not in covered and reachable(m)]


def _under(path, top):
    """``path`` is ``top`` or below it."""
    return path == top or top == "/" or path.startswith(top + "/")


def _depth(path):
    return 0 if path == "/" else path.count("/")


class _Planner:
    def __init__(self, spec, mountinfo, fs):
        self.spec = spec
        self.fs = fs
        self.ops = []
        self.warnings = []
        self.overlays = 0
        self.emit_later = []
        self.cwd_notice = None
        self.persist_watch = ()
        self.persist_repos = None
        self.copies = 0
        mounts = visible_mounts(parse_mountinfo(mountinfo))
        self.mount_types = {m.point: m.fstype for m in mounts}
        # Every proper ancestor of a mount point: those directories cannot be
        # an overlay's lower layer.
        self.holds_mounts = set()
        # ...and those with a mount below that is not sealed
        self.holds_open_mounts = set()
        for m in mounts:
            path = m.point
            while path != "/":
                path = os.path.dirname(path)
                self.holds_mounts.add(path)
                if not m.sealed:
                    self.holds_open_mounts.add(path)
        self.scratch = self.resolve(_absolute(spec.scratch, "scratch"))
        # resolved now: the base view, planned first, must not mask them either
        self.allowed_sockets = {self.resolve(_absolute(path, "--allow-socket"))
                                for path in spec.allow_sockets}
        self.host_sockets = None  # [real path], read on first use
        self.relative_sockets = False
        self.write_roots = {self.resolve(_absolute(spec.home, "home")), "/var/tmp",
                            self.resolve(_absolute(spec.cwd, "cwd"))}
        protect = {self.scratch}
        protect.update(self.resolve(_absolute(p, "state directory")) for p in spec.protect)
        protect = sorted(protect)
        self.protect = [p for p in protect if not any(q != p and _under(p, q) for q in protect)]

    # ---------------------------------------------------------------- paths

    def resolve(self, path, links=None):
        """The real path of ``path`` (missing components are kept as they
        are); every symlink met on the way is appended to ``links``."""
        todo = [c for c in reversed(path.split("/"))]
        cur, hops = "/", 0
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                cur = os.path.dirname(cur)
                continue
            nxt = os.path.join(cur, comp)
            st = self.fs.lstat(nxt)
            if st is not None and st.kind == "symlink":
                hops += 1
                if hops > 40:
                    raise ConfigError("%s: too many levels of symbolic links. Fix: name the real path" % path)
                target = self.fs.readlink(nxt)
                if links is not None:
                    links.append((nxt, target))
                if target.startswith("/"):
                    cur = "/"
                todo.extend(reversed(target.split("/")))
            else:
                cur = nxt
        return cur

    def existing(self, path, what):
        """Resolve a path the user named; it must exist."""
        path = _absolute(path, what)
        real = self.resolve(path)
        st = self.fs.lstat(real)
        if st is None:
            raise ConfigError("%s %s: no such file or directory. Fix: create it or drop the option"
                              % (what, path))
        if _under(real, "/proc"):
            raise ConfigError("%s %s: /proc is the sandbox's own. Fix: drop the option" % (what, path))
        return real, st

    # ---------------------------------------------------------------- base

    def fstype_of(self, path):
        while path not in self.mount_types and path != "/":
            path = os.path.dirname(path)
        return self.mount_types.get(path, "")

    def emit(self, op, **fields):
        self.ops.append({"op": op, **fields})

    # ---------------------------------------------------------------- sockets

    def sockets_under(self, path, scan):
        """Host sockets below directory ``path`` that a bind of it would let
        the command connect to: the ones ``/proc/net/unix`` names there and,
        when ``scan`` and some socket was bound by a relative path (which
        says nowhere where it is), the ones a bounded walk of ``path`` finds."""
        if self.host_sockets is None:
            found, dirs = set(), {}
            for name in self.fs.unix_sockets():
                if not name.startswith("/"):
                    self.relative_sockets = True
                    continue
                parent, base = os.path.split(os.path.normpath(name))
                try:
                    if parent not in dirs:
                        dirs[parent] = self.resolve(parent)
                    real = os.path.join(dirs[parent], base)
                    st = self.fs.lstat(real)
                except OSError:  # another user's: out of our reach inside too
                    continue
                if st is not None and st.kind == "socket":
                    found.add(real)
            self.host_sockets = found
        found = {p for p in self.host_sockets if p != path and _under(p, path)}
        if scan and self.relative_sockets:
            more, complete = self.fs.find_sockets(path, SCAN_LIMIT)
            found.update(more)
            if not complete:
                self.warnings.append(
                    "%s has more than %d entries: unix sockets bound there by a relative path "
                    "and not found in the first %d stay reachable (docs/security.md)"
                    % (path, SCAN_LIMIT, SCAN_LIMIT))
        return sorted(found - self.allowed_sockets)

    def bind_dir(self, path, ro, create):
        """A bind of host directory ``path``, with the host sockets below it masked."""
        op = {"src": path, "path": path, "ro": ro, "dir": True, "create": create}
        sockets = self.sockets_under(path, scan=True)
        if sockets:
            op["sockets"] = sockets
        self.emit("bind", **op)

    # ---------------------------------------------------------------- base

    def overlay(self, path, mode, create, ro=False):
        fields = {"path": path, "mode": mode, "create": create}
        if ro:
            fields["ro"] = True
        else:
            n = self.overlays
            self.overlays += 1
            scratch = self.spec.scratch
            fields.update(upper="%s/upper/%d" % (scratch, n), work="%s/work/%d" % (scratch, n))
        # masked only if the overlay fails and becomes a read-only bind
        sockets = self.sockets_under(path, scan=False)
        if sockets:
            fields["sockets"] = sockets
        self.emit("overlay", **fields)

    def overlay_tree(self, path, st, create, ro=False):
        """Show host ``path`` writable-but-not-to-the-host (``ro``: read-only):
        an overlay, or a read-only bind where overlayfs cannot stack, or — when
        mounts lie below it — its entries one by one on a directory of the
        root tmpfs.  ``create``: the mount points are not there yet (a tmpfs)."""
        if st.kind != "dir":
            self.emit("bind", src=path, path=path, ro=True, dir=False, create=create)
            return
        if path in self.holds_mounts and self.bindable(path):
            self.bind_dir(path, ro=True, create=create)
            return
        if path in self.holds_mounts:
            start = len(self.ops)
            if path != "/":
                self.emit("mkdir", path=path, mode=st.mode)
            names = self.fs.listdir(path)
            for name in names:
                self.entry(os.path.join(path, name), create, ro)
            if not ro and self.snapshottable(path):
                split = self.ops[start:]
                del self.ops[start:]
                n = self.overlays
                self.overlays += 1
                scratch = self.spec.scratch
                self.emit("snapshot", path=path, mode=st.mode, create=create,
                          upper="%s/upper/%d" % (scratch, n), work="%s/work/%d" % (scratch, n),
                          max_entries=min(SNAPSHOT_ENTRIES, SNAPSHOT_ENTRIES_PER_SPLIT_ENTRY
                                          * len(names)),
                          max_bytes=SNAPSHOT_BYTES, split=split)
            return
        if self.fstype_of(path).split(".")[0] in NO_OVERLAY:
            self.bind_dir(path, ro=True, create=create)
        else:
            self.overlay(path, st.mode, create, ro)

    def bindable(self, path):
        """Whether directory ``path``, which holds mounts, can be one recursive
        read-only bind rather than split into its entries (one mount each): every
        mount below it is sealed (a snap's squashfs), so a bind passes nothing on to
        the host that the directory's own filesystem does not (its sockets are
        masked, as for every bind); nothing below is fresh or corral's own; and it
        is not a directory the command is meant to write to (home, /var/tmp, the
        working directory): those stay writable, split."""
        return (path != "/" and path not in self.holds_open_mounts
                and path not in self.write_roots
                and not any(_under(p, path) for p in FRESH + tuple(self.protect)))

    def snapshottable(self, path):
        """Whether directory ``path``, which holds mounts, can be one writable overlay
        of a private copy of it (``snapshot``) rather than split into its entries: the
        mounts below are all files (``ip netns exec`` and containers bind
        ``/etc/resolv.conf``, ``hosts``, ``hostname``), so the copy carries their
        content; nothing below is fresh or corral's own; and it does not hold a
        directory the command is meant to write to (home, /var/tmp, the working
        directory: those are not copied, and would make the copy large)."""
        if path == "/" or any(_under(p, path) for p in FRESH + tuple(self.protect)
                              + tuple(self.write_roots) + (self.scratch,)):
            return False
        points = [p for p in self.mount_types if p != path and _under(p, path)]
        return all((self.fs.lstat(p) or Stat("other")).kind == "file" for p in points)

    def ro_tree(self, path, st, create):
        """Show host ``path`` read-only: a lowerdir-only overlay, or a
        recursive read-only bind (sockets masked) where mounts lie below it or
        overlayfs cannot stack."""
        if (st.kind != "dir" or path in self.holds_mounts
                or self.fstype_of(path).split(".")[0] in NO_OVERLAY):
            if st.kind == "dir":
                self.bind_dir(path, ro=True, create=create)
            else:
                self.emit("bind", src=path, path=path, ro=True, dir=False, create=create)
        else:
            self.overlay(path, st.mode, create, ro=True)

    def entry(self, path, create, ro=False):
        if path in FRESH or _under(path, self.scratch):
            return
        st = self.fs.lstat(path)
        if st is None:
            return
        if self.mount_types.get(path, "") in PSEUDO_FS:
            if st.kind == "dir":
                self.emit("mkdir", path=path, mode=st.mode)
            return
        if st.kind == "symlink":
            self.emit("symlink", path=path, target=self.fs.readlink(path))
        elif st.kind in ("dir", "file"):
            self.overlay_tree(path, st, create, ro)
        # sockets, fifos and device nodes of the host are left out

    def base(self):
        mode = self.spec.mode
        self.emit("root", scratch=self.spec.scratch, mode=mode)
        if mode != "hermetic":
            self.overlay_tree("/", Stat("dir"), create=True, ro=mode == "readonly")
        self.emit("proc")
        self.emit("dev", size=self.spec.tmp_size)
        if mode != "hermetic":
            self.emit("sys")
        self.emit("tmp", size=self.spec.tmp_size)

    # ---------------------------------------------------------------- layers

    def layers(self):
        """cwd, secrets and user options: ``(path, group, action, stat, links)``."""
        spec = self.spec
        hermetic = spec.mode == "hermetic"
        items = []
        links = [] if hermetic else None
        cwd = _absolute(spec.cwd, "cwd")
        cwd_real = self.resolve(cwd, links)
        cwd_st = self.fs.lstat(cwd_real)
        home = self.resolve(_absolute(spec.home, "home"))
        if cwd_st is None or cwd_st.kind != "dir":
            raise ConfigError("working directory %s does not exist. Fix: cd to an existing "
                              "directory or pass --cwd DIR" % cwd)
        if cwd_real == "/" and spec.cwd_access == "rw" and spec.mode != "default":
            raise ConfigError("the working directory is / and would make the whole host "
                              "writable. Fix: cd to a project directory or pass --cwd DIR")
        self.cwd = cwd_real
        cwd_access = spec.cwd_access
        if cwd_access == "rw":
            self.cwd_notice = persist.cwd_notice(cwd_real, home, spec.allow_persist)
            cwd_access = "rw" if self.cwd_notice is None else "overlay"
        if cwd_real != "/" or self.cwd_notice is None:  # the default view of / is an overlay
            items.append((cwd_real, 1, cwd_access, cwd_st))

        if spec.hide_secrets:
            runtime = spec.runtime_dir
            if runtime is None:
                runtime = "/run/user/%d" % self.fs.uid()
            for path in secrets.secret_paths(spec.home, runtime) + tuple(spec.hidden_extra):
                real = self.resolve(path)
                st = self.fs.lstat(real)
                if st is not None:
                    items.append((real, 0, "hide", st))

        latest = {}
        for action, path in spec.paths:
            if action not in ACTIONS:
                raise ConfigError("unknown path action %r. Fix: use one of %s"
                                  % (action, ", ".join(ACTIONS)))
            option = "--" + action
            if action == "tmpfs":
                path = _absolute(path, option)
                real = self.resolve(path, links)
                st = self.fs.lstat(real)
                if st is not None and st.kind != "dir":
                    raise ConfigError("--tmpfs %s: not a directory. Fix: name a directory" % path)
                st = st or Stat("missing")
            else:
                if hermetic:
                    self.resolve(_absolute(path, option), links)
                real, st = self.existing(path, option)
                if st.kind == "socket" and action != "hide":
                    raise ConfigError("%s %s: a unix socket (connecting to it would reach the "
                                      "host). Fix: --allow-socket %s, if the command may use it"
                                      % (option, path, path))
            if real == "/":
                raise ConfigError("%s /: the root cannot be %s. Fix: choose the mode with --mode, "
                                  "or name a directory below /" % (option, action))
            latest.pop(real, None)
            latest[real] = (action, st)
        for real, (action, st) in latest.items():
            items.append((real, 2, action, st))
        if self.cwd_notice and any(a == "rw" and _under(cwd_real, p) for p, (a, _) in latest.items()):
            self.cwd_notice = None  # --rw of it or above it: the user made it writable
            items[0] = (cwd_real, 1, "rw", cwd_st)
        for path in spec.allow_sockets:
            if hermetic:
                self.resolve(_absolute(path, "--allow-socket"), links)
            real, st = self.existing(path, "--allow-socket")
            if st.kind != "socket":
                raise ConfigError("--allow-socket %s: not a socket. Fix: name the socket's path "
                                  "(e.g. \"$SSH_AUTH_SOCK\")" % path)
            items.append((real, 2, "socket", st))
        if hermetic:
            self.top_level_links(items, links)
        # Overlayfs in a user namespace cannot copy up a directory owned by an
        # unmapped user (root): with /home as the only overlay, writing
        # /data/users/me/.bashrc would fail (EOVERFLOW) on the copy-up of
        # /data.  Overlays rooted at the directories the user can write to
        # make those writes work, unless something the user asked for covers
        # them.
        if spec.mode == "default":
            for root in (home, "/var/tmp"):
                root_st = self.fs.lstat(root)
                if (root_st is not None and root_st.kind == "dir" and not _under(root, self.scratch)
                        and not any(_under(root, item[0]) for item in items if item[1] > 0)):
                    items.append((root, 1, "overlay", root_st))
        items.extend(self.persist_layers(items, home))
        for path, target in links or ():
            items.append((path, -1, "symlink", target))
        # parents first; on one path: symlink, secret, cwd, then the user's option
        items.sort(key=lambda item: (_depth(item[0]), item[1]))
        return items

    def top_level_links(self, items, links):
        """Hermetic mode: the host's top-level symlinks (``/bin -> usr/bin``,
        ``/lib64 -> usr/lib64``...) whose targets are shown, so that
        programs and their ELF loader are found at the paths they name."""
        shown = [item[0] for item in items if item[2] in ("rw", "ro", "overlay")]
        for name in self.fs.listdir("/"):
            path = "/" + name
            st = self.fs.lstat(path)
            if st is None or st.kind != "symlink":
                continue
            real = self.resolve(path)
            if real != path and any(_under(real, top) for top in shown):
                links.append((path, self.fs.readlink(path)))

    def persist_layers(self, items, home):
        """Items protecting what the host runs later inside the writable
        directories (:mod:`corral.fs.persist`), after cwd and the user's options."""
        latest = {}
        for item in sorted(items, key=lambda item: (_depth(item[0]), item[1])):
            latest[item[0]] = item

        def cover(path):
            while path not in latest and path != "/":
                path = os.path.dirname(path)
            return latest.get(path)

        roots = [path for path, _, action, st in latest.values() if action == "rw" and st.kind == "dir"]
        if not roots:
            return []
        found = persist.protect(self.fs, roots, home, self.spec.allow_persist)
        out, named = [], []
        for path, action, kind in found.items:
            top = cover(path)
            if top is None or top[2] != "rw":
                continue
            if action == persist.WATCH or (top[0] == path and top[1] == 2):
                if action != persist.KEEP:  # --rw of the protected path itself wins
                    named.append(path)
            else:
                out.append((path, 3, action, Stat(kind)))
        watch = [p for p in found.watch if (cover(p) or (0, 0, ""))[2] == "rw"]
        self.persist_watch = tuple(dict.fromkeys(watch + named))
        self.persist_repos = {"roots": roots, "known": list(found.repos)}
        return out

    def place_persist(self, path, action, st, create):
        if action == persist.KEEP:  # a mount point cannot be renamed away
            self.bind_dir(path, ro=False, create=create)
        elif action == persist.COPY:
            self.emit("protect_file", path=path, copy="%s/persist/%d" % (self.spec.scratch, self.copies))
            self.copies += 1
        elif st.kind == "missing":
            self.overlay(path, 0o755, create=True)
        else:
            self.overlay_tree(path, st, create)

    def exposes_host(self, path, done):
        """Whether ``path`` shows host content after the layers in ``done``."""
        for top, exposes in reversed(done):
            if _under(path, top):
                return exposes
        mode = self.spec.mode
        if mode == "hermetic" or any(_under(path, fresh) for fresh in FRESH if fresh != "/sys"):
            return False
        return True

    def place(self):
        items = self.layers()
        spec = self.spec
        done = []
        for path, group, _action, _st in items:
            for top in self.protect:
                if group > 0 and _under(path, top):
                    raise ConfigError(
                        "%s is inside %s, corral's own state and scratch, which no sandbox may "
                        "see. Fix: name a path outside it" % (path, top))
        tmpfs_ops = {}
        # keep only the last item per path (the later one wins), in order
        final = {}
        for item in items:
            final.pop((item[0], item[2] == "symlink"), None)
            final[(item[0], item[2] == "symlink")] = item
        for path, group, action, extra in final.values():
            if action == "symlink":
                self.emit("symlink", path=path, target=extra)
                continue
            st = extra
            is_dir = st.kind in ("dir", "missing")
            create = st.kind == "missing" or not self.exposes_host(path, done)
            if action == "hide":
                if group == 0 and not self.exposes_host(path, done):
                    continue
                if is_dir:
                    self.emit("tmpfs", path=path, mode=0o700, ro=True, create=create)
                    tmpfs_ops[path] = self.ops[-1]
                else:
                    self.emit("hide_file", path=path, create=create)
                done.append((path, False))
            elif action == "tmpfs":
                self.emit("tmpfs", path=path, mode=0o755, ro=False, create=create,
                          size=self.spec.tmp_size)
                done.append((path, False))
            elif action == "overlay":
                self.overlay_tree(path, st, create)
                done.append((path, True))
            elif action == "socket":
                # create: a directory split into its entries leaves sockets out
                self.emit("bind", src=path, path=path, ro=True, dir=False, create=True)
            elif action == "ro":
                self.ro_tree(path, st, create)
                done.append((path, True))
            elif action in persist.ACTIONS:
                self.place_persist(path, action, st, create)
                done.append((path, True))
            elif is_dir:
                self.bind_dir(path, ro=False, create=create)
                done.append((path, True))
                self.pin_protected(path, done)
            else:
                self.emit("bind", src=path, path=path, ro=False, dir=False, create=create)
                done.append((path, True))
            # a read-only tmpfs that gets mounts inside is sealed at the end
            for top, op in list(tmpfs_ops.items()):
                if path != top and _under(path, top):
                    op["ro"] = False
                    self.emit_later.append({"op": "remount_ro", "path": top})
                    del tmpfs_ops[top]
        self.mask_protected(done)
        home = self.resolve(_absolute(spec.home, "home"))
        writable = [p for p, g, a, _ in final.values() if a == "rw"]
        if any(_under(home, p) for p in writable):
            self.warnings.append(HOME_WRITABLE)
        if self.cwd_notice and final.get((self.cwd, False), (0, 1))[1] == 1:
            self.warnings.append(self.cwd_notice)
        if self.persist_watch or self.persist_repos:
            self.emit("watch", paths=list(self.persist_watch), repos=self.persist_repos)
        for path, group, action, _ in final.values():
            if group == 0 and action == "hide" and _under(self.cwd, path):
                self.warnings.append("the working directory %s is inside %s, which corral "
                                     "would hide; it is visible" % (self.cwd, path))

    def pin_protected(self, top, done):
        """Under a writable bind ``top``, make every directory on the way to
        a protected directory a mount point (a bind onto itself): the sandbox
        cannot rename them, and so cannot put a directory of its own where
        corral will look for its state."""
        for protected in self.protect:
            if protected == top or not _under(protected, top):
                continue
            path = os.path.dirname(protected)
            chain = []
            while path != top:
                chain.append(path)
                path = os.path.dirname(path)
            for path in reversed(chain):
                st = self.fs.lstat(path)
                if st is None or st.kind != "dir":
                    break
                self.bind_dir(path, ro=False, create=False)  # sockets masked again
                done.append((path, True))

    def mask_protected(self, done):
        """An empty read-only tmpfs over each protected directory that the
        view shows, last: no working directory or base layer exposes corral's
        own state and scratch (options naming a path inside were refused)."""
        for top in self.protect:
            st = self.fs.lstat(top)
            if st is None or st.kind != "dir" or not self.exposes_host(top, done):
                continue
            self.emit("tmpfs", path=top, mode=0o700, ro=True, create=False)
            done.append((top, False))

    def build(self):
        self.base()
        self.place()
        if self.spec.resolv_conf is not None:
            if self.spec.mode == "hermetic":
                target = "/etc/resolv.conf"
            else:
                target = self.resolve("/etc/resolv.conf")
            self.emit("file", path=target, content=self.spec.resolv_conf)
        self.ops.extend(self.emit_later)
        self.emit("enter", cwd=self.cwd)
        return Plan(ops=tuple(self.ops), warnings=tuple(self.warnings))


def _absolute(path, what):
    path = os.fspath(path)
    if not path.startswith("/"):
        raise ConfigError("%s %s: not an absolute path. Fix: give the full path (e.g. %s)"
                          % (what, path, os.path.join("/path/to", path)))
    return os.path.normpath(path)


def overlays_of(ops):
    """``[(upper, host_path)]`` of every writable overlay ``ops`` (``Plan.to_json()``)
    may mount, a snapshot's split included: what the change report reads."""
    out = []
    for op in ops:
        if op["op"] in ("overlay", "snapshot") and "upper" in op:
            out.append((op["upper"], op["path"]))
        if op["op"] == "snapshot":
            out.extend(overlays_of(op["split"]))
    return out


def build_plan(spec, mountinfo, fs=None):
    """Turn ``spec`` into a :class:`Plan`; raise :class:`ConfigError` for bad
    input.  ``mountinfo`` is the text of /proc/self/mountinfo; ``fs`` probes
    the host (:class:`HostFs` when None)."""
    return _Planner(spec, mountinfo, fs or HostFs()).build()
