"""The warm server: a per-user process that has imported everything a sandbox
needs, so that ``corral run`` skips the interpreter's imports (issue 11).

    corral warm start [--idle SECONDS]   start one for these namespaces, in the background
    corral warm status                   is one running, and would it serve us?
    corral warm stop                     stop it (running sandboxes go on)
    corral warm serve [--idle SECONDS]   run one in the foreground (a service manager's)

One server serves one user in one set of namespaces (user, mount, network,
pid: :func:`corral.warm.client.namespace_key`); its socket lives in the
user's 0700 state directory, which every sandbox's mount plan masks.  For each
connection it forks a *worker* at once (the server itself reads nothing a
client sends).  The worker

1. checks the client as the client checked the server
   (:func:`~corral.warm.client.same_confinement`): this uid, and the same
   namespaces, root, credentials, capabilities, no_new_privs, seccomp, cgroup
   and LSM label — a client more confined than the server (another sandbox, a
   container of the same uid) would otherwise receive a less confined sandbox;
2. reads the request, checks it names the same interpreter and corral, and
   becomes the client: its fds at their numbers, cwd, environment, umask,
   resource limits, nice value, CPU affinity, OOM score, ignored and blocked
   signals — refusing (the client then starts cold) whatever it cannot match
   without widening it, such as a limit the server cannot raise back;
3. says ready with a pidfd of itself, waits for go, and runs ``corral``'s own
   ``main`` with the client's arguments: the very code path of a cold run,
   stage-1 included, minus the imports.  The exit status goes back to the
   client; if the client goes away the worker kills itself, and stage-1 (whose
   parent-death signal is the worker's) takes the sandbox with it, as when a
   cold ``corral`` is killed.

The server starts no thread and never loads the Go runtime (both would make
fork unsafe: DESIGN §2); each worker loads the Go runtime itself.  When
corral's code changes on disk the server answers "start cold" and replaces
itself with a fresh one; if it dies, its socket refuses connections and every
run starts cold.
"""

import fcntl
import gc
import io
import os
import select
import signal
import socket
import sys
import time
import traceback

from . import client as wire

IDLE_DEFAULT = 1800.0  # seconds without a run after which the server exits
ACCEPT_TICK = 5.0
SPARE_TTL = 60.0  # seconds a sandbox is kept ready for a run like the last one
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request, and to say go


class _Stop(Exception):
    pass


# ---------------------------------------------------------------- the server


def preload():
    """Import everything a run needs (the modules ``corral run`` imports on the
    default and ``--net none`` paths), but nothing that starts a thread or loads
    the Go runtime."""
    from .. import api, cli, launch, state  # noqa: F401
    from ..events import hints, monitor, report  # noqa: F401
    from ..net import dns, service  # noqa: F401

    warm_up()
    if not launch.can_fork():
        raise RuntimeError("preloading started a thread or the Go runtime: a warm server "
                           "could not fork safely")


def warm_up():
    """Plan a sandbox once, without starting it: the imports done inside
    functions, the compiled patterns and caches the first run would build (each
    worker is a fresh fork: whatever the server has done, none of them redoes)."""
    from .. import cli, launch

    for command in ("run", "audit"):
        _, config, argv = cli.parse([command, "--", "/bin/true"])
        planned = launch.prepare(config, argv, stdin_is_tty=False)
        launch._discard_scratch(planned)


def code_fingerprint():
    """(path, inode, size, mtime) of every loaded corral module and of the Go
    library: when any changes, the server is stale."""
    import corral
    from corral import bindings

    roots = tuple(os.path.dirname(m.__file__) + os.sep for m in (corral, bindings))
    files = {m.__file__ for m in list(sys.modules.values())
             if (getattr(m, "__file__", None) or "").startswith(roots)}
    bind_dir = roots[1]
    files.update(bind_dir + n for n in os.listdir(bind_dir) if n.endswith(".so"))
    found = []
    for path in sorted(files):
        try:
            st = os.stat(path)
        except OSError:
            found.append((path, None))
            continue
        found.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(found)


class Server:
    """The listening side: its socket, lock and loop."""

    def __init__(self, environ, idle=IDLE_DEFAULT, spares=True):
        from .. import state

        self.idle = idle
        self.spares = spares
        self.sock = None
        self.spare = None  # (pid, handoff socket) of the sandbox kept ready
        self.templates = self.templates_w = None  # workers -> server: what they ran
        self.place = state.state_place(environ)
        self.dir_fd = self.place.open()
        self.name = wire.socket_name()
        self.path = os.path.join(self.place.path, self.name)
        self.lock_fd = os.open(self.name[:-len(".sock")] + ".lock",
                               os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600,
                               dir_fd=self.dir_fd)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise AlreadyRunning(self.path) from None
        self.pid = os.getpid()
        self.started = time.time()
        self.served = 0
        self.fingerprint = None

    def listen(self):
        """Preload, then bind (only a ready server is ever connected to)."""
        preload()
        self.fingerprint = code_fingerprint()
        gc.freeze()  # the workers share these pages instead of copying them on collection
        try:
            os.unlink(self.name, dir_fd=self.dir_fd)  # a dead server's: we hold the lock
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        # through the directory's fd: no path component can be swapped, no length limit
        sock.bind("/proc/self/fd/%d/%s" % (self.dir_fd, self.name))
        self.inode = os.stat(self.name, dir_fd=self.dir_fd).st_ino
        sock.listen(64)
        sock.setblocking(False)
        self.sock = sock
        # workers tell the server what they ran (a template for the next spare)
        self.templates, self.templates_w = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.templates.setblocking(False)

    def loop(self):
        """Serve until stopped, idle or stale; True when stale (restart)."""
        children = set()
        last = time.monotonic()

        def stop(sig, frame):
            raise _Stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            while True:
                self._reap(children)
                if self.idle and not children and time.monotonic() - last > self.idle:
                    return False
                ready, _, _ = select.select([self.sock, self.templates], [], [], ACCEPT_TICK)
                if self.templates in ready:
                    self._new_spare(children)
                if self.sock not in ready:
                    continue
                try:
                    conn, _ = self.sock.accept()
                except BlockingIOError:
                    continue
                last = time.monotonic()
                if code_fingerprint() != self.fingerprint:
                    try:  # no waiting here for the client to hang up: it may reset
                        conn.send(b"corral changed on disk; the warm server restarts")
                    except OSError:
                        pass
                    conn.close()
                    return True
                self.served += 1
                if not self._hand_to_spare(conn):
                    children.add(self._fork(self._become_worker, conn))
                conn.close()
        except _Stop:
            return False
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            if self.spare is not None:
                self.spare[1].close()  # its EOF: the spare abandons its sandbox

    def _fork(self, become, *args):
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                self.sock.close()
                self.templates.close()
                if self.spare is not None:
                    self.spare[1].close()
                os.close(self.lock_fd)
                os.close(self.dir_fd)
                code = become(*args)
            except BaseException:  # never back into the server's loop
                traceback.print_exc()
            finally:
                os._exit(code)
        return pid

    def _become_worker(self, conn):
        return Worker(conn, self).run()

    def _new_spare(self, children):
        """A worker ran something: keep a sandbox ready for the same again."""
        try:
            template = self.templates.recv(wire.MESSAGE_MAX)
        except BlockingIOError:
            return
        if self.spare is not None or not template or not self.spares:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            pid = self._fork(self._become_spare, theirs, template)
        finally:
            theirs.close()
        children.add(pid)
        self.spare = (pid, ours)

    def _become_spare(self, handoff, template):
        return Spare(handoff, template, self).run()

    def _hand_to_spare(self, conn):
        """Give ``conn`` to the ready spare; False when there is none (or it died)."""
        if self.spare is None:
            return False
        pid, sock = self.spare
        self.spare = None
        try:
            sock.sendmsg([b"conn"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      conn.fileno().to_bytes(4, sys.byteorder, signed=True))])
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def _reap(self, children):
        from ..launch import reaped

        for pid in list(children):
            if reaped(pid):
                children.discard(pid)
                if self.spare is not None and self.spare[0] == pid:
                    self.spare[1].close()
                    self.spare = None

    def status_text(self):
        return ("pid %d, serving %s since %s%s, %d runs" % (
            self.pid, self.path, time.strftime("%Y-%m-%d %H:%M:%S",
                                                  time.localtime(self.started)),
            "" if self.spares else " (no spare)", self.served))

    def close(self):
        if self.sock is not None:
            try:  # only our own socket: a newer server may own the name already
                if os.stat(self.name, dir_fd=self.dir_fd).st_ino == self.inode:
                    os.unlink(self.name, dir_fd=self.dir_fd)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        for sock in (self.templates, self.templates_w):
            if sock is not None:
                sock.close()
        for fd in (self.lock_fd, self.dir_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class AlreadyRunning(Exception):
    pass


class Retry(wire.Refused):
    """A spare that is not this run's: the client connects once more."""

    def __str__(self):
        return wire.RETRY.decode()


def _say_cold(conn, why):
    """Tell the client why its run starts cold; then read (and drop) whatever it
    still sends until it hangs up: closing with its request unread would reset
    the connection, and the client would lose the answer."""
    try:
        conn.send(why.encode())
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(REQUEST_TIMEOUT)
        while True:
            data, fds = wire.receive(conn, wire.MESSAGE_MAX, wire.MAX_FDS)
            for fd in fds:
                os.close(fd)
            if not data:
                break
    except (OSError, wire.Refused):
        pass


def serve(environ, idle=IDLE_DEFAULT, ready=None, spares=True):
    """Run a server in this process until it stops; ``ready(server)`` is called
    once it listens.  A stale server replaces itself (exec) with a fresh one."""
    server = Server(environ, idle, spares)
    try:
        server.listen()
        if ready is not None:
            ready(server)
        stale = server.loop()
    finally:
        server.close()
    if stale:
        os.execv(sys.executable, [sys.executable, "-m", "corral", "warm", "serve",
                                  "--idle", repr(idle)] + ([] if spares else ["--no-spare"]))


# ---------------------------------------------------------------- a worker


class Worker:
    """One connection, in its own process (a fork of the server).  ``spare``:
    a sandbox made ready for a run like this one (:class:`Spare`), used when
    this run turns out to be the same but for its command."""

    def __init__(self, conn, server, spare=None):
        self.conn = conn
        self.server = server
        self.spare = spare
        self.template = None  # the request, once accepted: the next spare is made for it

    def run(self):
        """The exit status of this process."""
        started, going = None, False
        try:
            try:
                self.conn.settimeout(REQUEST_TIMEOUT)
                os.close(wire.same_confinement(self.conn))
                data, fds = wire.receive(self.conn, wire.MESSAGE_MAX, wire.MAX_FDS)
                req, started = self._accept(data, fds)  # owns fds from here
                if req is None:
                    return 0
                me = os.pidfd_open(os.getpid())
                try:
                    self.conn.sendmsg([b"ready"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    me.to_bytes(4, sys.byteorder, signed=True))])
                finally:
                    os.close(me)
                if self.conn.recv(16) != b"go":
                    return 0  # the client gave up (and starts cold): nothing ran
                going = True
            except (wire.Refused, OSError) as exc:
                sys.stderr.write("corral warm: a run starts cold: %s\n" % exc)  # the server's log
                _say_cold(self.conn, str(exc))
                return 0
        finally:
            if self.spare is not None and not going:
                # a status or stop request, or a client that gave up: nothing ran in it
                self.spare.started.abandon()
        self.conn.settimeout(None)
        _die_with_client(self.conn)
        from .. import launch

        launch.AFTER_EXIT = []
        if started is not None:
            from .. import cli

            for warning in self.spare.warnings:  # said when it was made ready, to nobody
                cli._say(warning)
        code = _main(req["argv"], started)
        signal.signal(signal.SIGIO, signal.SIG_IGN)  # the client leaves once it has the status
        try:
            self.conn.send(b"exit\0%d" % code)
        except OSError:
            pass
        _null_stdio()  # the client's stdio is the client's again
        try:  # the next run like this one finds a sandbox ready (made now: not while this ran)
            self.server.templates_w.send(self.template)
        except OSError:
            pass
        for cleanup in launch.AFTER_EXIT:  # scratch removal, the TAP's slow close
            try:
                cleanup()
            except Exception:
                traceback.print_exc()
        return code

    def _accept(self, data, fds):
        """Answer status and stop; for a run, become the client and return its
        request, and the spare's sandbox when it serves this run (else None).
        Every fd in ``fds`` is placed or closed."""
        started = None
        try:
            req = wire.decode_request(data)
            if req["kind"] == "status":
                self.conn.send(b"status\0" + self.server.status_text().encode())
                return None, None
            if req["kind"] == "stop":
                os.kill(os.getppid(), signal.SIGTERM)
                self.conn.send(b"stopped")
                return None, None
            if req["kind"] != "run":
                raise wire.Refused("unknown request %r" % req["kind"])
            self._check_same_corral(req)
            if len(fds) != len(req["fds"]):
                raise wire.Refused("the fds sent do not match the request")
            self.template = data
            if self.spare is None:
                _take_settings(req)
            else:  # its settings are the template's: the run must have the same, or go elsewhere
                started = self.spare.take(req)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        keep = [self.server.templates_w]
        sweeper = started.sweeper if started is not None else None
        if started is not None:  # the spare's own: its ctl and its sweeper's socket
            keep += [started.ctl] + ([sweeper._sock] if sweeper is not None and sweeper._sock else [])
        pinned = self.spare.pinned if self.spare is not None else ()
        self.conn, self.server.templates_w, *kept = _install_fds(req["fds"], fds, self.conn, keep,
                                                                 pinned)
        if started is not None:
            started.ctl = kept[0]
            if len(kept) > 1:
                sweeper._sock = kept[1]
        self.conn.settimeout(REQUEST_TIMEOUT)
        sys.argv = [os.fsdecode(a) for a in req["argv"]]
        _reopen_stdio(set(req["fds"]))
        if started is not None:
            started.take_command(self.spare.config, self.spare.command_argv(req))
        return req, started

    def _check_same_corral(self, req):
        import corral

        if req["exe"] != os.fsencode(sys.executable):
            raise wire.Refused("the client runs another Python")
        if req["package"] != os.fsencode(os.path.dirname(os.path.abspath(corral.__file__))):
            raise wire.Refused("the client runs another corral")


# Everything of a request but its command and fds: what a spare was made for.
SAME = ("kind", "exe", "package", "cwd", "umask", "nice", "oom_score_adj", "limits", "cpus",
        "ignored", "blocked")


class Spare:
    """A sandbox made ready for a run like the last one (its *template*): same
    options, cwd, limits, signals — everything but the command, its environment
    and its stdio, which come with go (:meth:`corral.launch.Started.take_command`).
    It serves the next connection when that run is the same and the mount plan,
    planned again now, is too; otherwise it is abandoned and tells the client to
    connect again (:class:`Retry`), which a fresh worker then serves.  Unused for
    :data:`SPARE_TTL` seconds, it is abandoned."""

    def __init__(self, handoff, template, server):
        self.handoff = handoff
        self.template = template
        self.server = server
        self.req = self.config = self.started = None
        self.warnings = []
        self.pinned = frozenset()  # fds the Go runtime opened, loaded ahead

    def run(self):
        from .. import cli, launch

        try:
            self.req = wire.decode_request(self.template)
            _take_settings(self.req)
            command, self.config, argv = cli.parse([os.fsdecode(a) for a in self.req["argv"][1:]])
        except Exception:
            return 0  # nothing to make ready for: runs go as they would
        if command not in cli.SANDBOX_COMMANDS or self.config.keep_changes:
            return 0  # --keep-changes claims its directory when planned: not ahead of a run
        _null_stdio()  # its stdio comes with go: nothing to relay yet
        try:
            self.started = launch.start_early(self.config, argv, on_warning=self.warnings.append)
        except Exception:
            return 0
        if self.config.net == "filtered":
            # The Go runtime (~20 ms) too: this process forks nothing any more.  Its fds
            # stay where it put them (no run whose fds would land there takes this spare),
            # and its signal handlers stay: a run taking the spare has the same dispositions.
            before = set(os.listdir("/proc/self/fd"))
            from ..net import service

            service.preload()
            from ..net import owner  # noqa: F401 (needs the Go library: not in the server)

            self.pinned = frozenset(int(n) for n in set(os.listdir("/proc/self/fd")) - before)
        try:
            ready, _, _ = select.select([self.handoff], [], [], SPARE_TTL)
            fds = wire.receive(self.handoff, 16, 1)[1] if ready else []
        except (OSError, wire.Refused):
            fds = []
        self.handoff.close()
        if not fds:
            self.started.abandon()
            return 0
        return Worker(socket.socket(fileno=fds[0]), self.server, self).run()

    def take(self, req):
        """This sandbox for ``req``, its environment taken; Retry when it is not
        the one ``req`` would make now (the client asks again, and a fresh worker
        serves it): nothing of this process was changed but the environment."""
        if (any(req[k] != self.req[k] for k in SAME) or set(req["fds"]) & self.pinned
                or _options(req["argv"]) != _options(self.req["argv"]) or not self._alive()):
            raise Retry()
        os.environb.clear()
        os.environb.update(req["env"])
        if not self._plans_alike(req):
            raise Retry()
        return self.started

    def _plans_alike(self, req):
        """Whether ``req``'s options, parsed, and its mount plan, made again now with
        its environment, are this sandbox's."""
        from .. import cli, launch

        try:
            _, config, _ = cli.parse([os.fsdecode(a) for a in req["argv"][1:]])
            return (config == self.config
                    and launch.replan(self.started.launch, config) == self.started.launch.spec["plan"])
        except Exception:
            return False

    def _alive(self):
        """Stage-1 still waits (it exits when a step fails: a cold run would retry)."""
        try:
            ended = os.waitid(os.P_PID, self.started.process.pid,
                              os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return ended is None

    def command_argv(self, req):
        argv = [os.fsdecode(a) for a in req["argv"]]
        return argv[argv.index("--") + 1:]


def _options(argv):
    """corral's own arguments: up to the first ``--``."""
    return argv[:argv.index(b"--") + 1] if b"--" in argv else None


def _take_settings(req):
    """Take on the client's cwd, environment, umask, limits, scheduling and
    signal dispositions: what a cold ``corral`` would have inherited.  Refused
    when one cannot be matched (a limit above the server's, a lower nice…)."""
    try:
        os.chdir(req["cwd"])
    except OSError as exc:
        raise wire.Refused("cannot enter the client's cwd (%s)" % exc.strerror) from None
    os.environb.clear()
    os.environb.update(req["env"])
    os.umask(req["umask"])
    import resource

    for res, soft, hard in req["limits"]:
        try:
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):
            raise wire.Refused("resource limit %d cannot be set to the client's" % res) from None
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) != req["nice"]:
            os.setpriority(os.PRIO_PROCESS, 0, req["nice"])
        os.sched_setaffinity(0, req["cpus"])
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("%d" % req["oom_score_adj"])
    except OSError as exc:
        raise wire.Refused("cannot take the client's scheduling or OOM settings (%s)"
                           % exc.strerror) from None
    ignored = set(req["ignored"])
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if sig in ignored:
            handler = signal.SIG_IGN
        elif sig == signal.SIGINT:
            handler = signal.default_int_handler
        else:
            handler = signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [s for s in req["blocked"]
                                                if s in signal.valid_signals()])


def _install_fds(targets, received, conn, keep=(), pinned=()):
    """Put ``received[i]`` at fd ``targets[i]`` and close every other fd but the
    connection and the sockets in ``keep`` (a spare's ctl), which move above
    them all, and the fds ``pinned`` where they are (the Go runtime's, none of
    ``targets``): the fd table a cold ``corral`` would have started with.
    Returns the connection and the kept sockets, moved."""
    high = max([2, *targets]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, high) for fd in received]
    ours = []
    for sock in (conn, *keep):
        ours.append(fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, high))
        sock.close()
    kept = set(moved) | set(ours) | set(pinned)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in kept:
            try:
                os.close(fd)
            except OSError:
                pass
    for target, fd in zip(targets, moved):
        os.dup2(fd, target)
        os.close(fd)
    return [socket.socket(fileno=fd) for fd in ours]


def _reopen_stdio(open_fds):
    """sys.stdin/stdout/stderr over the client's fds 0-2 (None when closed, as
    a cold interpreter has them)."""
    encoding, errors = sys.stderr.encoding if sys.stderr else "utf-8", "backslashreplace"
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if fd not in open_fds:
            setattr(sys, name, None)
            continue
        lines = fd == 2 or (fd == 1 and os.isatty(1))
        stream = io.open(fd, mode, buffering=1 if lines else -1, closefd=False,
                         encoding=encoding, errors="strict" if fd == 0 else errors)
        setattr(sys, name, stream)


def _null_stdio():
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _die_with_client(conn):
    """When the client goes away (killed: it never closes otherwise before the
    exit status), die as a killed cold ``corral`` would: SIGKILL, and stage-1's
    parent-death signal takes the sandbox."""

    def gone(sig=None, frame=None):
        try:
            data = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            os.kill(os.getpid(), signal.SIGKILL)

    signal.signal(signal.SIGIO, gone)
    fcntl.fcntl(conn.fileno(), fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(conn.fileno(), fcntl.F_SETFL,
                fcntl.fcntl(conn.fileno(), fcntl.F_GETFL) | os.O_ASYNC)
    gone()  # it may have gone before the watch was set


def _main(argv, started=None):
    """``corral`` ``argv[1:]`` as :func:`corral.cli.console` runs it."""
    from .. import cli

    try:
        code = cli.main([os.fsdecode(a) for a in argv[1:]], started)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    return code


# ---------------------------------------------------------------- the CLI


def request(kind, environ=None):
    """Ask the server of these namespaces for ``kind`` (status, stop): its
    answer, or Refused saying why there is none."""
    environ = os.environ if environ is None else environ
    path = wire.socket_path(environ)
    if path is None:
        raise wire.Refused("no warm server runs for these namespaces")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(wire.READY_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as exc:
            raise wire.Refused("the warm server at %s is gone (%s)" % (path, exc.strerror)) from None
        os.close(wire.same_confinement(sock))
        sock.send(wire.encode_request(kind, ["corral"], {}, b"/", []))
        msg, fds = wire.receive(sock, 4096, 1)
        for fd in fds:
            os.close(fd)
        return msg
    finally:
        sock.close()


def main(args, say):
    """`corral warm ACTION`; the exit status."""
    if args.action == "status":
        try:
            answer = request("status")
        except (wire.Refused, OSError) as exc:
            say("warm: %s: `corral run` starts cold" % exc)
            return 1
        say("warm: %s" % answer.partition(b"\0")[2].decode("utf-8", "replace"))
        return 0
    if args.action == "stop":
        try:
            request("stop")
        except (wire.Refused, OSError) as exc:
            say("warm: %s" % exc)
            return 1
        say("warm: stopped (running sandboxes go on)")
        return 0
    if args.action == "serve":
        try:
            serve(os.environ, args.idle, spares=args.spare)
        except AlreadyRunning as exc:
            say("warm: a server already runs at %s. Fix: `corral warm stop` first" % exc)
            return 1
        return 0
    return _start(args.idle, args.spare, say)


def _start(idle, spares, say):
    """Start a server in the background; return once it listens."""
    try:
        say("warm: already running: %s" % request("status").partition(b"\0")[2].decode())
        return 0
    except (wire.Refused, OSError):
        pass
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 1
        told = []

        def tell(data):
            if not told:
                told.append(data)
                os.write(w, data)
                os.close(w)

        try:
            os.setsid()
            if os.fork():
                os._exit(0)
            os.chdir("/")
            _null_stdio()
            serve(os.environ, idle, lambda server: tell(b"ok\0" + server.status_text().encode()),
                  spares)
            code = 0
        except AlreadyRunning as exc:
            tell(b"a server already runs at %s" % os.fsencode(str(exc)))
        except BaseException as exc:
            tell(("%s: %s" % (type(exc).__name__, exc)).encode())
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    try:
        answer = os.read(r, 65536)
    finally:
        os.close(r)
    if answer.startswith(b"ok\0"):
        say("warm: started: %s" % answer[3:].decode("utf-8", "replace"))
        return 0
    say("warm: could not start: %s" % (answer.decode("utf-8", "replace") or "it exited"))
    return 1
