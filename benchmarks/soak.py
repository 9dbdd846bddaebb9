"""Load/soak of the direct path (issue 5, item 6): a benchmark, not a CI test.

1. ``concurrent``: the sandbox holds N (default 10,000) TCP connections open at once
   through corral to the test world's echo server, each one echoed, then closes them.
2. ``storm-rules`` / ``storm-callback``: a connection storm for D seconds (default 60):
   C workers connect, send, read the echo, close, again and again; once decided by an
   ``--allow`` rule, once by a Python ``on_connect`` callback (``--policy``).
3. ``floods``: for D seconds, a DNS query flood, a UDP flood to new 4-tuples and a TCP
   connection flood at once, with no options (issue 14): the supervisor's RSS peak and its growth (least-squares
   slope over the second half, MiB/s), the events by type and the ``limit`` records.
   The CI test (tests/test_floods.py) runs the same client and asserts the ceiling.

For each run: zero lost events (every connection the client made has one ``connect``
event, and every connect has its ``close``), the supervisor's RSS and fd count at the
start (baseline, sandbox idle), at the peak and after the load (sandbox idle again).

    python benchmarks/soak.py                       # everything, full size
    python benchmarks/soak.py --conns 2000 --duration 10

Needs ``ulimit -n`` well above N for the supervisor, the client and the echo server:
the script raises its soft limit to the hard limit (children inherit it) and refuses
to run N connections with a hard limit below N + 1024.  Everything runs inside the
test world (tests/world.py): documentation addresses only, no real network.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CLIENT = textwrap.dedent(r"""
    import json, os, selectors, socket, sys, time
    mode, host, port, n, dur, conc, go = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
        int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), sys.argv[7])
    def wait_file(path):
        while not os.path.exists(path):
            time.sleep(0.01)
    print("ready", flush=True)
    wait_file(go + ".start")
    out = {"attempted": 0, "ok": 0, "failed": 0}
    if mode == "concurrent":
        socks, t = [], time.monotonic()
        for i in range(n):
            out["attempted"] += 1
            try:
                s = socket.create_connection((host, port), timeout=10)
                s.sendall(b"x")
                assert s.recv(1) == b"x"
                socks.append(s)
            except OSError as e:
                out["failed"] += 1
                out["error"] = repr(e)
        out["held"] = len(socks)
        out["open_s"] = time.monotonic() - t
        open(go + ".held", "w").close()
        wait_file(go + ".release")
        for s in socks:
            s.close()
        out["ok"] = len(socks)
    else:
        sel = selectors.DefaultSelector()
        end = time.monotonic() + dur
        def start():
            s = socket.socket(); s.setblocking(False)
            s.connect_ex((host, port)); out["attempted"] += 1
            sel.register(s, selectors.EVENT_WRITE, "connecting")
        for _ in range(conc):
            start()
        while sel.get_map():
            for key, _ in sel.select(timeout=5):
                s = key.fileobj
                try:
                    if key.data == "connecting":
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, os.strerror(err))
                        s.send(b"x")
                        sel.modify(s, selectors.EVENT_READ, "reading")
                        continue
                    if s.recv(1) != b"x":
                        raise OSError("short echo")
                    out["ok"] += 1
                except OSError as e:
                    out["failed"] += 1
                    out["error"] = repr(e)
                sel.unregister(s); s.close()
                if time.monotonic() < end:
                    start()
        out["seconds"] = dur
    open(go + ".done", "w").close()
    wait_file(go + ".exit")
    print(json.dumps(out), flush=True)
""")

POLICY = """
import corral
async def on_connect(req):
    return corral.ALLOW if req.dst_port == {port} else corral.deny("not the echo port")
"""


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"soak: {path.name} did not appear within {timeout} s")
        time.sleep(0.05)


def run_one(world, name: str, options: list[str], client_args: list[str], tmp: Path,
            settle: float) -> dict:
    from corral.world import ECHO_V4, PORT_ECHO

    events = tmp / f"{name}.jsonl"
    go = tmp / name
    argv = [sys.executable, "-m", "corral", "run", "--rw", str(tmp), "--events", str(events),
            *options, "--", sys.executable, "-c", CLIENT, client_args[0], ECHO_V4, str(PORT_ECHO),
            *client_args[1:], str(go)]
    proc = world.popen(argv, cwd=str(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    time.sleep(settle)
    pid = proc.pid  # nsenter execs: this is the supervisor
    base = {"rss_kib": proc_rss_kib(pid), "fds": proc_fds(pid)}
    peak_rss, peak_fds = base["rss_kib"], base["fds"]
    (go.parent / (go.name + ".start")).touch()
    marks = [".held", ".done"] if client_args[0] == "concurrent" else [".done"]
    t0 = time.monotonic()
    for mark in marks:
        target = go.parent / (go.name + mark)
        deadline = time.monotonic() + 900
        while not target.exists():
            assert time.monotonic() < deadline, f"{name}: no {mark}"
            peak_rss = max(peak_rss, proc_rss_kib(pid))
            peak_fds = max(peak_fds, proc_fds(pid))
            time.sleep(0.2)
        if mark == ".held":
            held_fds = proc_fds(pid)
            (go.parent / (go.name + ".release")).touch()
    elapsed = time.monotonic() - t0
    time.sleep(settle)  # flows closed; sandbox idle again
    after = {"rss_kib": proc_rss_kib(pid), "fds": proc_fds(pid)}
    (go.parent / (go.name + ".exit")).touch()
    out, err = proc.communicate(timeout=120)
    client = json.loads(out.strip().splitlines()[-1])
    evs = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    connects = {e["id"] for e in evs if e["type"] == "connect" and e["dst_port"] == PORT_ECHO}
    allowed = {e["id"] for e in evs if e["type"] == "connect" and e["verdict"] == "allow"}
    closes = [e["id"] for e in evs if e["type"] == "close"]
    res = {
        "run": name, "exit_code": proc.returncode, "client": client,
        "elapsed_s": round(elapsed, 1),
        "conns_per_s": round(client["ok"] / elapsed) if elapsed else None,
        "connect_events": len(connects), "allowed": len(allowed),
        "close_events": len(closes), "duplicate_closes": len(closes) - len(set(closes)),
        "lost_connect_events": client["attempted"] - len(connects),
        "connects_without_close": len(connects - set(closes)),
        "policy_errors": sum(e["type"] == "policy_error" for e in evs),
        "supervisor": {"baseline": base, "peak": {"rss_kib": peak_rss, "fds": peak_fds},
                       "after": after},
    }
    if client_args[0] == "concurrent":
        res["supervisor"]["fds_while_held"] = held_fds
    return res


def run_floods(world, tmp: Path, duration: float) -> dict:
    from test_floods import FLOOD, slope
    from world import ECHO_V4, PORT_ECHO

    events = tmp / "floods.jsonl"
    proc = world.popen([sys.executable, "-m", "corral", "run", "--events", str(events), "--",
                        sys.executable, "-c", FLOOD, str(duration), ECHO_V4, str(PORT_ECHO)],
                       cwd=str(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "flooding", proc.stderr.read()
    t0, samples = time.monotonic(), []
    while proc.poll() is None:
        samples.append((time.monotonic() - t0, proc_rss_kib(proc.pid) / 1024))
        time.sleep(0.5)
    out, _ = proc.communicate()
    evs = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    by_type: dict[str, int] = {}
    for e in evs:
        by_type[e["type"]] = by_type.get(e["type"], 0) + 1
    return {
        "run": "floods", "exit_code": proc.returncode, "flooder": out.strip().splitlines(),
        "rss_mib": {"baseline": round(samples[0][1], 1), "peak": round(max(r for _, r in samples), 1),
                    "slope_second_half": round(slope([s for s in samples if duration / 2 <= s[0] <= duration]), 3)},
        "seconds_to_exit_after_flood": round(samples[-1][0] - duration, 1),
        "events": by_type, "limits": [e for e in evs if e["type"] == "limit"],
        "ceiling_exceeded": max(r for _, r in samples) > 200,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=10_000, help="concurrent connections")
    ap.add_argument("--duration", type=float, default=60.0, help="storm length, seconds")
    ap.add_argument("--concurrency", type=int, default=32, help="storm workers")
    ap.add_argument("--settle", type=float, default=3.0, help="idle seconds before/after")
    ap.add_argument("--only", choices=["concurrent", "storm-rules", "storm-callback", "floods"])
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.conns + 1024  # per process: the client, the supervisor and the echo server each hold N
    if hard < need:
        print(f"soak: ulimit -n hard limit {hard} < {need} needed for {args.conns} connections. "
              f"Fix: raise it (e.g. `ulimit -Hn {need}` as root or in limits.conf) or use --conns",
              file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from corral.world import PORT_ECHO, World

    results = []
    with World.start() as world, tempfile.TemporaryDirectory(prefix="corral-soak-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)
        policy = tmp / "policy.py"
        policy.write_text(POLICY.format(port=PORT_ECHO))
        from corral.world import ECHO_V4

        rule = ["--allow", f"{ECHO_V4}:{PORT_ECHO}"]
        runs = [
            ("concurrent", rule, ["concurrent", str(args.conns), "0", "1"]),
            ("storm-rules", rule, ["storm", "0", str(args.duration), str(args.concurrency)]),
            ("storm-callback", ["--policy", str(policy)],
             ["storm", "0", str(args.duration), str(args.concurrency)]),
        ]
        for name, options, client in runs:
            if args.only and name != args.only:
                continue
            res = run_one(world, name, options, client, tmp, args.settle)
            print(json.dumps(res), flush=True)
            results.append(res)
        if args.only in (None, "floods"):
            res = run_floods(world, tmp, args.duration)
            print(json.dumps(res), flush=True)
            results.append(res)
    bad = [r["run"] for r in results if r.get("lost_connect_events") or r.get("connects_without_close")
           or r["exit_code"] != 0 or r.get("client", {}).get("failed") or r.get("ceiling_exceeded")]
    if bad:
        print(f"soak: lost events, failures or memory over the ceiling in {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
