"""The file-change report: what the sandboxed command tried to change on the host.

In the default mode every host directory is an overlay whose upper layer lives in the
sandbox's scratch directory; ``<scratch>/overlays.json`` (written by
:mod:`corral.spawn.mounts`) maps each upper directory to the host path it covers::

    {"overlays": {"<scratch>/upper/0": "/usr", ...}, "fallbacks": {"/mnt/nfs": "EINVAL"}}

(a JSON list of ``{"upper": ..., "target": ...}`` is accepted too). Reading an upper layer:

- a regular file, symlink or directory that the host lacks was **created**;
- one that the host has was **modified** (overlayfs copies a file up on any write or
  metadata change: ``content_changed`` tells the two apart when the file is small enough
  to compare); a directory that exists on both sides is not itself a change;
- a whiteout — a character device 0:0 — means the host path was **deleted**;
- an opaque directory (xattr ``user.overlay.opaque`` = ``y``, ``trusted.`` for overlays
  mounted by real root; inside a user namespace corral mounts with ``userxattr``, so the
  kernel writes the ``user.`` name) **replaced** the host directory: its host entries that
  are not in the upper layer are reported deleted (one level, not recursively).

Files the host runs later inside writable directories (:mod:`corral.fs.persist`) are
recorded in the manifest too: ``"copies"`` maps a private copy (bound over a host file
such as ``.git/config``) to that file, and a copy that differs from it was **modified**;
``"watched"`` holds fingerprints of such paths left writable on purpose, taken before the
command ran, and what differs from them now was **created**, **modified** or **deleted**
(on the host: those writes were allowed); ``"repos"`` lists the writable directories
and the ``.git`` entries found in them before the run: one found now that was not there
was **created** (a new repository, whose config the host's git would obey).

Paths in the report are host paths. The walk is iterative and relative to directory
descriptors (any depth, any path length), never follows symlinks, and lists at most
``limit`` changes and ``CHAR_LIMIT`` characters of paths: the rest are counted in
``omitted`` (``truncated`` is then set), except files that run at login or startup, which
stay listed (up to ``STARTUP_EXTRA`` more) so the persistence flag survives a flood. This
reads files; it runs in the supervisor after the command has exited.
"""

from __future__ import annotations

import json
import logging
import os
import stat

import attrs

__all__ = ["ChangeSet", "FileChange", "collect_changes", "read_manifest", "scan_upper"]

log = logging.getLogger("corral.fs")

MANIFEST = "overlays.json"
DEFAULT_LIMIT = 10_000  # changes listed; the rest are counted in ChangeSet.omitted
CHAR_LIMIT = 4 * 1024 * 1024  # characters of listed paths (a deep tree makes long ones)
STARTUP_EXTRA = 1_000  # files that run at login/startup, listed past the limits
ERRORS_LIMIT = 100
COMPARE_LIMIT = 4 * 1024 * 1024  # compare contents of files up to this size
_OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")
_CHANGES = ("created", "modified", "deleted", "replaced")


@attrs.frozen(kw_only=True)
class FileChange:
    """One changed host path. ``size``: in the sandbox (upper layer); ``host_size``: on the host."""

    path: str
    change: str = attrs.field(validator=attrs.validators.in_(_CHANGES))
    kind: str  # "file" | "dir" | "symlink" | "other"
    size: int | None = None
    host_size: int | None = None
    mode: str | None = None  # octal permission bits in the sandbox, "0755"
    executable: bool = False
    link_target: str | None = None
    content_changed: bool | None = None  # for modified files: None when not compared

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    def __repr__(self) -> str:
        return f"<FileChange {self.change} {self.kind} {self.path}>"


@attrs.frozen(kw_only=True)
class ChangeSet:
    """Every change found, sorted by path; ``fallbacks``: host paths shown read-only
    because overlayfs refused them (no writes could happen there); ``errors``: upper
    paths that could not be read."""

    changes: tuple[FileChange, ...] = ()
    fallbacks: dict[str, str] = attrs.field(factory=dict)
    truncated: bool = False
    omitted: int = 0  # changes found but not listed (past the limits)
    errors: tuple[str, ...] = ()

    def count(self, change: str) -> int:
        return sum(1 for c in self.changes if c.change == change)

    def to_dict(self) -> dict:
        return {
            "created": self.count("created"),
            "modified": self.count("modified"),
            "deleted": self.count("deleted"),
            "replaced": self.count("replaced"),
            "truncated": self.truncated,
            "omitted": self.omitted,
            "changes": [c.to_dict() for c in self.changes],
            "fallbacks": dict(self.fallbacks),
            "errors": list(self.errors),
        }

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={self.count(k)}" for k in _CHANGES)
        return f"<ChangeSet {counts}{f' omitted={self.omitted}' if self.omitted else ''}>"


def read_manifest(scratch: str | os.PathLike) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``([(upper, host_path), ...], fallbacks)`` from ``<scratch>/overlays.json``.

    A missing manifest means no overlay was mounted (readonly/hermetic modes): empty.
    """
    path = os.path.join(os.fspath(scratch), MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return [], {}
    if isinstance(data, list):
        pairs = [(d["upper"], d["target"]) for d in data]
        fallbacks = {}
    else:
        pairs = list(data.get("overlays", {}).items())
        fallbacks = dict(data.get("fallbacks", {}))
    # Upper dirs are recorded relative to the scratch dir (it may have moved:
    # --keep-changes); os.path.join keeps an absolute one as it is.
    return [(os.path.join(os.fspath(scratch), upper), target) for upper, target in pairs], fallbacks


def _persist_changes(scratch: str) -> list[FileChange]:
    """Changes to the private copies and watched paths of the manifest (see above)."""
    from corral.spawn.mounts import fingerprint

    try:
        with open(os.path.join(scratch, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    out = []
    for copy, host in sorted(data.get("copies", {}).items()):
        st, hst = _lstat_path(os.path.join(scratch, copy)), _lstat_path(host)
        if st is None or not stat.S_ISREG(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        same = None
        if hst is not None and stat.S_ISREG(hst.st_mode) and max(st.st_size, hst.st_size) <= COMPARE_LIMIT:
            same = st.st_size == hst.st_size and _same_paths(os.path.join(scratch, copy), host)
        if same and hst is not None and mode == stat.S_IMODE(hst.st_mode):
            continue
        out.append(FileChange(
            path=host, change="modified", kind="file", size=st.st_size, mode=f"{mode:04o}",
            executable=bool(mode & 0o111), host_size=hst.st_size if hst is not None else None,
            content_changed=None if same is None else not same,
        ))
    for root, before in sorted(data.get("watched", {}).items()):
        after = fingerprint(root)
        for path in sorted(set(before) | set(after)):
            old, new = before.get(path), after.get(path)
            if old == new or (old and new and old[0] == new[0] == "dir"):
                continue
            info = new or old
            change = "created" if old is None else "deleted" if new is None else "modified"
            out.append(FileChange(
                path=path, change=change, kind=info[0], size=new[1] if new and new[0] == "file" else None,
                host_size=old[1] if old and old[0] == "file" else None, mode=f"{info[5]:04o}",
                executable=info[0] == "file" and bool(info[5] & 0o111),
            ))
    repos = data.get("repos") or {}
    if repos.get("roots"):
        from corral.fs.persist import git_entries
        from corral.fs.plan import HostFs

        known = set(repos.get("known", ()))
        for path, kind in git_entries(HostFs(), repos["roots"]):
            if path not in known:
                out.append(FileChange(path=path, change="created", kind="dir" if kind == "gitdir" else kind))
    return out


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _runs_at_startup(path: str) -> bool:
    from corral.fs.persist import is_persistence

    return is_persistence(path) is not None


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int | None = None) -> int | None:
    """A directory fd, never through a symlink; None when it is not an openable directory."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _lstat_path(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _lstat(name: str, dir_fd: int | None) -> os.stat_result | None:
    if dir_fd is None:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def _is_opaque(fd: int) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            value = os.getxattr(fd, name)
        except OSError:
            continue
        if value[:1] in (b"y", b"x"):
            return True
    return False


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _same_content(name: str, upper_fd: int, host_fd: int) -> bool | None:
    """Whether ``name`` has the same bytes in the upper layer and on the host."""
    return _same_bytes(lambda: os.open(name, _READ_FLAGS, dir_fd=upper_fd),
                       lambda: os.open(name, _READ_FLAGS, dir_fd=host_fd))


def _same_paths(a: str, b: str) -> bool | None:
    """Whether files ``a`` and ``b`` (neither followed if a symlink) hold the same bytes."""
    return _same_bytes(lambda: os.open(a, _READ_FLAGS), lambda: os.open(b, _READ_FLAGS))


def _same_bytes(open_a, open_b) -> bool | None:
    """Compare what ``open_a()`` and ``open_b()`` (fd openers) read; None if either fails."""
    try:
        with open(open_a(), "rb") as fa, open(open_b(), "rb") as fb:
            while True:
                x, y = fa.read(65536), fb.read(65536)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return None


class _Frame:
    """One directory being walked.  Its fds are None while a deeper directory is open (the
    walk holds a few descriptors whatever the depth, and reopens parents through ``..``);
    it keeps its own name only, so memory grows with the depth, not with the path lengths."""

    __slots__ = ("upper_fd", "host_fd", "host_is_dir", "name", "length", "names")

    def __init__(self, upper_fd, host_fd, name, length, names):
        self.upper_fd = upper_fd
        self.host_fd = host_fd
        self.host_is_dir = host_fd is not None
        self.name = name
        self.length = length  # of the host path
        self.names = names  # still to visit, last first


class _Walk:
    """Iterative and descriptor-relative: no recursion (an 1,100-level tree from the sandbox
    is walked like a flat one), one name per system call (no path is too long), never a
    symlink followed.  Past ``limit`` changes or ``CHAR_LIMIT`` characters of paths, changes
    are counted in ``omitted``, not kept; files that run at login/startup are kept anyway
    (up to ``STARTUP_EXTRA`` more) so the persistence flag survives a flood."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.out: list[FileChange] = []
        self.errors: list[str] = []
        self.truncated = False
        self.omitted = 0
        self._chars = 0
        self._extra = 0
        self._stack: list[_Frame] = []
        self._upper_root = self._host_root = ""

    def _path(self, root: str, name: str) -> str:
        return os.path.join(root, *(f.name for f in self._stack[1:]), name)

    def add(self, length: int, name: str, make) -> bool:
        """Keep the change ``make(path)`` for *name* in the current directory, if there is room."""
        if len(self.out) < self.limit and self._chars + length <= CHAR_LIMIT:
            self._chars += length
            self.out.append(make(self._path(self._host_root, name)))
            return True
        if self._extra < STARTUP_EXTRA and length <= 4096:
            path = self._path(self._host_root, name)
            change = make(path)
            if change.kind == "file" and change.change in ("created", "modified") and _runs_at_startup(path):
                self._extra += 1
                self.out.append(change)
                return True
        self.truncated = True
        self.omitted += 1
        return False

    def error(self, name: str, what: str) -> None:
        if len(self.errors) < ERRORS_LIMIT:
            self.errors.append(f"{self._path(self._upper_root, name)}: {what}")

    def scan(self, upper_dir: str, host_dir: str) -> None:
        self._upper_root, self._host_root = upper_dir, host_dir
        upper_fd = _open_dir(upper_dir)
        if upper_fd is None:
            self.error("", "cannot open")
            return
        frame = self._frame(upper_fd, _open_dir(host_dir), "", len(host_dir))
        if frame is None:
            return
        stack = self._stack = [frame]
        try:
            while stack:
                frame = stack[-1]
                if not frame.names:
                    stack.pop()
                    if stack:
                        parent = stack[-1]
                        if parent.upper_fd is None and frame.upper_fd is not None:
                            parent.upper_fd = _open_dir("..", frame.upper_fd)
                        if parent.host_fd is None and parent.host_is_dir and frame.host_fd is not None:
                            parent.host_fd = _open_dir("..", frame.host_fd)
                        if parent.upper_fd is None:  # cannot come back: skip the rest there
                            self.error("", "cannot reopen")
                            parent.names.clear()
                    _close(frame.upper_fd)
                    _close(frame.host_fd)
                    continue
                child = self.entry(frame, frame.names.pop())
                if child is not None:
                    # Only the deepest directory stays open; the host side too, unless the
                    # host lacks the child (then its fd is what brings the walk back).
                    _close(frame.upper_fd)
                    frame.upper_fd = None
                    if child.host_fd is not None:
                        _close(frame.host_fd)
                        frame.host_fd = None
                    stack.append(child)
        finally:
            for frame in stack:
                _close(frame.upper_fd)
                _close(frame.host_fd)
            self._stack = []

    def _frame(self, upper_fd: int, host_fd: int | None, name: str, length: int) -> _Frame | None:
        try:
            names = sorted(os.listdir(upper_fd), reverse=True)
        except OSError as e:
            _close(upper_fd)
            _close(host_fd)
            self.error(name, e.strerror)
            return None
        return _Frame(upper_fd, host_fd, name, length, names)

    def entry(self, frame: _Frame, name: str) -> _Frame | None:
        """Record one entry of the upper directory; return the directory to walk next, if any."""
        st = _lstat(name, frame.upper_fd)
        if st is None:
            return None
        hst = _lstat(name, frame.host_fd)
        length = frame.length + 1 + len(name)
        if _is_whiteout(st):
            if hst is not None:
                self.add(length, name, lambda path: FileChange(
                    path=path, change="deleted", kind=_kind(hst.st_mode),
                    host_size=hst.st_size if stat.S_ISREG(hst.st_mode) else None,
                ))
            return None
        kind = _kind(st.st_mode)
        mode = stat.S_IMODE(st.st_mode)
        link_target = None
        if kind == "symlink":
            try:
                link_target = os.readlink(name, dir_fd=frame.upper_fd)
            except OSError:
                pass
        common = dict(
            kind=kind, mode=f"{mode:04o}",
            executable=kind == "file" and bool(mode & 0o111),
            size=st.st_size if kind == "file" else None,
            link_target=link_target,
        )
        if kind == "dir":
            upper_fd = _open_dir(name, frame.upper_fd)
            if upper_fd is None:
                self.error(name, "cannot open")
                return None
            host_fd = None
            if hst is None or not stat.S_ISDIR(hst.st_mode):
                change = "created" if hst is None else "replaced"
                self.add(length, name, lambda path: FileChange(path=path, change=change, **common))
            else:
                host_fd = _open_dir(name, frame.host_fd)
                if _is_opaque(upper_fd):
                    self.add(length, name, lambda path: FileChange(path=path, change="replaced", **common))
                    self.deleted_below(upper_fd, host_fd, name, length)
                # else: copied up because something below changed
            return self._frame(upper_fd, host_fd, name, length)
        if hst is None:
            self.add(length, name, lambda path: FileChange(path=path, change="created", **common))
            return None
        same = None
        if kind == "file" and stat.S_ISREG(hst.st_mode) and max(st.st_size, hst.st_size) <= COMPARE_LIMIT:
            same = st.st_size == hst.st_size and _same_content(name, frame.upper_fd, frame.host_fd)
        self.add(length, name, lambda path: FileChange(
            path=path, change="modified", host_size=hst.st_size if stat.S_ISREG(hst.st_mode) else None,
            content_changed=None if same is None else not same, **common,
        ))
        return None

    def deleted_below(self, upper_fd: int, host_fd: int | None, dir_name: str, dir_length: int) -> None:
        """The host entries an opaque (replaced) directory no longer has, one level."""
        if host_fd is None:
            return
        try:
            host_names = sorted(os.listdir(host_fd))
            present = set(os.listdir(upper_fd))
        except OSError:
            return
        for name in host_names:
            if name in present:
                continue
            hst = _lstat(name, host_fd)
            if hst is None:
                continue
            self.add(dir_length + 1 + len(name), os.path.join(dir_name, name), lambda path: FileChange(
                path=path, change="deleted", kind=_kind(hst.st_mode),
                host_size=hst.st_size if stat.S_ISREG(hst.st_mode) else None,
            ))


def scan_upper(upper: str | os.PathLike, host_path: str, *, limit: int = DEFAULT_LIMIT) -> ChangeSet:
    """The changes one overlay's upper directory records against host directory *host_path*."""
    walk = _Walk(limit)
    walk.scan(os.fspath(upper), host_path)
    return ChangeSet(changes=tuple(walk.out), truncated=walk.truncated, omitted=walk.omitted,
                     errors=tuple(walk.errors))


def collect_changes(scratch: str | os.PathLike, *, limit: int = DEFAULT_LIMIT,
                    overlays: list[tuple[str, str]] | None = None) -> ChangeSet:
    """Every change recorded in a sandbox's scratch directory (see the module docstring).
    ``overlays``: the ``(upper, host_path)`` pairs the supervisor planned — then the
    manifest, a file pid 1 wrote, only adds its fallbacks (which were not writable)."""
    planned = overlays
    overlays, fallbacks = read_manifest(scratch)
    if planned is not None:
        overlays = planned
    walk = _Walk(limit)
    for upper, host_path in sorted(overlays, key=lambda item: item[1]):
        walk.scan(upper, host_path)
    changes = tuple(sorted(walk.out + _persist_changes(os.fspath(scratch)), key=lambda c: c.path))
    if walk.truncated:
        log.warning("file-change report truncated: %d changes listed, %d more omitted",
                    len(changes), walk.omitted)
    return ChangeSet(changes=changes, fallbacks=fallbacks, truncated=walk.truncated,
                     omitted=walk.omitted, errors=tuple(walk.errors))
