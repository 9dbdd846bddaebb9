"""Client probes run *inside* a corral sandbox by the tests/test_net_*.py tests.

    python net_probe.py '[{"op": "tcp", "host": "198.51.100.7", "port": 7, "send": "hi"}, ...]'

Runs each probe in order and prints one JSON list with one result per probe on stdout.
Stdlib only (it runs in the sandbox).  Every probe is bounded in time.

ops:
  tcp   connect to host:port; optionally send `send` (or `pieces`, one write each, `pause`
        seconds apart, after `pause_first`), shut down our write side (`shut`), then read
        until EOF.  Result: ok, data (text), elapsed, or error/errno/elapsed.
  tls   HTTPS GET of `path` from host:port naming `server_name`, with the real ClientHello
        (Python's ssl) written in pieces: cut at the offsets in `split`, or one byte per
        write (`bytewise`), `pause` seconds between pieces, after `pause_first`.
  udp   send `send` to host:port, wait up to `timeout` for one datagram back.
  sh    run `argv`; result: rc, out, err, elapsed.
  serve bind TCP `port` (all addresses) and answer `count` connections with `reply`
        after printing {"listening": port} on stderr (for --publish tests); run last.
"""

import json
import socket
import subprocess
import sys
import time


def _family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _pieces(data, split=None, bytewise=False):
    if bytewise:
        return [data[i:i + 1] for i in range(len(data))]
    cuts = [0] + [c for c in (split or []) if 0 < c < len(data)] + [len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


def _send_pieces(s, pieces, pause=0.0, pause_first=0.0):
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one segment per write
    time.sleep(pause_first)
    for i, piece in enumerate(pieces):
        if i and pause:
            time.sleep(pause)
        s.sendall(piece)


def tcp(host, port, send=None, shut=True, timeout=5.0, read=True, pieces=None, pause=0.0, pause_first=0.0):
    t = time.monotonic()
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        connected = time.monotonic() - t
        got = b""
        if pieces is not None:
            _send_pieces(s, [p.encode() for p in pieces], pause, pause_first)
            send = "".join(pieces)
        elif send is not None:
            s.sendall(send.encode())
        if send is not None:
            if shut:
                s.shutdown(socket.SHUT_WR)
        if read:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        return {"ok": True, "data": got.decode("latin-1"), "connect_elapsed": connected,
                "elapsed": time.monotonic() - t, "local": list(s.getsockname()[:2])}
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__, "errno": exc.errno,
                "elapsed": time.monotonic() - t}
    finally:
        s.close()


def tls(host, port, server_name, path="/", cafile=None, split=None, bytewise=False, pause=0.0,
        pause_first=0.0, timeout=5.0):
    import ssl

    t = time.monotonic()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context(cafile=cafile).wrap_bio(inc, out, server_hostname=server_name)
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)

    def receive():
        data = s.recv(65536)
        if not data:
            raise ConnectionAbortedError("the server closed the connection")
        inc.write(data)

    try:
        s.connect((host, port))
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = out.read()
        _send_pieces(s, _pieces(hello, split, bytewise), pause, pause_first)
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out.pending:
                    s.sendall(out.read())
                receive()
        obj.write(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
        s.sendall(out.read())
        body = b""
        while True:
            try:
                chunk = obj.read(65536)
            except ssl.SSLWantReadError:
                try:
                    receive()
                except ConnectionAbortedError:
                    break
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            body += chunk
        return {"ok": True, "data": body.decode("latin-1"), "hello_len": len(hello),
                "elapsed": time.monotonic() - t}
    except (OSError, ssl.SSLError) as exc:
        return {"ok": False, "error": type(exc).__name__, "errno": getattr(exc, "errno", None),
                "elapsed": time.monotonic() - t}
    finally:
        s.close()


def udp(host, port, send="ping", timeout=2.0):
    t = time.monotonic()
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(send.encode(), (host, port))
        data, _ = s.recvfrom(65536)
        return {"ok": True, "data": data.decode("latin-1"), "elapsed": time.monotonic() - t}
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__, "errno": exc.errno,
                "elapsed": time.monotonic() - t}
    finally:
        s.close()


def sh(argv, timeout=20.0):
    t = time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "out": "", "err": "timeout", "elapsed": time.monotonic() - t}
    return {"rc": p.returncode, "out": p.stdout.decode("latin-1"),
            "err": p.stderr.decode("latin-1"), "elapsed": time.monotonic() - t}


def serve(port, reply="hello from inside\n", count=1, timeout=20.0):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(8)
    s.settimeout(timeout)
    sys.stderr.write(json.dumps({"listening": port}) + "\n")
    sys.stderr.flush()
    peers = []
    for _ in range(count):
        conn, peer = s.accept()
        with conn:
            conn.settimeout(timeout)
            request = conn.recv(65536)
            conn.sendall(reply.encode())
            peers.append({"peer": peer[0], "request": request.decode("latin-1")})
    s.close()
    return {"ok": True, "served": peers}


OPS = {"tcp": tcp, "tls": tls, "udp": udp, "sh": sh, "serve": serve}


def main():
    results = []
    for probe in json.loads(sys.argv[1]):
        probe = dict(probe)
        op = OPS[probe.pop("op")]
        results.append(op(**probe))
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
