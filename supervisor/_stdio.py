"""The command's stdin/stdout/stderr: what it may do with them is what the fd allows.

An fd that names a *reopenable* object — a regular file, a directory, a block
device, a named FIFO, a character device other than a terminal or a
``/dev/null``-like one — would let the command ``open("/proc/self/fd/1", "r+")``
the same inode with more rights than the fd has (overwrite the file ``<``
gave it, truncate or read back a ``>>`` log).  Such fds never enter the
sandbox: :func:`plan` gives the command one end of a pipe instead, and a
:class:`Relay` in the supervisor moves the bytes between that pipe and the
original fd (``os.splice``: no copy, no visible latency; plain reads and
writes where splice cannot, e.g. ``O_APPEND`` files, whose writes still go
through the original fd and so keep appending).

What passes as is: a terminal (job control, window size: ``bash -i`` must
feel local), ``/dev/null``, ``/dev/zero``, ``/dev/full``, ``/dev/random``,
``/dev/urandom`` (reopening them gives nothing more), an anonymous pipe and a
socket (reopening gives the same pipe or nothing: sockets cannot be opened
through /proc), other anonymous inodes (eventfd…: /proc refuses to reopen
them), and closed fds.

When fds 1 and 2 share one open file description (``> log 2>&1``) they get
one pipe, so the interleaving stays exactly what the command wrote.

The supervisor owns the pipes' far ends; nothing inside the sandbox holds
them.  Every process inside dies with pid 1, so the command's ends close when
it exits and the relay sees EOF; :meth:`Relay.finish` still bounds the wait
(an fd passed out of the sandbox, e.g. over an abstract unix socket with
``--net host``, could keep a pipe open) and then stops the relay.
"""

import errno
import fcntl
import os
import select
import stat
import struct
import termios
import threading

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20  # fewer wake-ups for bulk data (the unprivileged maximum by default)
# Character devices that give nothing more when reopened (major 1: mem).
_HARMLESS_CHAR = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)}  # null zero full random urandom
FINISH_GRACE = 2.0  # seconds the relay may still take once the sandbox ended


def needs_relay(fd):
    """True when handing ``fd`` to the sandbox would let it reopen the
    object behind it with more rights than the fd has."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False  # closed: stays closed
    mode = st.st_mode
    if stat.S_ISSOCK(mode):
        return False
    if stat.S_ISFIFO(mode):
        try:
            return not os.readlink("/proc/self/fd/%d" % fd).startswith("pipe:")
        except OSError:
            return True
    if stat.S_ISCHR(mode):
        if (os.major(st.st_rdev), os.minor(st.st_rdev)) in _HARMLESS_CHAR:
            return False
        return not os.isatty(fd)
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISBLK(mode):
        return True
    return False  # anonymous inodes: /proc refuses to reopen them


def _same_description(a, b):
    """Do fds ``a`` and ``b`` share one open file description (``2>&1``)?
    The status flags live in the description: flip O_NONBLOCK on ``a`` (no
    effect on the files we relay) and see whether ``b`` changed."""
    sa, sb = os.fstat(a), os.fstat(b)
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino):
        return False
    flags, flags_b = fcntl.fcntl(a, fcntl.F_GETFL), fcntl.fcntl(b, fcntl.F_GETFL)
    fcntl.fcntl(a, fcntl.F_SETFL, flags ^ os.O_NONBLOCK)
    try:
        return fcntl.fcntl(b, fcntl.F_GETFL) != flags_b
    finally:
        fcntl.fcntl(a, fcntl.F_SETFL, flags)


class Relay:
    """The pipes and threads that stand in for reopenable stdio fds.

    ``child_fds`` is what the sandbox gets as fds 0, 1, 2 (``None``: the
    original, passed as is).  After starting the sandbox the driver calls
    :meth:`spawned` (closes the supervisor's copies of the sandbox's ends,
    starts the threads); once stage-1 was reaped, :meth:`finish`.
    """

    def __init__(self, fds=(0, 1, 2)):
        self.child_fds = [None, None, None]
        self._theirs = []  # the sandbox's ends, closed here once it has them
        self._pumps = []  # (src, dst, ours)
        self._threads = []
        self._stop_r = self._stop_w = None
        self._stdin = self._stdin_r = None  # to give unread stdin back (see _give_back)
        stdin, stdout, stderr = fds
        try:
            if stdin is not None and needs_relay(stdin):
                r, w = os.pipe2(os.O_CLOEXEC)
                self._theirs.append(r)
                self.child_fds[0] = r
                self._pumps.append((stdin, w, w))
                self._stdin, self._stdin_r = stdin, os.dup(r)
            shared = None
            for index, fd in ((1, stdout), (2, stderr)):
                if fd is None or not needs_relay(fd):
                    continue
                if index == 2 and shared is not None and _same_description(stdout, fd):
                    self.child_fds[2] = shared
                    continue
                r, w = os.pipe2(os.O_CLOEXEC)
                self._theirs.append(w)
                self.child_fds[index] = shared = w
                self._pumps.append((r, fd, r))
        except BaseException:
            self.close()
            raise

    @property
    def active(self):
        return bool(self._pumps)

    def popen_stdio(self, stdio):
        """Popen's stdin/stdout/stderr with the relayed ones replaced."""
        return tuple(mine if mine is not None else given
                     for mine, given in zip(self.child_fds, stdio))

    def dup_into_child(self):
        """In a forked stage-1: put the pipe ends on 0, 1, 2 and drop every
        fd of the relay (the sandbox must hold none of the supervisor's ends)."""
        for index, fd in enumerate(self.child_fds):
            if fd is not None:
                os.dup2(fd, index)
        for _src, _dst, ours in self._pumps:
            os.close(ours)
        for fd in set(self._theirs):
            os.close(fd)
        if self._stdin_r is not None:
            os.close(self._stdin_r)

    def spawned(self):
        """The sandbox holds its ends now: close ours and start relaying (once)."""
        for fd in set(self._theirs):
            os.close(fd)
        self._theirs = []
        if not self._pumps or self._threads:
            return
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        for src, dst, ours in self._pumps:
            os.set_blocking(ours, False)
            try:
                fcntl.fcntl(ours, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # over fs.pipe-max-size or the user's pipe quota: the default 64 KiB
            thread = threading.Thread(target=_pump, args=(src, dst, ours, self._stop_r),
                                      name="corral-stdio", daemon=True)
            thread.start()
            self._threads.append((thread, src == ours))

    def finish(self, grace=FINISH_GRACE):
        """The sandbox ended: let the output relays drain to EOF (at most
        ``grace`` seconds), stop whatever still runs (stdin: nobody is left
        to read it), and release everything."""
        if self._stop_w is not None:
            for thread, output in self._threads:
                if output:
                    thread.join(grace)
            os.write(self._stop_w, b"x")
            for thread, _output in self._threads:
                thread.join()
            if self._stdin_r is not None:
                _give_back(self._stdin, self._stdin_r)
        self.close()

    def close(self):
        for fd in set(self._theirs):
            os.close(fd)
        self._theirs = []
        if not self._threads:  # never started: the pumps' ends are ours to close
            for _src, _dst, ours in self._pumps:
                os.close(ours)
        self._pumps = []
        self._threads = []
        for fd in (self._stop_r, self._stop_w, self._stdin_r):
            if fd is not None:
                os.close(fd)
        self._stop_r = self._stop_w = self._stdin_r = None


def _pump(src, dst, ours, stop):
    """Move bytes from ``src`` to ``dst`` until EOF, an error or ``stop``;
    then close ``ours`` (the pipe end: EOF or EPIPE for the command)."""
    try:
        _move(src, dst, ours, stop)
    finally:
        os.close(ours)


def _give_back(src, pipe_r):
    """Stdin read ahead into the pipe but never read by the command goes back
    to the file (``while read l; do corral run ...; done < file`` must not
    lose lines): seek the shared offset back by what is still in the pipe."""
    try:
        unread = struct.unpack("i", fcntl.ioctl(pipe_r, termios.FIONREAD, b"\0\0\0\0"))[0]
        if unread and stat.S_ISREG(os.fstat(src).st_mode):
            os.lseek(src, -unread, os.SEEK_CUR)
    except OSError:
        pass


def _move(src, dst, ours, stop):
    use_splice = True
    pending = b""
    dst_full = False
    poller = select.poll()
    poller.register(stop, select.POLLIN)
    while True:
        if pending or dst_full:
            target, event = dst, select.POLLOUT
        else:  # a regular file is always readable
            target, event = src, select.POLLIN
        poller.register(target, event)
        ready = dict(poller.poll())
        poller.unregister(target)
        if stop in ready:
            return
        dst_full = False
        try:
            if pending:
                pending = pending[os.write(dst, pending):]
                continue
            if use_splice:
                if os.splice(src, dst, CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) == 0:
                    return
                continue
            pending = os.read(src, CHUNK)
            if not pending:
                return
        except BlockingIOError:
            dst_full = True  # src was ready, so what we write to is full
        except OSError as exc:
            if use_splice and exc.errno == errno.EINVAL:
                use_splice = False  # O_APPEND file, a device without splice…
                continue
            return  # EPIPE (nobody reads any more), EISDIR, EIO, ENOSPC: the stream ends
