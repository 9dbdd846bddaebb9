"""The world process: a user+net(+mount) namespace full of documentation-address servers.

Started by :class:`corral.world.World` as ``python -m corral.world.server --dir DIR
--parent PID``; never imported by the client.  It unshares its own namespaces with ``unshare(2)`` (it does not
exec afterwards, so it keeps the capabilities it gets over the new namespaces), maps the
caller's uid/gid to themselves, puts the world's addresses on ``lo`` with pyroute2, binds
every server, then prints one JSON line ``{"ready": true, ...}`` on stdout.

Control: stdin carries one JSON command per line (``{"op": "add_record", ...}``,
``{"op": "ping"}``), each answered by one JSON line on stdout.  End of stdin (the test
process died or closed the world) stops the world; so does the parent's death
(PR_SET_PDEATHSIG).  Every request the servers see is appended as a JSON line to
``DIR/events.jsonl``.

Stdlib only, plus pyroute2 and dnspython (both imported after unshare, so that the
process is still single-threaded when it creates the user namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import json
import os
import signal
import socket
import ssl
import struct
import sys
import time
import urllib.parse

from .addresses import (
    CLOSE_AFTER_WRITE_MESSAGE,
    DNS_V4,
    DNS_V6,
    HELLO_BODY,
    PORT_CLOSE_AFTER_WRITE,
    PORT_DNS,
    PORT_ECHO,
    PORT_HTTP,
    PORT_HTTPS,
    PORT_HTTP_ALT,
    RECORDS,
    V4_ADDRESSES,
    V6_ADDRESSES,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_RDONLY = 1
PR_SET_PDEATHSIG = 1
IFA_F_NODAD = 0x02

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"world: {what}: {os.strerror(err)}")


def enter_namespaces(resolv_conf: str | None, extra_mounts: int = 0) -> None:
    """unshare(USER|NET[|NS]), map uid/gid to themselves, optionally bind resolv.conf
    (what ``ip netns exec`` and every container do) and add ``extra_mounts`` read-only
    tmpfs mounts under /mnt/snap (what a snap desktop's mount table looks like)."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNET | (CLONE_NEWNS if resolv_conf else 0)
    _check(_libc.unshare(flags), "unshare(CLONE_NEWUSER|CLONE_NEWNET)")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")
    if resolv_conf:
        # New mounts in a mount namespace owned by a new user namespace are slaves of
        # the host's: nothing done here propagates back.
        _check(
            _libc.mount(resolv_conf.encode(), b"/etc/resolv.conf", None, MS_BIND, None),
            "bind-mount the world's resolv.conf over /etc/resolv.conf",
        )
        if extra_mounts:
            _check(_libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, b"mode=0755"), "mount a tmpfs on /mnt")
            for i in range(extra_mounts):
                path = "/mnt/snap/app%d/%d" % (i, 100 + i)
                os.makedirs(path)
                _check(_libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_RDONLY, b"size=64k"),
                       "mount a read-only tmpfs on " + path)


def configure_lo() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=idx, state="up")
        for addr in V4_ADDRESSES:
            ipr.addr("add", index=idx, address=addr, prefixlen=32)
        for addr in V6_ADDRESSES:
            ipr.addr("add", index=idx, address=addr, prefixlen=128, flags=IFA_F_NODAD)
    # Let the unprivileged user open ICMP echo sockets here (the supervisor's
    # side of a sandboxed ping), as many desktops do (net.ipv4.ping_group_range).
    gid = os.getgid()
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write("%d %d" % (gid, gid))
    # Reuse TIME_WAIT ports for new connections: the world's addresses are not
    # 127/8, so the default (reuse on loopback addresses only) would let tens of
    # thousands of short connections (benchmarks, burst tests) exhaust the
    # ephemeral ports and slow every later connect().
    with open("/proc/sys/net/ipv4/tcp_tw_reuse", "w") as f:
        f.write("1")


class EventLog:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, **fields) -> None:
        fields["t"] = time.time()
        os.write(self._fd, (json.dumps(fields, sort_keys=True) + "\n").encode())


def _addr(sockname) -> str:
    host, port = sockname[0], sockname[1]
    host = host.removeprefix("::ffff:") if "." in host else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------- HTTP(S)

_PATTERN = bytes(range(256)) * 4096  # 1 MiB, sent repeatedly for /bytes/N


class Http:
    """A small HTTP/1.1 server: keep-alive, Content-Length bodies, a few fixed routes.

    GET /                 HELLO_BODY
    GET /host             the request's Host header
    GET /bytes/N          N bytes (a repeating 0..255 pattern), streamed
    GET /delay/MS         HELLO_BODY after MS milliseconds (at most 10 s)
    GET /files/PATH       DIR/docroot/PATH (404 if missing)
    POST /upload          JSON {"received": n, "sha256": hex} of the body
    Every response carries X-World-Local, X-World-Peer and X-World-Host headers.
    """

    def __init__(self, log: EventLog, docroot: str, tls: ssl.SSLContext | None) -> None:
        self.log = log
        self.docroot = os.path.realpath(docroot)
        self.tls = tls
        self.sni: dict[int, str | None] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader, writer) -> None:
        local = _addr(writer.get_extra_info("sockname"))
        peer = _addr(writer.get_extra_info("peername"))
        sslobj = writer.get_extra_info("ssl_object")
        sni = self.sni.pop(id(sslobj), None) if sslobj is not None else None
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = (lines[0].split(" ") + ["", ""])[:3]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0") or "0")
            body = await reader.readexactly(length) if length else b""
            conn = headers.get("connection", "").lower()
            keep = (version == "HTTP/1.1" and conn != "close") or (conn == "keep-alive")
            path = urllib.parse.urlsplit(target).path
            self.log.write(
                kind="http", tls=self.tls is not None, sni=sni, method=method, path=path,
                host=headers.get("host"), local=local, peer=peer, body_len=len(body),
            )
            status, ctype, payload, size = await self._route(method, path, headers, body)
            out = [
                f"HTTP/1.1 {status}",
                f"Content-Type: {ctype}",
                f"Content-Length: {size}",
                f"X-World-Local: {local}",
                f"X-World-Peer: {peer}",
                f"X-World-Host: {headers.get('host', '')}",
                f"Connection: {'keep-alive' if keep else 'close'}",
            ]
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode())
            if method != "HEAD":
                if isinstance(payload, bytes):
                    writer.write(payload)
                else:
                    remaining = size
                    while remaining:
                        chunk = _PATTERN[: min(remaining, len(_PATTERN))]
                        writer.write(chunk)
                        remaining -= len(chunk)
                        await writer.drain()
            await writer.drain()
            if not keep:
                return

    async def _route(self, method, path, headers, body):
        text = "text/plain"
        if method == "POST" and path == "/upload":
            payload = json.dumps(
                {"received": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            ).encode()
            return "200 OK", "application/json", payload, len(payload)
        if method not in ("GET", "HEAD"):
            msg = b"method not allowed\n"
            return "405 Method Not Allowed", text, msg, len(msg)
        if path == "/":
            return "200 OK", text, HELLO_BODY, len(HELLO_BODY)
        if path == "/host":
            payload = headers.get("host", "").encode()
            return "200 OK", text, payload, len(payload)
        if path.startswith("/bytes/") and path[7:].isdigit():
            n = int(path[7:])
            return "200 OK", "application/octet-stream", None, n
        if path.startswith("/delay/") and path[7:].isdigit():
            await asyncio.sleep(min(int(path[7:]), 10_000) / 1000)
            return "200 OK", text, HELLO_BODY, len(HELLO_BODY)
        if path.startswith("/files/"):
            full = os.path.realpath(os.path.join(self.docroot, urllib.parse.unquote(path[7:])))
            if full.startswith(self.docroot + os.sep) and os.path.isfile(full):
                with open(full, "rb") as f:
                    payload = f.read()
                return "200 OK", "application/octet-stream", payload, len(payload)
        msg = b"not found\n"
        return "404 Not Found", text, msg, len(msg)


# ---------------------------------------------------------------- TCP/UDP helpers


async def tcp_echo(reader, writer) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


def make_close_after_write(log: EventLog):
    async def handler(reader, writer) -> None:
        log.write(kind="close_after_write", peer=_addr(writer.get_extra_info("peername")))
        try:
            writer.write(CLOSE_AFTER_WRITE_MESSAGE)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return handler


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.transport.sendto(data, addr)


# ---------------------------------------------------------------- DNS


class Dns:
    """Authoritative for RECORDS (and whatever add_record() adds); logs every query."""

    def __init__(self, log: EventLog) -> None:
        import dns.flags
        import dns.message
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset

        self.dns = dns
        self.log = log
        self.records = {k: list(v) for k, v in RECORDS.items()}

    def add(self, name: str, rdtype: str, value: str) -> None:
        name = name if name.endswith(".") else name + "."
        self.records.setdefault(name.lower(), []).append((rdtype.upper(), value))

    def answer(self, wire: bytes, proto: str, peer) -> bytes | None:
        dns = self.dns
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            self.log.write(kind="dns", proto=proto, peer=_addr(peer), malformed=True)
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        q = query.question[0]
        qname = q.name.to_text().lower()
        qtype = dns.rdatatype.to_text(q.rdtype)
        self.log.write(kind="dns", proto=proto, peer=_addr(peer), qname=qname, qtype=qtype)
        name, seen = qname, 0
        found = name in self.records
        while name in self.records and seen < 8:
            seen += 1
            recs = self.records[name]
            cnames = [v for t, v in recs if t == "CNAME"]
            if cnames and qtype != "CNAME":
                response.answer.append(dns.rrset.from_text(name, 60, "IN", "CNAME", cnames[0]))
                name = cnames[0].lower()
                continue
            values = [v for t, v in recs if t == qtype]
            if values:
                if qtype == "TXT":
                    values = ['"' + v.replace('"', '\\"') + '"' for v in values]
                response.answer.append(dns.rrset.from_text(name, 60, "IN", qtype, *values))
            break
        if not found and not any(n.endswith("." + qname) for n in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()


class DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, server: Dns) -> None:
        self.server = server

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        reply = self.server.answer(data, "udp", addr)
        if reply is not None:
            self.transport.sendto(reply, addr)


def make_dns_tcp(server: Dns):
    async def handler(reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    (n,) = struct.unpack("!H", await reader.readexactly(2))
                    wire = await reader.readexactly(n)
                except asyncio.IncompleteReadError:
                    return
                reply = server.answer(wire, "tcp", peer)
                if reply is None:
                    return
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return handler


# ---------------------------------------------------------------- main


def _listen_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(directory: str) -> None:
    loop = asyncio.get_running_loop()
    log = EventLog(os.path.join(directory, "events.jsonl"))

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem"))
    https = Http(log, os.path.join(directory, "docroot"), tls)
    tls.sni_callback = lambda obj, name, ctx: https.sni.__setitem__(id(obj), name)
    http = Http(log, os.path.join(directory, "docroot"), None)
    dns_server = Dns(log)

    servers = []
    # Wildcard dual-stack listeners: every world address serves these ports.
    for port, handler, ctx in (
        (PORT_HTTP, http.handle, None),
        (PORT_HTTP_ALT, http.handle, None),
        (PORT_HTTPS, https.handle, tls),
        (PORT_ECHO, tcp_echo, None),
        (PORT_CLOSE_AFTER_WRITE, make_close_after_write(log), None),
    ):
        servers.append(
            await asyncio.start_server(handler, sock=_listen_tcp("::", port), ssl=ctx, limit=1 << 20)
        )
    for host in (DNS_V4, DNS_V6):
        servers.append(await asyncio.start_server(make_dns_tcp(dns_server), sock=_listen_tcp(host, PORT_DNS)))
        await loop.create_datagram_endpoint(lambda: DnsUdp(dns_server), local_addr=(host, PORT_DNS))
    # UDP echo per address, so that replies leave from the address they were sent to.
    for host in (*V4_ADDRESSES, *V6_ADDRESSES):
        await loop.create_datagram_endpoint(UdpEcho, local_addr=(host, PORT_ECHO))

    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    def reply(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "pid": os.getpid()})
    while line := await stdin.readline():
        try:
            cmd = json.loads(line)
            if cmd["op"] == "add_record":
                dns_server.add(cmd["name"], cmd["type"], cmd["value"])
            elif cmd["op"] != "ping":
                raise ValueError(f"unknown op {cmd['op']!r}")
            reply({"ok": True})
        except Exception as exc:  # report to the test, keep serving
            reply({"ok": False, "error": repr(exc)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--no-mount-ns", action="store_true")
    parser.add_argument("--extra-mounts", type=int, default=0)
    args = parser.parse_args()

    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != args.parent:
        sys.exit("world: parent already gone")
    try:
        resolv = None if args.no_mount_ns else os.path.join(args.dir, "resolv.conf")
        enter_namespaces(resolv, args.extra_mounts)
        configure_lo()
        asyncio.run(serve(args.dir))
    except OSError as exc:
        sys.stdout.write(json.dumps({"ready": False, "error": str(exc)}) + "\n")
        sys.stdout.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
