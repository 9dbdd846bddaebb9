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

Paths in the report are host paths. The walk never follows symlinks and stops after
``limit`` entries (``truncated`` is then set). This reads files; it runs in the
supervisor after the command has exited.
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
DEFAULT_LIMIT = 100_000
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
            "changes": [c.to_dict() for c in self.changes],
            "fallbacks": dict(self.fallbacks),
            "errors": list(self.errors),
        }

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={self.count(k)}" for k in _CHANGES)
        return f"<ChangeSet {counts}{' truncated' if self.truncated else ''}>"


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


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        if value[:1] in (b"y", b"x"):
            return True
    return False


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _same_content(a: str, b: str) -> bool | None:
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x, y = fa.read(65536), fb.read(65536)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return None


class _Walk:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.out: list[FileChange] = []
        self.errors: list[str] = []
        self.truncated = False

    def add(self, change: FileChange) -> bool:
        if len(self.out) >= self.limit:
            self.truncated = True
            return False
        self.out.append(change)
        return True

    def scan(self, upper_dir: str, host_dir: str) -> None:
        try:
            names = sorted(os.listdir(upper_dir))
        except OSError as e:
            self.errors.append(f"{upper_dir}: {e.strerror}")
            return
        for name in names:
            if self.truncated:
                return
            up = os.path.join(upper_dir, name)
            host = os.path.join(host_dir, name)
            st = _lstat(up)
            if st is None:
                continue
            hst = _lstat(host)
            if _is_whiteout(st):
                if hst is not None:
                    self.add(FileChange(
                        path=host, change="deleted", kind=_kind(hst.st_mode),
                        host_size=hst.st_size if stat.S_ISREG(hst.st_mode) else None,
                    ))
                continue
            kind = _kind(st.st_mode)
            mode = stat.S_IMODE(st.st_mode)
            common = dict(
                path=host, kind=kind, mode=f"{mode:04o}",
                executable=kind == "file" and bool(mode & 0o111),
                size=st.st_size if kind == "file" else None,
                link_target=os.readlink(up) if kind == "symlink" else None,
            )
            if kind == "dir":
                if hst is None or not stat.S_ISDIR(hst.st_mode):
                    self.add(FileChange(change="created" if hst is None else "replaced", **common))
                    self.scan(up, host)
                elif _is_opaque(up):
                    self.add(FileChange(change="replaced", **common))
                    self.deleted_below(up, host)
                    self.scan(up, host)
                else:
                    self.scan(up, host)  # copied up because something below changed
                continue
            if hst is None:
                self.add(FileChange(change="created", **common))
                continue
            same = None
            if kind == "file" and stat.S_ISREG(hst.st_mode) and max(st.st_size, hst.st_size) <= COMPARE_LIMIT:
                same = st.st_size == hst.st_size and _same_content(up, host)
            self.add(FileChange(
                change="modified", host_size=hst.st_size if stat.S_ISREG(hst.st_mode) else None,
                content_changed=None if same is None else not same, **common,
            ))

    def deleted_below(self, upper_dir: str, host_dir: str) -> None:
        try:
            host_names = sorted(os.listdir(host_dir))
        except OSError:
            return
        present = set(os.listdir(upper_dir))
        for name in host_names:
            if name in present:
                continue
            hst = _lstat(os.path.join(host_dir, name))
            if hst is None:
                continue
            if not self.add(FileChange(
                path=os.path.join(host_dir, name), change="deleted", kind=_kind(hst.st_mode),
                host_size=hst.st_size if stat.S_ISREG(hst.st_mode) else None,
            )):
                return


def scan_upper(upper: str | os.PathLike, host_path: str, *, limit: int = DEFAULT_LIMIT) -> ChangeSet:
    """The changes one overlay's upper directory records against host directory *host_path*."""
    walk = _Walk(limit)
    walk.scan(os.fspath(upper), host_path)
    return ChangeSet(changes=tuple(walk.out), truncated=walk.truncated, errors=tuple(walk.errors))


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
    changes = tuple(sorted(walk.out, key=lambda c: c.path))
    if walk.truncated:
        log.warning("file-change report truncated at %d entries", limit)
    return ChangeSet(changes=changes, fallbacks=fallbacks, truncated=walk.truncated, errors=tuple(walk.errors))
