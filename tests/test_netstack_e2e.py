"""End to end: a real sandbox namespace with tap0, the Go netstack driven by
trio, real servers in the test world (tests/world.py).

This file is three things:
- the pytest tests (run in the host namespace, as the unprivileged user);
- ``--scenario MODE``: run inside the world by the tests; it starts the
  sandbox agent, opens the netstack on its TAP fd (direct or pump), answers
  verdicts and DNS, drives clients inside the sandbox and prints one JSON
  object with what it observed;
- ``--agent``: the "sandbox", started with ``unshare -Urn``: creates tap0
  (10.0.2.100/24, fd00::100/64, default routes via 10.0.2.2 / fd00::2), sends
  its fd back over SCM_RIGHTS, then runs client snippets on request.

Nothing here talks to a real address: the scenario runs in the world, where
only documentation addresses exist.
"""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from corral.world import addresses as W  # noqa: E402  (constants only)

UNREACHABLE_V4 = "192.0.2.1"
SANDBOX_PORT = 8000
POLICY_TIMEOUT = 0.5
UDP_IDLE = 1.0
FILTERED_UDP_PORT = 9999  # pump filter drops egress UDP to this port
ALLOWED = {W.ECHO_V4, W.ECHO_V6, W.HTTP_V4, UNREACHABLE_V4, "10.0.2.2"}
SILENT = W.OTHER_V4[1]  # policy never answers: policy-timeout


# --------------------------------------------------------------------------- agent

def agent_main(sock_fd, vnet_hdr):
    import fcntl
    import struct

    from pyroute2 import IPRoute

    sock = socket.socket(fileno=sock_fd)
    for path, value in (("/proc/sys/net/ipv6/conf/default/accept_dad", "0"),):
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError:
            pass
    tun = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    # IFF_TAP | IFF_NO_PI, and IFF_VNET_HDR as corral.launch.TAP asks.
    flags = 0x0002 | 0x1000 | (0x4000 if vnet_hdr else 0)
    fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH", b"tap0", flags))  # TUNSETIFF
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        idx = ipr.link_lookup(ifname="tap0")[0]
        ipr.link("set", index=idx, mtu=65520, txqlen=10000)
        ipr.addr("add", index=idx, address="10.0.2.100", prefixlen=24)
        ipr.addr("add", index=idx, address="fd00::100", prefixlen=64, flags=0x02)  # NODAD
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway="10.0.2.2")
        ipr.route("add", dst="::/0", gateway="fd00::2", family=socket.AF_INET6)
    socket.send_fds(sock, [b"tap"], [tun])
    os.close(tun)
    lock = threading.Lock()
    f = sock.makefile("rb")

    def run(req):
        scope = {}
        try:
            exec(req["code"], scope)
            result = {"ok": scope["main"]()}
        except Exception as exc:  # reported to the scenario, which asserts
            result = {"error": type(exc).__name__, "errno": getattr(exc, "errno", None), "text": str(exc)}
        result["id"] = req["id"]
        with lock:
            sock.sendall(json.dumps(result).encode() + b"\n")

    for line in f:
        threading.Thread(target=run, args=(json.loads(line),), daemon=True).start()


# ------------------------------------------------------------------------ clients
# Snippets run in the sandbox; each defines main() returning JSON data.

def tcp_echo(ip, port, data=b"hello corral", family="AF_INET"):
    return f"""
import socket, time
def main():
    s = socket.socket(socket.{family}, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(({ip!r}, {port}))
    s.sendall({data!r})
    s.shutdown(socket.SHUT_WR)          # our FIN must reach the server...
    got = b""
    while True:
        b = s.recv(65536)
        if not b: break                  # ...and the server's FIN must reach us
        got += b
    s.close()
    return got.decode()
"""


def tcp_connect_error(ip, port, family="AF_INET"):
    return f"""
import socket, time
def main():
    s = socket.socket(socket.{family}, socket.SOCK_STREAM)
    s.settimeout(8)
    t = time.monotonic()
    try:
        s.connect(({ip!r}, {port}))
        return {{"connected": True, "elapsed": time.monotonic() - t}}
    except OSError as e:
        return {{"errno": e.errno, "elapsed": time.monotonic() - t, "error": type(e).__name__}}
"""


TCP_SERVER_CLOSES = f"""
import socket
def main():
    s = socket.create_connection(({W.ECHO_V4!r}, {W.PORT_CLOSE_AFTER_WRITE}), timeout=5)
    got = b""
    while True:
        b = s.recv(65536)
        if not b: break
        got += b
    s.sendall(b"still writable after the server's FIN")
    s.close()
    return got.decode()
"""


def udp_echo(ip, port, family="AF_INET"):
    return f"""
import socket
def main():
    s = socket.socket(socket.{family}, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect(({ip!r}, {port}))
    s.send(b"ping udp")
    try:
        return {{"reply": s.recv(65536).decode()}}
    except OSError as e:
        return {{"errno": e.errno, "error": type(e).__name__}}
"""


def dns_query(transport, server="10.0.2.3"):
    return f"""
import dns.message, dns.query
def main():
    q = dns.message.make_query("www.corral.test", "A")
    r = dns.query.{transport}(q, {server!r}, timeout=3)
    return [rr.to_text() for rrset in r.answer for rr in rrset]
"""


SANDBOX_SERVER = f"""
import socket, threading
def main():
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", {SANDBOX_PORT}))
    ls.listen()
    def serve():
        c, _ = ls.accept()
        data = c.recv(1024)
        c.sendall(b"sandbox says: " + data)
        c.close()
    threading.Thread(target=serve, daemon=True).start()
    return True
"""


# ----------------------------------------------------------------------- scenario

def start_agent(vnet_hdr=True):
    """Start the sandbox agent; returns (agent process, control socket, TAP fd)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    agent = subprocess.Popen(
        ["unshare", "-Urn", sys.executable, os.path.abspath(__file__), "--agent", str(child.fileno()),
         "vnet" if vnet_hdr else "plain"],
        pass_fds=[child.fileno()],
    )
    child.close()
    _, fds, _, _ = socket.recv_fds(parent, 16, 1)
    return agent, parent, fds[0]


def scenario_main(variant):
    # "pump-plain": a TAP without IFF_VNET_HDR (the pump handles both kinds).
    mode = variant.split("-")[0]
    # Start the sandbox before the Go runtime is loaded: no fork after Go.
    agent, parent, tap_fd = start_agent(vnet_hdr=not variant.endswith("-plain"))

    import dns.message
    import dns.rrset
    import trio

    from corral.net.netstack import FlowVerdict, Netstack
    from corral.net.pump import run_pump

    out = {"mode": mode, "variant": variant, "events": [], "dns": [], "filter_seen": 0}
    pending_calls = {}
    next_id = [0]

    def decide(ev):
        ip = str(ev.dst[0])
        if ip == SILENT:
            return None
        if ip == "10.0.2.2" and ev.dst[1] == 7:
            return FlowVerdict(id=ev.id, allow=True, dial=(W.ECHO_V4, W.PORT_ECHO))
        return FlowVerdict(id=ev.id, allow=ip in ALLOWED)

    def answer_dns(ev):
        q = dns.message.from_wire(ev.payload)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", W.HTTP_V4))
        out["dns"].append({"proto": ev.proto, "qname": q.question[0].name.to_text()})
        return r.to_wire()

    def on_packet(pkt):
        out["filter_seen"] += 1
        return not (pkt.direction == "egress" and pkt.proto == 17 and pkt.dport == FILTERED_UDP_PORT)

    async def main():
        ns = Netstack.open(tap_fd, mode=mode, policy_timeout=POLICY_TIMEOUT, udp_idle_timeout=UDP_IDLE)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent))
        buf = bytearray()
        send_lock = trio.Lock()

        async def reader():
            nonlocal buf
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf = bytearray(rest)
                    msg = json.loads(line)
                    pending_calls.pop(msg["id"]).send_nowait(msg)

        async def call(code):
            next_id[0] += 1
            call_id = next_id[0]
            send, recv = trio.open_memory_channel(1)
            pending_calls[call_id] = send
            async with send_lock:
                await stream.send_all(json.dumps({"id": call_id, "code": code}).encode() + b"\n")
            with trio.fail_after(20):
                return await recv.receive()

        async def policy():
            while True:
                events = await ns.wait_events()
                verdicts = []
                for ev in events:
                    out["events"].append({
                        "kind": ev.kind, "id": ev.id, "proto": ev.proto, "dst": str(ev.dst[0]),
                        "dport": ev.dst[1], "reason": ev.reason, "decided": ev.decided,
                        "inbound": ev.inbound, "bytes_out": ev.bytes_out, "bytes_in": ev.bytes_in})
                    if ev.kind == "new_flow" and not ev.decided:
                        v = decide(ev)
                        if v is not None:
                            verdicts.append(v)
                    elif ev.kind == "dns_query":
                        ns.dns_reply(ev.id, answer_dns(ev))
                ns.set_verdicts(verdicts)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(policy)
            pump = None
            if mode == "pump":
                pump = await nursery.start(run_pump, ns, tap_fd, on_packet)
            checks = {
                "tcp_echo_v4": tcp_echo(W.ECHO_V4, W.PORT_ECHO),
                "tcp_echo_v6": tcp_echo(W.ECHO_V6, W.PORT_ECHO, family="AF_INET6"),
                "tcp_server_fin": TCP_SERVER_CLOSES,
                "tcp_gateway_mapped": tcp_echo("10.0.2.2", 7),
                "tcp_denied": tcp_connect_error(W.OTHER_V4[0], 80),
                "tcp_refused": tcp_connect_error(W.ECHO_V4, W.PORT_CLOSED),
                "tcp_unreachable": tcp_connect_error(UNREACHABLE_V4, 80),
                "tcp_policy_timeout": tcp_connect_error(SILENT, 80),
                "udp_echo_v4": udp_echo(W.ECHO_V4, W.PORT_ECHO),
                "udp_echo_v6": udp_echo(W.ECHO_V6, W.PORT_ECHO, family="AF_INET6"),
                "udp_denied": udp_echo(W.OTHER_V4[0], W.PORT_ECHO),
                "dns_udp": dns_query("udp"),
                "dns_tcp": dns_query("tcp"),
                "sandbox_server": SANDBOX_SERVER,
            }
            # Sent on every path: only the pump's filter may drop it.
            checks["udp_filtered"] = udp_echo(W.ECHO_V4, FILTERED_UDP_PORT)
            results = {}

            async def one(name, code):
                results[name] = await call(code)

            async with trio.open_nursery() as clients:
                for name, code in checks.items():
                    clients.start_soon(one, name, code)
            out["results"] = results

            port = ns.publish("tcp", "127.0.0.1", 0, SANDBOX_PORT)
            s = trio.socket.socket()
            await s.connect(("127.0.0.1", port))
            await s.send(b"published")
            got = b""
            with trio.fail_after(5):
                while True:
                    b = await s.recv(1024)
                    if not b:
                        break
                    got += b
            s.close()
            out["publish"] = got.decode()

            # Every flow must end: UDP ones by the idle timeout.
            with trio.move_on_after(UDP_IDLE * 4 + 3):
                while ns.stats()["flows_open"]:
                    await trio.sleep(0.1)
            await trio.sleep(0.2)  # let the policy task record the last events
            out["stats"] = ns.stats()
            if pump is not None:
                out["pump"] = {"dropped_in": pump.dropped_in, "frames_in": pump.frames_in,
                               "frames_out": pump.frames_out}
            nursery.cancel_scope.cancel()
        ns.close()

    trio.run(main)
    parent.close()
    agent.wait(timeout=10)
    json.dump(out, sys.stdout)


# -------------------------------------------------------------------------- tests

pytestmark = [pytest.mark.namespaces, pytest.mark.network]


def _run(world, mode):
    env = dict(os.environ, PYTHONPATH=HERE)
    proc = world.run([sys.executable, __file__, "--scenario", mode], capture_output=True, timeout=90, env=env)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module", params=["direct", "pump", "pump-plain"])
def observed(request, world):
    return _run(world, request.param)


def test_tcp_allowed_echo_with_half_close_both_ways(observed):
    r = observed["results"]
    assert r["tcp_echo_v4"] == {"ok": "hello corral", "id": r["tcp_echo_v4"]["id"]}
    assert r["tcp_echo_v6"]["ok"] == "hello corral"
    # The server's FIN arrives, and the client can still write afterwards.
    assert r["tcp_server_fin"]["ok"] == W.CLOSE_AFTER_WRITE_MESSAGE.decode()


def test_gateway_port_mapped_by_dial_override(observed):
    assert observed["results"]["tcp_gateway_mapped"]["ok"] == "hello corral"


@pytest.mark.parametrize("check", ["tcp_denied", "tcp_refused"])
def test_denied_and_refused_are_an_immediate_rst(observed, check):
    res = observed["results"][check]["ok"]
    assert res["error"] == "ConnectionRefusedError", res
    assert res["elapsed"] < 0.4, res


def test_unreachable_is_an_icmp_error(observed):
    res = observed["results"]["tcp_unreachable"]["ok"]
    assert res["errno"] == 113, res  # EHOSTUNREACH, from our ICMP host unreachable
    assert res["elapsed"] < 1.0, res


def test_policy_timeout_is_a_deny(observed):
    res = observed["results"]["tcp_policy_timeout"]["ok"]
    assert res["error"] == "ConnectionRefusedError", res
    assert POLICY_TIMEOUT * 0.8 < res["elapsed"] < POLICY_TIMEOUT + 1.0, res
    closes = [e for e in observed["events"] if e["kind"] == "flow_closed" and e["dst"] == SILENT]
    assert closes and all(e["reason"] == "policy-timeout" for e in closes)


def test_udp_allow_deny_and_ipv6(observed):
    r = observed["results"]
    assert r["udp_echo_v4"]["ok"] == {"reply": "ping udp"}
    assert r["udp_echo_v6"]["ok"] == {"reply": "ping udp"}
    # Denied: ICMP port unreachable -> ECONNREFUSED on the connected socket.
    assert r["udp_denied"]["ok"]["error"] == "ConnectionRefusedError", r["udp_denied"]


def test_dns_delivered_and_answered_over_udp_and_tcp(observed):
    r = observed["results"]
    assert r["dns_udp"]["ok"] == [W.HTTP_V4]
    assert r["dns_tcp"]["ok"] == [W.HTTP_V4]
    assert sorted(q["proto"] for q in observed["dns"]) == ["tcp", "udp"]
    # DNS to 10.0.2.3 is carried to Python, never a forwarded flow.
    assert not [e for e in observed["events"] if e["dst"] == "10.0.2.3" and e["kind"] == "new_flow"]


def test_publish_reaches_the_sandbox(observed):
    assert observed["publish"] == "sandbox says: published"
    inbound = [e for e in observed["events"] if e["inbound"]]
    assert {e["kind"] for e in inbound} == {"new_flow", "flow_closed"}


def test_every_flow_has_one_open_and_one_close(observed):
    opens = [e for e in observed["events"] if e["kind"] == "new_flow"]
    closes = [e for e in observed["events"] if e["kind"] == "flow_closed"]
    assert sorted(e["id"] for e in opens) == sorted(e["id"] for e in closes)
    assert len({e["id"] for e in closes}) == len(closes)
    assert observed["stats"]["flows_open"] == 0 and observed["stats"]["pending"] == 0
    by_reason = {}
    for e in closes:
        by_reason.setdefault((e["dst"], e["dport"], e["proto"]), set()).add(e["reason"])
    assert by_reason[(W.OTHER_V4[0], 80, "tcp")] == {"denied"}
    assert by_reason[(W.ECHO_V4, W.PORT_CLOSED, "tcp")] == {"refused"}
    assert by_reason[(UNREACHABLE_V4, 80, "tcp")] == {"unreachable"}
    assert by_reason[(W.ECHO_V4, W.PORT_ECHO, "udp")] == {"idle"}
    echo = [e for e in closes if e["dst"] == W.ECHO_V4 and e["dport"] == W.PORT_ECHO and e["proto"] == "tcp"]
    assert echo and all(e["bytes_out"] == e["bytes_in"] == len(b"hello corral") for e in echo)


def test_pump_filter_drops_packets(observed):
    flows = [e for e in observed["events"] if e["dport"] == FILTERED_UDP_PORT]
    if observed["mode"] != "pump":
        # No filter on the direct path: the same datagram becomes a flow.
        assert flows
        return
    assert observed["results"]["udp_filtered"]["ok"] == {"error": "TimeoutError", "errno": None}
    assert observed["pump"]["dropped_in"] >= 1
    assert observed["filter_seen"] > 10
    # The dropped datagram never reached the stack: no flow for it.
    assert not flows


def plain_direct_main():
    """The direct path refuses a TAP without a virtio-net header."""
    agent, parent, tap_fd = start_agent(vnet_hdr=False)
    from corral.errors import NetstackError
    from corral.net.netstack import Netstack

    try:
        Netstack.open(tap_fd, mode="direct").close()
        print("opened")
    except NetstackError as exc:
        print("refused:", exc)
    parent.close()
    agent.wait(timeout=10)


def test_direct_path_refuses_a_tap_without_vnet_header(world):
    env = dict(os.environ, PYTHONPATH=HERE)
    proc = world.run([sys.executable, __file__, "--plain-direct"], capture_output=True, text=True,
                     timeout=60, env=env)
    assert proc.stdout.startswith("refused:") and "IFF_VNET_HDR" in proc.stdout, proc.stderr[-2000:]


if __name__ == "__main__":
    if sys.argv[1] == "--agent":
        agent_main(int(sys.argv[2]), sys.argv[3] == "vnet")
    elif sys.argv[1] == "--scenario":
        scenario_main(sys.argv[2])
    elif sys.argv[1] == "--plain-direct":
        plain_direct_main()

