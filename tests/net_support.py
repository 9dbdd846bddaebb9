"""Helpers for the user-level network tests (tests/test_net_*.py).

The tests run `corral run ... -- python net_probe.py PROBES` *inside* the world (so
corral's upstream is the world), read the probe results from the command's stdout and
the `--events FILE` JSON lines, and check the world's own logs for what reached it.
"""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import attrs

HERE = Path(__file__).resolve().parent
PROBE = str(HERE / "net_probe.py")
PY = sys.executable
RUN_TIMEOUT = 60
IMMEDIATE = 0.5  # seconds: "refused at once", far below any connect/DNS timeout


def token():
    return uuid.uuid4().hex[:12]


@attrs.frozen
class Outcome:
    proc: subprocess.CompletedProcess
    events: list
    results: list | None = None

    def connects(self, **match):
        return [e for e in self.events if e["type"] == "connect" and _matches(e, match)]

    def dns(self, **match):
        return [e for e in self.events if e["type"] == "dns" and _matches(e, match)]

    def of_type(self, kind):
        return [e for e in self.events if e["type"] == kind]

    def connect(self, **match):
        """The single connect event matching ``match`` (asserts there is exactly one)."""
        found = self.connects(**match)
        assert len(found) == 1, f"expected one connect event {match}, got {found}\n{self.dump()}"
        return found[0]

    def closes_of(self, flow_id):
        return [e for e in self.events if e["type"] == "close" and e["id"] == flow_id]

    def dump(self):
        return "events:\n" + "\n".join(json.dumps(e) for e in self.events) + (
            f"\nstdout: {self.proc.stdout!r}\nstderr: {self.proc.stderr!r}")


def _matches(event, match):
    return all(event.get(k) == v for k, v in match.items())


def read_events(path):
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def corral_argv(options, argv):
    return [PY, "-m", "corral", "run", *options, "--", *argv]


def corral(world, tmpdir, options, argv, *, timeout=RUN_TIMEOUT, text=True, **kw):
    """Run `corral run OPTIONS --events F -- ARGV` in the world; return an Outcome."""
    events = Path(tmpdir) / f"events-{token()}.jsonl"
    proc = world.run(corral_argv([*options, "--events", str(events)], argv),
                     capture_output=True, text=text, timeout=timeout, cwd=str(HERE), **kw)
    return Outcome(proc=proc, events=read_events(events))


def probe(world, tmpdir, options, probes, **kw):
    """Run net_probe.py PROBES in a sandbox; Outcome.results has one dict per probe."""
    out = corral(world, tmpdir, options, [PY, PROBE, json.dumps(probes)], **kw)
    lines = out.proc.stdout.strip().splitlines()
    assert out.proc.returncode == 0 and lines, (
        f"probe run failed: rc={out.proc.returncode}\n{out.dump()}")
    return attrs.evolve(out, results=json.loads(lines[-1]))


def curl(*args, max_time=5):
    return {"op": "sh", "argv": ["curl", "-sS", "-m", str(max_time), *args]}


def http_requests_with(world, path):
    return [r for r in world.http_requests() if r["path"] == path]


def dns_queries_for(world, name):
    name = name.rstrip(".").lower() + "."
    return [q for q in world.dns_queries() if q["qname"] == name]


def host_loopback_server(world, tmpdir, port, *, family="4"):
    """A TCP server on the world's own 127.0.0.1:PORT (or [::1]) that answers
    'hello from host loopback PORT' and logs each connection to a file.
    Returns (Popen, log_path) once it listens."""
    log = Path(tmpdir) / f"hostport-{port}-{token()}.log"
    host = "127.0.0.1" if family == "4" else "::1"
    code = f"""
import socket, sys
fam = socket.AF_INET if {family!r} == "4" else socket.AF_INET6
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(({host!r}, {port}))
s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    with open({str(log)!r}, "a") as f:
        f.write(repr(peer) + "\\n")
    c.settimeout(5)
    try:
        c.recv(65536)
        c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 31\\r\\n\\r\\nhello from host loopback {port:5d}\\n")
    except OSError:
        pass
    c.close()
"""
    proc = world.popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "listening", f"host loopback server did not start: {line!r}"
    log.touch()
    return proc, log

