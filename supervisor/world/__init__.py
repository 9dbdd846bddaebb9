"""The "world": a private, offline network of documentation addresses with real servers.

The test suite, the benchmarks and the demo (``scripts/demo``) all run inside one, so that
nothing ever reaches a real address.  Standard library only (plus ``openssl``, ``nsenter``
and ``unshare`` on the machine): the demo needs no test extras.

DESIGN §8.  No test contacts a real address: network tests run their commands *inside*
a world, a user+net+mount namespace created by the unprivileged test user (its uid and
gid mapped to themselves, not to root) whose ``lo`` is up and carries

    198.51.100.10  2001:db8::10   HTTP (:80, :8080), TLS (:443)       HTTP_V4 / HTTP_V6
    198.51.100.53  2001:db8::53   DNS (:53 UDP+TCP), corral.test zone  DNS_V4 / DNS_V6
    198.51.100.7   2001:db8::7    echo host                            ECHO_V4 / ECHO_V6
    203.0.113.1-3  2001:db8::1:1-2  more hosts                         OTHER_V4 / OTHER_V6

and nothing else: there is no route to any other address, so a stray connect fails
with ENETUNREACH (UNREACHABLE_V4 = 192.0.2.1 is a handy address to prove it).  Every
world address serves HTTP (PORT_HTTP, PORT_HTTP_ALT), HTTPS (PORT_HTTPS, a self-signed
certificate for TLS_NAMES and HTTP_V4/HTTP_V6: trust ``world.ca_cert``), TCP and UDP echo
(PORT_ECHO; the TCP echo closes its side after the client's FIN, for half-close tests),
a server that writes CLOSE_AFTER_WRITE_MESSAGE then closes (PORT_CLOSE_AFTER_WRITE);
PORT_CLOSED refuses.  HTTP routes: ``/`` (HELLO_BODY), ``/host``, ``/bytes/N``,
``/delay/MS``, ``/files/PATH`` (from ``world.docroot``), ``POST /upload``; every response
carries X-World-Local / X-World-Peer / X-World-Host headers.  The DNS server is
authoritative for RECORDS (``www.corral.test``, ``alias.corral.test`` CNAME,
``txt.corral.test`` TXT, ``v6only.corral.test``, ``example.com``, ``pypi.org`` …,
NXDOMAIN otherwise) and logs every query it receives.  Inside the world
``/etc/resolv.conf`` names the world's DNS, so "the host's resolver" of a supervisor run
in the world is that server.

API::

    with World.start() as world:            # or the session fixture `world` below
        world.pid                            # the world process (target for nsenter)
        world.run(["curl", "-s", f"http://{HTTP_V4}/"], capture_output=True)  # CompletedProcess
        proc = world.popen(["iperf3", "-s"])  # subprocess.Popen, killed at close()
        world.argv(["dig", "www.corral.test"])  # nsenter prefix + argv (for trio.run_process)
        world.dns_queries()                  # [{"qname": "www.corral.test.", "qtype": "A",
                                             #   "proto": "udp", "peer": "...", "t": ...}]
        world.http_requests()                # [{"method", "path", "host", "sni", "tls", ...}]
        world.events() / world.clear_events()
        world.add_record("new.corral.test", "A", "203.0.113.1")
        world.docroot                        # Path served under /files/
        world.ca_cert                        # Path of the self-signed certificate (PEM)

Commands run through ``nsenter --preserve-credentials -U -n -m -t PID --wd=CWD``: they
keep the caller's uid and have no capabilities after exec, exactly like an unprivileged
user on a machine whose only network is the world.  The world dies with the test process
(PR_SET_PDEATHSIG, and end-of-stdin detection); start it from a long-lived thread.

The servers run as ``python -m corral.world.server``.  The pytest fixture ``world`` lives in
``tests/world.py`` (skipped without user namespaces unless CORRAL_MUST_WORK=1).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .addresses import (  # re-exported constants
    CLOSE_AFTER_WRITE_MESSAGE,
    DNS_V4,
    DNS_V6,
    ECHO_V4,
    ECHO_V6,
    HELLO_BODY,
    HTTP_V4,
    HTTP_V6,
    OTHER_V4,
    OTHER_V6,
    PORT_CLOSE_AFTER_WRITE,
    PORT_CLOSED,
    PORT_DNS,
    PORT_ECHO,
    PORT_HTTP,
    PORT_HTTP_ALT,
    PORT_HTTPS,
    RECORDS,
    TLS_NAMES,
    V4_ADDRESSES,
    V6_ADDRESSES,
    ZONE,
)

__all__ = [
    "CLOSE_AFTER_WRITE_MESSAGE", "DNS_V4", "DNS_V6", "ECHO_V4", "ECHO_V6", "HELLO_BODY",
    "HTTP_V4", "HTTP_V6", "OTHER_V4", "OTHER_V6", "PORT_CLOSE_AFTER_WRITE", "PORT_CLOSED",
    "PORT_DNS", "PORT_ECHO", "PORT_HTTP", "PORT_HTTP_ALT", "PORT_HTTPS", "RECORDS",
    "TLS_NAMES", "UNREACHABLE_V4", "UNREACHABLE_V6", "V4_ADDRESSES", "V6_ADDRESSES",
    "ZONE", "World", "WorldUnavailable",
]

UNREACHABLE_V4 = "192.0.2.1"  # TEST-NET-1: never routed inside the world
UNREACHABLE_V6 = "2001:db8:dead::1"
_START_TIMEOUT = 30.0
_COMMAND_TIMEOUT = 10.0
_DEFAULT_RUN_TIMEOUT = 120.0


class WorldUnavailable(RuntimeError):
    """The machine cannot build a world (no user namespaces, no nsenter, ...)."""


class World:
    """One running world process; see the module docstring."""

    def __init__(self, proc: subprocess.Popen, directory: Path, *, mount_ns: bool) -> None:
        self._proc = proc
        self._mount_ns = mount_ns
        self.dir = directory
        self.docroot = directory / "docroot"
        self.ca_cert = directory / "cert.pem"
        self.events_path = directory / "events.jsonl"
        self._lock = threading.Lock()
        self._children: list[subprocess.Popen] = []
        self._buf = b""

    def __repr__(self) -> str:
        state = "running" if self._proc.poll() is None else f"exited {self._proc.returncode}"
        return f"<World pid={self._proc.pid} dir={self.dir} {state}>"

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, *, mount_ns: bool = True, extra_mounts: int = 0) -> World:
        """Create the namespaces, start every server, return once all are listening.
        ``extra_mounts``: that many more read-only tmpfs mounts under /mnt/snap inside
        (a snap desktop's mount table, for start-up benchmarks)."""
        for tool in ("nsenter", "openssl"):
            if shutil.which(tool) is None:
                raise WorldUnavailable(f"world: `{tool}` not found. Fix: apt-get install util-linux openssl")
        directory = Path(tempfile.mkdtemp(prefix="corral-world-"))
        try:
            _make_files(directory)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise WorldUnavailable(f"world: could not create the TLS certificate: {exc.stderr}") from exc
        argv = [sys.executable, "-m", "corral.world.server", "--dir", str(directory), "--parent", str(os.getpid())]
        if not mount_ns:
            argv.append("--no-mount-ns")
        elif extra_mounts:
            argv += ["--extra-mounts", str(extra_mounts)]
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
        world = cls(proc, directory, mount_ns=mount_ns)
        try:
            hello = world._read_reply(_START_TIMEOUT)
            if not hello.get("ready"):
                raise WorldUnavailable(
                    f"world: could not build the namespaces: {hello.get('error')}. Fix: allow "
                    "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                    "user.max_user_namespaces>0, Ubuntu: kernel.apparmor_restrict_unprivileged_userns=0)"
                )
            check = world.run(["true"], capture_output=True, text=True, timeout=10)
            if check.returncode != 0:
                raise WorldUnavailable(f"world: nsenter into the world failed: {check.stderr.strip()}")
        except BaseException:
            world.close()
            raise
        return world

    def close(self) -> None:
        """Stop every process started with popen(), then the world; remove its files."""
        for child in self._children:
            if child.poll() is None:
                child.kill()
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._children.clear()
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(timeout=5)
        for stream in (self._proc.stdout, self._proc.stderr):
            stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    # ------------------------------------------------------------ running commands

    def argv(self, argv, *, cwd: str | os.PathLike | None = None) -> list[str]:
        """``argv`` prefixed with the nsenter call that runs it inside the world."""
        prefix = ["nsenter", "--preserve-credentials", "-U", "-n", "-t", str(self.pid)]
        if self._mount_ns:
            prefix[4:4] = ["-m"]
            prefix.append(f"--wd={os.fspath(cwd) if cwd is not None else os.getcwd()}")
        return [*prefix, "--", *map(os.fspath, argv)]

    def run(self, argv, *, input=None, timeout=_DEFAULT_RUN_TIMEOUT, check=False, **kw) -> subprocess.CompletedProcess:
        """subprocess.run(argv) inside the world, in its own process group.

        On timeout the whole group is killed (not only nsenter), then TimeoutExpired is
        raised as subprocess.run does.
        """
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        if kw.pop("capture_output", False):
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        kw.setdefault("process_group", 0)
        with subprocess.Popen(self.argv(argv, cwd=kw.get("cwd")), **kw) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                _kill_group(proc)
                try:
                    exc.output, exc.stderr = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    pass  # something left the process group and holds the pipes
                raise
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def popen(self, argv, **kw) -> subprocess.Popen:
        """subprocess.Popen(argv) inside the world.

        The process gets SIGKILL when the thread that started it exits (PR_SET_PDEATHSIG,
        through ``setpriv``), and close() kills it if it is still running.
        """
        world_argv = self.argv(argv, cwd=kw.get("cwd"))
        if shutil.which("setpriv"):
            world_argv = ["setpriv", "--pdeathsig", "KILL", *world_argv]
        proc = subprocess.Popen(world_argv, **kw)
        self._children.append(proc)
        return proc

    # ------------------------------------------------------------ what the servers saw

    def events(self) -> list[dict]:
        """Every request logged by the world's servers so far (JSON objects)."""
        try:
            text = self.events_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def dns_queries(self) -> list[dict]:
        """Queries the DNS server received: qname (absolute, lower case), qtype, proto, peer."""
        return [e for e in self.events() if e["kind"] == "dns"]

    def http_requests(self) -> list[dict]:
        """HTTP(S) requests: method, path, host, tls, sni, local, peer, body_len."""
        return [e for e in self.events() if e["kind"] == "http"]

    def clear_events(self) -> None:
        """Forget what was logged so far (the servers append with O_APPEND)."""
        with open(self.events_path, "r+") as f:
            f.truncate(0)

    def add_record(self, name: str, rdtype: str, value: str) -> None:
        """Add a record to the world's DNS (e.g. ``("x.corral.test", "A", OTHER_V4[0])``)."""
        self._command({"op": "add_record", "name": name, "type": rdtype, "value": value})

    # ------------------------------------------------------------ control channel

    def _command(self, cmd: dict) -> dict:
        with self._lock:
            self._proc.stdin.write((json.dumps(cmd) + "\n").encode())
            reply = self._read_reply(_COMMAND_TIMEOUT)
        if not reply.get("ok"):
            raise RuntimeError(f"world: command {cmd} failed: {reply.get('error')}")
        return reply

    def _read_reply(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise WorldUnavailable(f"world: no answer within {timeout} s")
                chunk = os.read(self._proc.stdout.fileno(), 65536)
                if not chunk:
                    err = self._proc.stderr.read().decode(errors="replace")
                    raise WorldUnavailable(f"world: the world process exited: {err.strip()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.kill()


def _make_files(directory: Path) -> None:
    (directory / "docroot").mkdir()
    (directory / "events.jsonl").touch()
    (directory / "resolv.conf").write_text(f"nameserver {DNS_V4}\nnameserver {DNS_V6}\n")
    san = ",".join([*(f"DNS:{n}" for n in TLS_NAMES), f"IP:{HTTP_V4}", f"IP:{HTTP_V6}"])
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "7", "-subj", f"/CN={TLS_NAMES[0]}", "-addext", f"subjectAltName={san}",
            "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"),
        ],
        check=True, capture_output=True, text=True, timeout=30,
    )
