"""The test world itself: its servers answer, and nothing outside it is reachable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from world import (
    CLOSE_AFTER_WRITE_MESSAGE,
    DNS_V4,
    DNS_V6,
    ECHO_V4,
    ECHO_V6,
    HELLO_BODY,
    HTTP_V4,
    HTTP_V6,
    OTHER_V4,
    PORT_CLOSE_AFTER_WRITE,
    PORT_CLOSED,
    PORT_ECHO,
    PORT_HTTP_ALT,
    UNREACHABLE_V4,
    UNREACHABLE_V6,
    V4_ADDRESSES,
    V6_ADDRESSES,
    World,
)

pytestmark = pytest.mark.network


def py(world, code: str) -> str:
    """Run Python code inside the world; return its stdout (fails the test on error)."""
    r = world.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_commands_keep_the_callers_uid_and_no_capabilities(world):
    out = py(world, """
        import os
        caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1]
        print(os.getuid(), os.getgid(), int(caps, 16))
    """)
    assert out.split() == [str(os.getuid()), str(os.getgid()), "0"]


def test_lo_carries_only_documentation_addresses(world):
    r = world.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True)
    links = json.loads(r.stdout)
    assert [link["ifname"] for link in links] == ["lo"]
    addrs = {a["local"] for a in links[0]["addr_info"]}
    assert addrs == {"127.0.0.1", "::1", *V4_ADDRESSES, *V6_ADDRESSES}


def test_no_route_leaves_the_world(world):
    r4 = world.run(["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True)
    r6 = world.run(["ip", "-j", "-6", "route", "show", "table", "all"], capture_output=True, text=True, check=True)
    routes = json.loads(r4.stdout) + json.loads(r6.stdout)
    assert routes and {r["dev"] for r in routes} == {"lo"}
    assert not [r for r in routes if r["dst"] == "default"]
    out = py(world, f"""
        import errno, socket
        for family, addr in ((socket.AF_INET, "{UNREACHABLE_V4}"), (socket.AF_INET6, "{UNREACHABLE_V6}")):
            s = socket.socket(family)
            print(errno.errorcode[s.connect_ex((addr, 80))])
            u = socket.socket(family, socket.SOCK_DGRAM)
            try:
                u.sendto(b"x", (addr, 53))
            except OSError as e:
                print(errno.errorcode[e.errno])
    """)
    assert out.split() == ["ENETUNREACH"] * 4


def test_http_v4_v6_and_host_echo(world):
    r = world.run(["curl", "-sS", "-i", f"http://{HTTP_V4}/"], capture_output=True, check=True)
    assert r.stdout.endswith(HELLO_BODY)
    assert f"X-World-Local: {HTTP_V4}:80".encode() in r.stdout
    r = world.run(["curl", "-sS", "-g", f"http://[{HTTP_V6}]:{PORT_HTTP_ALT}/bytes/100000"], capture_output=True, check=True)
    assert r.stdout == (bytes(range(256)) * 400)[:100000]
    r = world.run(["curl", "-sS", "-H", "Host: pypi.org", f"http://{OTHER_V4[0]}/host"], capture_output=True, check=True)
    assert r.stdout == b"pypi.org"
    assert world.http_requests()[-1]["local"] == f"{OTHER_V4[0]}:80"


def test_http_keep_alive_and_upload(world):
    r = world.run(
        ["curl", "-sS", "-w", "%{num_connects}\\n", f"http://{HTTP_V4}/", f"http://{HTTP_V4}/"],
        capture_output=True, check=True,
    )
    assert r.stdout == HELLO_BODY + b"1\n" + HELLO_BODY + b"0\n"  # second request reused it
    r = world.run(
        ["curl", "-sS", "--data-binary", "@-", f"http://{HTTP_V4}/upload"],
        input=b"z" * 300_000, capture_output=True, check=True,
    )
    assert json.loads(r.stdout)["received"] == 300_000


def test_docroot_files(world):
    (world.docroot / "simple").mkdir(exist_ok=True)
    (world.docroot / "simple" / "index.html").write_text("<a href='six/'>six</a>")
    r = world.run(["curl", "-sS", "-f", f"http://{HTTP_V4}/files/simple/index.html"], capture_output=True, check=True)
    assert r.stdout == b"<a href='six/'>six</a>"
    r = world.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{HTTP_V4}/files/../world.py"],
                  capture_output=True, text=True)
    assert r.stdout == "404"


def test_tls_verifies_against_the_world_certificate_and_logs_sni(world):
    r = world.run(["curl", "-sS", "--cacert", str(world.ca_cert), "https://tls.corral.test/host"],
                  capture_output=True, text=True, check=True)
    assert r.stdout == "tls.corral.test"
    assert world.http_requests()[-1]["sni"] == "tls.corral.test"
    r = world.run(["curl", "-sS", "-k", "-g", f"https://[{HTTP_V6}]/"], capture_output=True, check=True)
    assert r.stdout == HELLO_BODY


@pytest.mark.parametrize("server", [DNS_V4, DNS_V6])
def test_dns_records_and_query_log(world, server):
    def dig(*args):
        r = world.run(["dig", "+short", "+time=2", "+tries=1", f"@{server}", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    world.clear_events()
    assert dig("www.corral.test", "A") == [HTTP_V4]
    assert dig("www.corral.test", "AAAA", "+tcp") == [HTTP_V6]
    assert dig("alias.corral.test", "A") == ["www.corral.test.", HTTP_V4]
    assert dig("txt.corral.test", "TXT") == ['"corral', "world", 'says', 'hi"']
    assert dig("v6only.corral.test", "A") == []
    r = world.run(["dig", f"@{server}", "nope.corral.test"], capture_output=True, text=True)
    assert "status: NXDOMAIN" in r.stdout
    seen = [(q["qname"], q["qtype"], q["proto"]) for q in world.dns_queries()]
    assert seen == [
        ("www.corral.test.", "A", "udp"),
        ("www.corral.test.", "AAAA", "tcp"),
        ("alias.corral.test.", "A", "udp"),
        ("txt.corral.test.", "TXT", "udp"),
        ("v6only.corral.test.", "A", "udp"),
        ("nope.corral.test.", "A", "udp"),
    ]


def test_resolv_conf_points_at_the_world_and_records_can_be_added(world):
    world.add_record("added.corral.test", "A", OTHER_V4[1])
    out = py(world, """
        import socket
        print(sorted({a[4][0] for a in socket.getaddrinfo("added.corral.test", 80)}))
        print(sorted({a[4][0] for a in socket.getaddrinfo("www.corral.test", 80)}))
    """)
    assert out.splitlines() == [repr([OTHER_V4[1]]), repr(sorted([HTTP_V4, HTTP_V6]))]
    assert {q["qname"] for q in world.dns_queries()} >= {"added.corral.test.", "www.corral.test."}


def test_udp_echo(world):
    out = py(world, f"""
        import socket
        for family, addr in ((socket.AF_INET, "{ECHO_V4}"), (socket.AF_INET6, "{ECHO_V6}"), (socket.AF_INET, "{OTHER_V4[2]}")):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(5)
            s.connect((addr, {PORT_ECHO}))
            s.send(b"ping " + addr.encode())
            print(s.recv(100).decode())
    """)
    assert out.splitlines() == [f"ping {ECHO_V4}", f"ping {ECHO_V6}", f"ping {OTHER_V4[2]}"]


def test_tcp_echo_half_close_close_after_write_and_refused(world):
    out = py(world, f"""
        import errno, socket
        s = socket.create_connection(("{ECHO_V4}", {PORT_ECHO}), timeout=5)
        s.sendall(b"x" * 100000)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        print(len(got))
        s = socket.create_connection(("{ECHO_V4}", {PORT_CLOSE_AFTER_WRITE}), timeout=5)
        print(repr(s.recv(100)), repr(s.recv(100)))
        s = socket.socket()
        print(errno.errorcode[s.connect_ex(("{HTTP_V4}", {PORT_CLOSED}))])
    """)
    assert out.splitlines() == ["100000", f"{CLOSE_AFTER_WRITE_MESSAGE!r} b''", "ECONNREFUSED"]


def test_world_dies_with_its_owner():
    """SIGKILL of the process that started a world takes the world down."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from world import World
        w = World.start()
        print(w.pid, flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        world_pid = int(owner.stdout.readline())
        os.kill(world_pid, 0)
    finally:
        owner.kill()
        owner.wait(timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{world_pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break  # dead, waiting for init to reap it
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(world_pid, signal.SIGKILL)
        pytest.fail("the world outlived the process that started it")


def test_close_stops_the_world_and_its_children():
    w = World.start()
    child = w.popen(["sleep", "60"])
    pid = w.pid
    w.close()
    assert child.poll() is not None
    assert not w.dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
