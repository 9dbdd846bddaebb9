"""The Python API on the network, end to end (issue 3, items 7-9): ``corral.run`` with
``on_connect`` / ``on_dns`` / ``on_packet``, and ``corral.open_sandbox`` with its live
event stream.

The API drives a sandbox from the calling process, and that process must be inside the
test world (corral's upstream is whatever the supervisor's namespace reaches), so each
test runs a small Python driver in the world that prints one JSON object.
"""

import json
import textwrap

import pytest

from net_support import PROBE, PY, dns_queries_for, token
from world import ECHO_V4, ECHO_V6, HELLO_BODY, OTHER_V4, PORT_ECHO

pytestmark = pytest.mark.network

ECONNREFUSED = 111

PRELUDE = f"""
import json, sys, time
import trio
import corral
PROBE = {PROBE!r}
PY = {PY!r}
def probes(*items):
    return [PY, PROBE, json.dumps(list(items))]
def report(result, **extra):
    lines = result.stdout.decode().strip().splitlines()
    print(json.dumps(dict(
        exit_code=result.exit_code,
        results=json.loads(lines[-1]) if lines else None,
        stderr=result.stderr.decode(),
        events=[e.to_dict() for e in result.events],
        **extra)))
"""


def drive(world, code, timeout=60):
    proc = world.run([PY, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True,
                     text=True, timeout=timeout)
    assert proc.returncode == 0 and proc.stdout.strip(), (proc.returncode, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def connect_events(out, **match):
    return [e for e in out["events"] if e["type"] == "connect"
            and all(e.get(k) == v for k, v in match.items())]


def test_callbacks_decide_unmatched_flows_and_queries(world):
    tok = token()
    out = drive(world, f"""
        seen = []
        async def on_connect(req):
            seen.append((str(req.dst_ip), req.dst_port, req.proto, list(req.names)))
            if req.dst_port == {PORT_ECHO} and str(req.dst_ip) == "{ECHO_V4}":
                return corral.ALLOW
            if str(req.dst_ip) == "{OTHER_V4[0]}":
                return corral.deny("callback says no")
            if str(req.dst_ip) == "{OTHER_V4[1]}":
                raise ValueError("boom in on_connect")
            if str(req.dst_ip) == "{OTHER_V4[2]}":
                await trio.sleep(10)
            return "not a verdict"

        async def on_dns(query):
            if query.qname.startswith("secret-"):
                return corral.deny("names starting with secret- are private")
            if query.qname.startswith("crash-"):
                raise KeyError(query.qname)
            return corral.ALLOW

        result = corral.run(probes(
            {{"op": "tcp", "host": "{ECHO_V4}", "port": {PORT_ECHO}, "send": "via callback"}},
            {{"op": "tcp", "host": "{OTHER_V4[0]}", "port": 80}},
            {{"op": "tcp", "host": "{OTHER_V4[1]}", "port": 80}},
            {{"op": "tcp", "host": "{OTHER_V4[2]}", "port": 80, "timeout": 5}},
            {{"op": "tcp", "host": "{ECHO_V6}", "port": 80}},
            {{"op": "sh", "argv": ["dig", "+time=2", "+tries=1", "secret-{tok}.corral.test"]}},
            {{"op": "sh", "argv": ["dig", "+time=2", "+tries=1", "crash-{tok}.corral.test"]}},
            {{"op": "sh", "argv": ["dig", "+short", "+time=2", "+tries=1", "www.corral.test"]}},
            {{"op": "tcp", "host": "{ECHO_V4}", "port": 80}},
        ), capture_output=True, on_connect=on_connect, on_dns=on_dns, policy_timeout=0.5,
           deny=["{ECHO_V4}:80"])
        report(result, seen=seen)
    """)
    assert out["exit_code"] == 0, out["stderr"]
    r = out["results"]
    assert r[0]["ok"] and r[0]["data"] == "via callback", r[0]
    (ev,) = connect_events(out, dst_ip=ECHO_V4, dst_port=PORT_ECHO)
    assert (ev["verdict"], ev["rule"]) == ("allow", "callback")
    # deny with a reason: refused at once, the reason in the event
    assert r[1]["errno"] == ECONNREFUSED and r[1]["elapsed"] < 0.5, r[1]
    (ev,) = connect_events(out, dst_ip=OTHER_V4[0])
    assert (ev["verdict"], ev["rule"], ev["reason"]) == ("deny", "callback", "callback says no")
    # raising: deny + policy_error
    assert r[2]["errno"] == ECONNREFUSED and r[2]["elapsed"] < 0.5, r[2]
    (ev,) = connect_events(out, dst_ip=OTHER_V4[1])
    assert (ev["verdict"], ev["rule"]) == ("deny", "callback-error")
    # slower than policy_timeout: deny after ~0.5 s + policy_error(timed_out)
    assert r[3]["errno"] == ECONNREFUSED and 0.4 < r[3]["elapsed"] < 2.0, r[3]
    (ev,) = connect_events(out, dst_ip=OTHER_V4[2])
    assert (ev["verdict"], ev["rule"]) == ("deny", "callback-error")
    # not a Verdict: deny
    assert r[4]["errno"] == ECONNREFUSED, r[4]
    (ev,) = connect_events(out, dst_ip=ECHO_V6)
    assert (ev["verdict"], ev["rule"]) == ("deny", "callback-error"), ev
    errors = [e for e in out["events"] if e["type"] == "policy_error"]
    kinds = sorted((e["callback"], bool(e["timed_out"])) for e in errors)
    assert kinds.count(("on_connect", False)) >= 1 and ("on_connect", True) in kinds, errors
    assert any("boom in on_connect" in e["error"] for e in errors), errors
    # on_dns: deny with reason, never forwarded; raising = REFUSED + policy_error
    assert "status: REFUSED" in r[5]["out"] and r[5]["elapsed"] < 1.0, r[5]
    dns = [e for e in out["events"] if e["type"] == "dns" and e["qname"].startswith("secret-")]
    assert dns and all((e["verdict"], e["rule"], e["reason"]) ==
                       ("deny", "callback", "names starting with secret- are private") for e in dns)
    assert dns_queries_for(world, f"secret-{tok}.corral.test") == []
    assert "status: REFUSED" in r[6]["out"], r[6]
    assert any(e["callback"] == "on_dns" for e in errors), errors
    assert dns_queries_for(world, f"crash-{tok}.corral.test") == []
    assert r[7]["out"].split() == ["198.51.100.10"], r[7]
    # an explicit rule decides before the callback is asked
    assert r[8]["errno"] == ECONNREFUSED, r[8]
    (ev,) = connect_events(out, dst_ip=ECHO_V4, dst_port=80)
    assert ev["rule"] == f"{ECHO_V4}:80"
    assert [ECHO_V4, 80] not in [s[:2] for s in out["seen"]]
    assert [OTHER_V4[0], 80, "tcp", []] in out["seen"]


def test_on_packet_filter_drops_packets_on_the_pump_path(world):
    out = drive(world, f"""
        dropped = []
        def on_packet(pkt):
            if pkt.direction == "egress" and pkt.proto == 17 and pkt.dport == {PORT_ECHO} \\
                    and str(pkt.dst) == "{ECHO_V4}":
                dropped.append(pkt.length)
                return False
            return True

        result = corral.run(probes(
            {{"op": "udp", "host": "{ECHO_V4}", "port": {PORT_ECHO}, "send": "dropped", "timeout": 1.0}},
            {{"op": "udp", "host": "{ECHO_V6}", "port": {PORT_ECHO}, "send": "passes"}},
            {{"op": "tcp", "host": "{ECHO_V4}", "port": {PORT_ECHO}, "send": "tcp passes"}},
            {{"op": "sh", "argv": ["curl", "-sS", "-m", "5", "http://www.corral.test/"]}},
        ), capture_output=True, on_packet=on_packet,
           allow=["{ECHO_V4}", "{ECHO_V6}", "www.corral.test"])
        report(result, dropped=len(dropped))
    """)
    assert out["exit_code"] == 0, out["stderr"]
    r = out["results"]
    assert r[0]["ok"] is False and r[0]["error"] == "TimeoutError", r[0]
    # the filter ran before the stack: the stack never saw that flow
    assert connect_events(out, dst_ip=ECHO_V4, proto="udp") == []
    assert out["dropped"] >= 1
    assert r[1]["data"] == "passes", r[1]
    assert r[2]["data"] == "tcp passes", r[2]
    assert (r[3]["rc"], r[3]["out"]) == (0, HELLO_BODY.decode()), r[3]


LIVE_CLIENT = f"""
import socket, sys
s = socket.create_connection(("{ECHO_V4}", {PORT_ECHO}), timeout=5)
s.sendall(b"live"); s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode(), flush=True)
sys.stdin.read()
s.close()
"""


def test_open_sandbox_streams_events_live(world):
    """The connect event reaches ``box.events()`` while the command still runs: the
    driver waits for it, then lets the command finish through its stdin."""
    out = drive(world, f"""
        import subprocess
        async def main():
            cmd = [PY, "-c", {LIVE_CLIENT!r}]
            seen = []
            async with corral.open_sandbox(corral.Config(allow=["{ECHO_V4}"])) as box:
                proc = await box.start(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                async for ev in box.events():
                    seen.append(ev.to_dict())
                    if ev.to_dict()["type"] == "connect":
                        running = proc.returncode is None
                        break
                line = await proc.stdout.receive_some(100)
                await proc.stdin.aclose()
                code = await proc.wait()
            with trio.fail_after(5):  # the stream ends with the sandbox
                rest = [e.to_dict() async for e in box.events()]
            print(json.dumps(dict(seen=seen, running=running, line=line.decode(), code=code,
                                  rest=rest)))
        trio.run(main)
    """)
    assert out["running"] is True
    assert out["seen"][-1]["verdict"] == "allow" and out["seen"][-1]["dst_ip"] == ECHO_V4
    assert out["line"].strip() == "live" and out["code"] == 0
    types = [e["type"] for e in out["rest"]]
    # replayed from the start, then the close of that flow and the exit
    assert types[0] == "sandbox_start" and types[-1] == "sandbox_exit", types
    closes = [e for e in out["rest"] if e["type"] == "close"]
    assert [c["id"] for c in closes] == [out["seen"][-1]["id"]], out["rest"]
    assert (closes[0]["bytes_out"], closes[0]["bytes_in"]) == (4, 4), closes
