"""Faults (issue 5, item 4): each one behaves predictably, fails closed, and is logged.

Every sandbox here runs inside the test world (tests/world.py): corral's upstream is the
world, so nothing reaches a real address.  Faults covered:

- the supervisor SIGKILLed while the command uses the filtered network;
- the supervisor SIGSTOPped then SIGCONTed (flows wait, then resume);
- an upstream that resets a connection mid-stream;
- the upstream resolver down (nothing listens / no route): SERVFAIL at once, not a hang;
- a ``--policy`` callback that raises, hangs forever, or is slow;
- the TAP: the command cannot reach its fd or take it down (no capabilities, even with
  ``--root``); taken down from outside, it only cuts the sandbox's own network;
- the scratch dir full (a 1 MiB tmpfs in a private user+mount namespace).
"""

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from net_support import HERE, PY, corral, corral_argv, read_events, token
from world import ECHO_V4, OTHER_V4, PORT_ECHO, UNREACHABLE_V4

pytestmark = pytest.mark.network

ECONNREFUSED = 111
ECONNRESET = 104

# A client that runs inside the sandbox: connect, optionally send, read until EOF or
# error, print one JSON line.  Stdlib only.
CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    host, port, send = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    t = time.monotonic()
    s = socket.create_connection((host, port), timeout=10)
    got = 0
    try:
        s.sendall(send)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        out = {"ok": True, "got": got}
    except OSError as exc:
        out = {"ok": False, "got": got, "errno": exc.errno}
    out["elapsed"] = time.monotonic() - t
    print(json.dumps(out))
""")


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _host_pids_with(marker):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def _closes(events, flow_id):
    return [e for e in events if e["type"] == "close" and e["id"] == flow_id]


# ------------------------------------------------------------------ supervisor signals


def test_supervisor_sigkill_cuts_the_network_and_kills_the_command(world, tmp_path):
    """P dies -> D (pid 1) dies -> the command dies; no flow outlives the supervisor."""
    marker = f"corral-fault-{token()}"
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import socket, time, pathlib
        s = socket.create_connection(("{ECHO_V4}", {PORT_ECHO}), timeout=5)
        s.sendall(b"hi"); assert s.recv(2) == b"hi"
        pathlib.Path("{ready}").touch()
        while True:                      # keeps the flow busy until the sandbox dies
            s.sendall(b"x"); s.recv(1); time.sleep(0.01)
    """)
    proc = world.popen(corral_argv(["--allow", f"{ECHO_V4}:{PORT_ECHO}", "--rw", str(tmp_path)],
                                   [PY, "-c", script, marker]),
                       cwd=str(HERE), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(ready.exists, 30, "the sandboxed client's first echo")
        assert _host_pids_with(marker), "the sandboxed command should be running"
        proc.kill()
        proc.wait()
        t = time.monotonic()
        while _host_pids_with(marker) and time.monotonic() - t < 1.0:
            time.sleep(0.02)
        assert _host_pids_with(marker) == [], "the command survived its supervisor by > 1 s"
    finally:
        proc.kill()
        for pid in _host_pids_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_supervisor_sigstop_then_sigcont_flows_resume(world, tmp_path):
    """While P is stopped the sandbox's connect waits (SYN queued in the TAP); after
    SIGCONT it completes, and both flows have open and close events."""
    first, go, done = tmp_path / "first", tmp_path / "go", tmp_path / "done"
    script = textwrap.dedent(f"""
        import json, socket, time, pathlib
        def echo(msg):
            s = socket.create_connection(("{ECHO_V4}", {PORT_ECHO}), timeout=20)
            s.sendall(msg); s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(100):
                got += chunk
            return got.decode()
        out = [echo(b"before")]
        pathlib.Path("{first}").touch()
        while not pathlib.Path("{go}").exists():
            time.sleep(0.01)
        t = time.monotonic()
        out.append(echo(b"after"))
        out.append(time.monotonic() - t)
        pathlib.Path("{done}").touch()
        print(json.dumps(out))
    """)
    events = tmp_path / "events.jsonl"
    proc = world.popen(corral_argv(["--allow", f"{ECHO_V4}:{PORT_ECHO}", "--rw", str(tmp_path),
                                    "--events", str(events)], [PY, "-c", script]),
                       cwd=str(HERE), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(first.exists, 30, "the first echo")
        os.kill(proc.pid, signal.SIGSTOP)
        go.touch()
        time.sleep(1.0)  # the fault's duration: the second connect must not complete meanwhile
        assert not done.exists(), "a flow completed while the supervisor was stopped"
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
    assert proc.returncode == 0, err
    before, after, elapsed = json.loads(out)
    assert (before, after) == ("before", "after")
    assert elapsed >= 0.9  # it really waited for the supervisor
    evs = read_events(events)
    conns = [e for e in evs if e["type"] == "connect"]
    assert len(conns) == 2 and all(e["verdict"] == "allow" for e in conns), evs
    for c in conns:
        (close,) = _closes(evs, c["id"])
        assert close["bytes_out"] in (6, 5) and close["bytes_in"] == close["bytes_out"], close


# ------------------------------------------------------------------ upstream faults

RST_SERVER = textwrap.dedent("""
    import socket, struct, sys
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port)); ls.listen(8)
    print("listening", flush=True)
    while True:
        c, _ = ls.accept()
        c.sendall(bytes(n))
        c.recv(1)                       # the client's byte: it is reading now
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()                       # linger 0: RST instead of FIN
""")
RST_PORT = 7300
RST_BYTES = 4096


@pytest.fixture(scope="module")
def rst_server(world):
    proc = world.popen([PY, "-c", RST_SERVER, OTHER_V4[2], str(RST_PORT), str(RST_BYTES)],
                       stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    yield (OTHER_V4[2], RST_PORT)
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("data_path", ["direct", "pump"])
def test_upstream_reset_mid_stream_reaches_the_client_as_a_reset(world, tmp_path, rst_server,
                                                                  data_path):
    host, port = rst_server
    out = corral(world, tmp_path, ["--allow", f"{host}:{port}", "--data-path", data_path],
                 [PY, "-c", CLIENT, host, str(port), "x"])
    assert out.proc.returncode == 0, out.dump()
    res = json.loads(out.proc.stdout)
    # The reset is a reset inside too: never a clean EOF that would pass truncated data
    # off as complete.
    assert res["ok"] is False and res["errno"] == ECONNRESET, res
    ev = out.connect(dst_ip=host, dst_port=port)
    (close,) = out.closes_of(ev["id"])
    assert close["reason"] == "reset", out.dump()
    assert close["bytes_out"] == 1 and close["bytes_in"] <= RST_BYTES, close


@pytest.mark.parametrize("upstream", [f"{OTHER_V4[2]}:5399", f"{UNREACHABLE_V4}:53"],
                         ids=["nothing-listens", "no-route"])
def test_resolver_down_answers_servfail_at_once(world, tmp_path, upstream):
    name = f"down-{token()}.corral.test"
    out = corral(world, tmp_path, ["--dns-upstream", upstream, "--allow", name],
                 ["sh", "-c", f"t=$(date +%s%N); dig +time=8 +tries=1 {name}; "
                              "echo elapsed_ms=$(( ($(date +%s%N) - t) / 1000000 ))"])
    assert out.proc.returncode == 0, out.dump()
    assert "status: SERVFAIL" in out.proc.stdout, out.dump()
    elapsed_ms = int(out.proc.stdout.rsplit("elapsed_ms=", 1)[1])
    # The client would wait 8 s; corral's upstream timeout is 2 s and a refused or
    # unroutable upstream fails at once.
    assert elapsed_ms < 3000, out.proc.stdout
    (ev,) = out.dns(qname=name)
    assert (ev["verdict"], ev["rcode"]) == ("allow", "SERVFAIL"), ev


# ------------------------------------------------------------------ policy callbacks

POLICY = """
import trio
import corral

async def on_connect(req):
    ip = str(req.dst_ip)
    if ip == "{raises}":
        raise RuntimeError("policy bug: boom")
    if ip == "{hangs}":
        await trio.sleep_forever()
    if ip == "{slow}":
        await trio.sleep(0.1)          # slow but inside --policy-timeout
        return corral.ALLOW
    return corral.deny("not listed")

async def on_dns(query):
    if query.qname.startswith("hang-"):
        await trio.sleep_forever()
    return corral.ALLOW
"""


def test_policy_file_callbacks_that_raise_hang_or_are_slow(world, tmp_path):
    policy = tmp_path / "policy.py"
    policy.write_text(POLICY.format(raises=OTHER_V4[0], hangs=OTHER_V4[1], slow=ECHO_V4))
    probes = [
        {"op": "tcp", "host": OTHER_V4[0], "port": 80},
        {"op": "tcp", "host": OTHER_V4[1], "port": 80, "timeout": 10},
        {"op": "tcp", "host": ECHO_V4, "port": PORT_ECHO, "send": "slow ok"},
        {"op": "sh", "argv": ["dig", "+time=8", "+tries=1", f"hang-{token()}.corral.test"]},
    ]
    t = time.monotonic()
    out = corral(world, tmp_path, ["--policy", str(policy), "--policy-timeout", "0.3"],
                 [PY, str(HERE / "net_probe.py"), json.dumps(probes)])
    assert out.proc.returncode == 0, out.dump()
    assert time.monotonic() - t < 20
    raises, hangs, slow, dns = json.loads(out.proc.stdout)
    assert raises["errno"] == ECONNREFUSED and raises["elapsed"] < 0.5, raises
    # hangs forever: a deny after --policy-timeout, not a hang
    assert hangs["errno"] == ECONNREFUSED and 0.25 < hangs["elapsed"] < 2.0, hangs
    assert slow["ok"] and slow["data"] == "slow ok", slow
    assert "status: REFUSED" in dns["out"] and dns["elapsed"] < 2.0, dns
    assert out.connect(dst_ip=OTHER_V4[0])["rule"] == "callback-error"
    assert out.connect(dst_ip=OTHER_V4[1])["rule"] == "callback-error"
    assert out.connect(dst_ip=ECHO_V4)["verdict"] == "allow"
    errors = out.of_type("policy_error")
    assert any("boom" in e["error"] and not e["timed_out"] for e in errors), errors
    assert any(e["callback"] == "on_connect" and e["timed_out"] for e in errors), errors
    assert any(e["callback"] == "on_dns" and e["timed_out"] for e in errors), errors
    assert "policy bug: boom" in out.proc.stderr or errors  # logged or evented


# ------------------------------------------------------------------ the TAP goes away


def test_command_cannot_take_its_tap_down_or_reach_the_tap_fd(world, tmp_path):
    """Even with --root the command has no capabilities (no CAP_NET_ADMIN over the sandbox
    netns: RTNETLINK EPERM), and no process inside holds the TAP fd (pid 1 passed it to the
    supervisor and closed it), so the sandbox cannot close or misconfigure its link."""
    script = textwrap.dedent(f"""
        import glob, json, os, socket, subprocess
        def echo():
            try:
                s = socket.create_connection(("{ECHO_V4}", {PORT_ECHO}), timeout=3)
                s.sendall(b"x"); return s.recv(1).decode()
            except OSError as exc:
                return exc.errno
        tun = []
        for fd in glob.glob("/proc/[0-9]*/fd/*"):
            try:
                if os.readlink(fd) == "/dev/net/tun":
                    tun.append(fd)
            except OSError:
                pass
        ip = subprocess.run(["ip", "link", "set", "tap0", "down"], capture_output=True, text=True)
        print(json.dumps([tun, ip.returncode, ip.stderr, echo()]))
    """)
    out = corral(world, tmp_path, ["--root", "--allow", f"{ECHO_V4}:{PORT_ECHO}"],
                 [PY, "-c", script])
    assert out.proc.returncode == 0, out.dump()
    tun, ip_rc, ip_err, after = json.loads(out.proc.stdout)
    assert tun == [], "a process inside the sandbox holds the TAP fd"
    assert ip_rc != 0 and "Operation not permitted" in ip_err, ip_err
    assert after == "x", "the network must keep working"


# setns into the sandbox's user and net namespaces (we own them: same uid, parent ns) and
# take tap0 down with netlink, in-process: an exec'd `ip` would lose the capabilities.
LINK_DOWN = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    for ns, flag in (("user", 0x10000000), ("net", 0x40000000)):
        fd = os.open(f"/proc/{sys.argv[1]}/ns/{ns}", os.O_RDONLY)
        if libc.setns(fd, flag) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="tap0")[0], state="down")
""")


def test_tap_taken_down_under_the_sandbox_fails_closed(world, tmp_path):
    """The link disappearing under a running sandbox only cuts its network: later
    connects fail at once (ENETUNREACH), nothing leaks, the supervisor stays up and
    reports the command's exit status."""
    marker = f"corral-tap-{token()}"
    ready, down = tmp_path / "ready", tmp_path / "down"
    script = textwrap.dedent(f"""
        import json, socket, time, pathlib
        def echo():
            t = time.monotonic()
            try:
                s = socket.create_connection(("{ECHO_V4}", {PORT_ECHO}), timeout=5)
                s.sendall(b"x"); return [s.recv(1).decode(), time.monotonic() - t]
            except OSError as exc:
                return [exc.errno, time.monotonic() - t]
        out = [echo()]
        pathlib.Path("{ready}").touch()
        while not pathlib.Path("{down}").exists():
            time.sleep(0.01)
        out.append(echo())
        print(json.dumps(out))
    """)
    events = tmp_path / "events.jsonl"
    proc = world.popen(corral_argv(["--allow", f"{ECHO_V4}:{PORT_ECHO}", "--rw", str(tmp_path),
                                    "--events", str(events)], [PY, "-c", script, marker]),
                       cwd=str(HERE), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready.exists, 30, "the first echo")
        (pid,) = [p for p in _host_pids_with(marker)  # the command, not corral's own argv
                  if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[1] == b"-c"]
        link = world.run([PY, "-c", LINK_DOWN, str(pid)], capture_output=True, text=True,
                         timeout=30)
        assert link.returncode == 0, link.stderr
        down.touch()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    before, after = json.loads(out)
    assert before[0] == "x"
    assert after[0] == 101 and after[1] < 1.0, after  # ENETUNREACH, at once
    evs = read_events(events)
    assert [e["exit_code"] for e in evs if e["type"] == "sandbox_exit"] == [0]
    assert len([e for e in evs if e["type"] == "connect"]) == 1, evs


# ------------------------------------------------------------------ disk full


def _in_private_tmpfs(tmp_path, size, script):
    """Run ``script`` (sh) as root of a new user+mount ns with a tmpfs of ``size`` on
    ``$SCRATCH`` (= tmp_path/scratch)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    wrapper = f"mount -t tmpfs -o size={size} corral-scratch {scratch} && {script}"
    env = {**os.environ, "SCRATCH": str(scratch), "PY": PY}
    return subprocess.run(["unshare", "-Urm", "sh", "-c", wrapper], capture_output=True,
                          text=True, timeout=60, env=env, cwd=str(tmp_path))


@pytest.mark.namespaces
def test_scratch_dir_full_gives_enospc_inside_and_a_clean_exit(tmp_path):
    proc = _in_private_tmpfs(
        tmp_path, "1m",
        '"$PY" -m corral run --net none --scratch "$SCRATCH" -- sh -c '
        '"dd if=/dev/zero of=/var/tmp/corral-big bs=64k count=64 2>&1; echo dd=\\$?; exit 7"')
    assert proc.returncode == 7, proc.stderr
    assert "No space left on device" in proc.stdout, proc.stdout
    assert "dd=1" in proc.stdout
    assert not Path("/var/tmp/corral-big").exists()


@pytest.mark.namespaces
def test_scratch_dir_without_room_to_start_is_one_clear_error(tmp_path):
    # nr_inodes=1: the tmpfs root takes the only inode, so corral cannot create anything.
    proc = _in_private_tmpfs(
        tmp_path, "1m,nr_inodes=1",
        '"$PY" -m corral run --net none --scratch "$SCRATCH" -- true')
    assert proc.returncode not in (0, 1), (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "corral" in proc.stderr and "scratch" in proc.stderr.lower(), proc.stderr
