"""The files corral writes on the host with the user's rights: ``--report``, ``--suggest``,
``--events``, ``--pcap`` and ``--keep-changes`` (issue 9 class 1, issue 14 class 6).

They often live in the working directory, which the sandbox can write: it can plant a
symlink, a hard link to a host file or a FIFO at the name, or swap a parent directory for a
symlink, between the moment the user typed the path and the moment corral writes. So:

- :meth:`OutputFile.prepare` runs before the sandbox starts. It resolves the parent
  directory once, as the user named it, and holds it open (``O_PATH``); a missing parent,
  a target that is a symlink or a directory is refused there, one line naming the path.
- Every later step is relative to that directory fd, so a parent swapped for a symlink
  while the command runs cannot redirect the write.
- Nothing is ever opened at the name. A new file is created exclusively under a temporary
  name and renamed into place (``renameat``): a symlink, hard link or FIFO planted at the
  name is replaced, never followed, written through or opened (so never blocked on).
  A target that became a symlink by write time is refused.
- Character devices (``/dev/null``) are opened as they are (a sandbox cannot create one on
  the host); ``/dev/stdout``, ``/dev/stderr`` and ``/dev/fd/N`` name the supervisor's own
  descriptors and are duplicated, not reopened.

The held descriptors are closed in every child forked by this process (library mode forks
the sandboxed process itself, without an exec that would close them).
"""

from __future__ import annotations

import errno
import os
import re
import stat

import attrs

from corral.errors import ConfigError

__all__ = ["KeptDir", "OutputFile"]

_HELD: set[int] = set()  # directory fds held between prepare() and close()
_OWN_FD = re.compile(r"/(?:dev|proc/self)/fd/(\d+)|/dev/std(out|err)")


def _close_held_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _hold_parent(path: str, option: str) -> tuple[int, str]:
    parent, name = os.path.split(os.path.abspath(path))
    if not name:
        raise ConfigError(f"{option} {path}: not a file name. Fix: name a file")
    try:
        fd = os.open(parent or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        what = "no such directory" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else exc.strerror
        raise ConfigError(f"{option} {path}: {parent}: {what}. Fix: name a file in an "
                          "existing directory") from None
    _HELD.add(fd)
    return fd, name


def _release(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        _HELD.discard(fd)
        os.close(fd)


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


@attrs.define(eq=False)
class OutputFile:
    """One output file, held from before the sandbox starts until :meth:`close`.

    ``open()`` gives a descriptor on a fresh file now at the path (streams: events, pcap);
    ``replace_with(data)`` puts *data* at the path at once (report, suggestions)."""

    path: str
    option: str  # the option that named it, for messages ("--report")
    _dir_fd: int = attrs.field(default=-1, repr=False)
    _name: str = attrs.field(default="", repr=False)
    _device_fd: int | None = attrs.field(default=None, repr=False)  # /dev/null, /dev/stderr...

    @classmethod
    def prepare(cls, path: str | os.PathLike, option: str) -> OutputFile:
        """Check and hold *path*'s directory; refuse what cannot be written safely."""
        path = os.fspath(path)
        own = _OWN_FD.fullmatch(path)
        if own:
            fd = int(own.group(1)) if own.group(1) else (1 if own.group(2) == "out" else 2)
            try:
                return cls(path, option, device_fd=os.dup(fd))
            except OSError as exc:
                raise ConfigError(f"{option} {path}: {exc.strerror}. Fix: open that descriptor "
                                  "or name a file") from None
        dir_fd, name = _hold_parent(path, option)
        out = cls(path, option, dir_fd=dir_fd, name=name)
        try:
            st = out._check()
            if st is not None and stat.S_ISCHR(st.st_mode):
                out._device_fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NOCTTY
                                         | os.O_CLOEXEC, dir_fd=dir_fd)
        except BaseException:
            out.close()
            raise
        return out

    def _check(self) -> os.stat_result | None:
        st = _lstat_at(self._dir_fd, self._name)
        if st is None:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise ConfigError(f"{self.option} {self.path}: is a symlink (planted by a sandbox?); "
                              "corral never writes through one. Fix: remove it or name another file")
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{self.option} {self.path}: is a directory. Fix: name a file")
        return st

    def open(self) -> int:
        """A new descriptor (O_WRONLY, close-on-exec) on a file that is now at the path."""
        if self._device_fd is not None:
            return os.dup(self._device_fd)
        self._check()
        fd, temp = self._create()
        try:
            self._rename(temp)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def replace_with(self, data: bytes) -> None:
        """Put *data* at the path: written to a new file, renamed over whatever is there."""
        if self._device_fd is not None:
            _write_all(self._device_fd, data)
            return
        self._check()
        fd, temp = self._create()
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        self._rename(temp)

    def close(self) -> None:
        """Release the held descriptors (idempotent)."""
        _release(self._dir_fd)
        self._dir_fd = -1
        if self._device_fd is not None:
            os.close(self._device_fd)
            self._device_fd = -1

    def _create(self) -> tuple[int, str]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(100):
            temp = f".{self._name[:200]}.corral-{os.urandom(4).hex()}"
            try:
                return os.open(temp, flags, 0o666, dir_fd=self._dir_fd), temp
            except FileExistsError:
                continue
            except OSError as exc:
                raise self._error(exc) from None
        raise self._error(OSError(errno.EEXIST, "no unused temporary name"))

    def _rename(self, temp: str) -> None:
        try:
            os.rename(temp, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError as exc:
            try:
                os.unlink(temp, dir_fd=self._dir_fd)
            except OSError:
                pass
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> ConfigError:
        return ConfigError(f"{self.option} {self.path}: cannot write ({exc.strerror}). "
                           "Fix: name a writable file")

    def __repr__(self) -> str:
        return f"<OutputFile {self.option} {self.path!r}>"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@attrs.define(eq=False)
class KeptDir:
    """``--keep-changes DIR``: DIR's parent held from before the sandbox starts; at exit the
    scratch directory is renamed to DIR inside that parent, never through a link."""

    path: str
    _dir_fd: int = attrs.field(default=-1, repr=False)
    _name: str = attrs.field(default="", repr=False)

    @classmethod
    def prepare(cls, path: str | os.PathLike) -> KeptDir:
        path = os.fspath(path)
        dir_fd, name = _hold_parent(path, "--keep-changes")
        kept = cls(path, dir_fd=dir_fd, name=name)
        try:
            st = _lstat_at(dir_fd, name)
            if st is not None and not _is_empty_dir(dir_fd, name, st):
                raise ConfigError(f"--keep-changes {path}: already exists"
                                  + (" as a symlink" if stat.S_ISLNK(st.st_mode) else "")
                                  + ". Fix: name a new directory")
        except BaseException:
            kept.close()
            raise
        return kept

    def keep(self, scratch: str) -> str | None:
        """Move *scratch* to DIR; return None, or why not (the record then stays in scratch)."""
        st = _lstat_at(self._dir_fd, self._name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            return "it is now a symlink (planted by the sandbox?)"
        try:
            os.rename(scratch, self._name, dst_dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return ("it is on another filesystem than the scratch directory. Fix: pass "
                        "--scratch DIR on the same filesystem")
            return exc.strerror
        return None

    def close(self) -> None:
        _release(self._dir_fd)
        self._dir_fd = -1

    def __repr__(self) -> str:
        return f"<KeptDir {self.path!r}>"


def _is_empty_dir(dir_fd: int, name: str, st: os.stat_result) -> bool:
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return not os.listdir(fd)
    finally:
        os.close(fd)
