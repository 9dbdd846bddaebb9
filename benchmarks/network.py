"""Network side by side: no sandbox, slirp4netns, pasta, mini-tapbox, corral direct/pump.

Run as the unprivileged user:  ``.venv/bin/python benchmarks/network.py [--reps 3]``.

Everything happens inside a test world (tests/world.py): a user+net namespace whose ``lo``
holds documentation addresses, with iperf3 and ``netbench server`` bound on HTTP_V4.  Each
sandbox runs *inside* the world, so no packet can reach a real address.  Per path and
repetition (paths interleaved):

- iperf3 up (client sends) and down (``-R``), Gbit/s, ``-t DURATION -O 1``;
- new connections/s: ``netbench connrate`` — 3000 connections, 32 at a time, each one
  GET and a response read to its Content-Length (mini-tapbox never passes the server's
  FIN on, so a client waiting for EOF would hang);
- 1-byte request/response latency: ``netbench rr`` median over 10,000 round trips, with one
  SCHED_IDLE busy loop per vCPU so that waking an idle vCPU (~80-100 µs here) does not
  dominate (BENCHMARKS.md).

Then, for corral: supervisor RSS idle and with 1,000 open connections.  Prints markdown
tables (ratios against "no sandbox"), writes ``benchmarks/results/network-*.json`` and
``network.png``.  corral columns whose mode does not work yet are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _harness import (  # noqa: E402
    RESULTS, Unavailable, corral_argv, interleave, machine, plot, save, summarize, table,
)
from corral.world import DNS_V4, HTTP_V4, World  # noqa: E402

NETBENCH_PORT = 8000
IPERF_PORT = 5201
RUN_TIMEOUT = 120
POLICY_ALLOW_ALL = HERE / "policy_allow_all.py"
# Variants of "corral direct" measured for new connections/s only: what a feature costs.
CONNRATE_ONLY = ("corral direct, no attribution", "corral direct, async on_connect")

METRICS = [
    ("up_gbps", "iperf3 up, Gbit/s"),
    ("down_gbps", "iperf3 down, Gbit/s"),
    ("conns_per_s", "new conns/s (3000, c=32)"),
    ("rr_us", "1-byte RR, µs (vCPUs awake)"),
]


def build_netbench(out: Path) -> str:
    """Compile netbench.c into the results dir: visible from every sandbox's filesystem."""
    (out / "bin").mkdir(parents=True, exist_ok=True)
    binary = out / "bin" / "netbench"
    src = HERE / "netbench.c"
    if not binary.exists() or binary.stat().st_mtime < src.stat().st_mtime:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            sys.exit("network: a C compiler is needed to build benchmarks/netbench.c. Fix: apt-get install gcc")
        subprocess.run([cc, "-O2", "-pthread", "-o", str(binary), str(src)], check=True)
    return str(binary)


def sandbox_prefixes(corral: list[str]) -> dict[str, list[str]]:
    drive = [sys.executable, str(HERE / "sandboxes.py")]
    corral_run = [*corral, "run", "--net", "filtered", "--allow", HTTP_V4, "--dns-upstream", DNS_V4]
    return {
        "no sandbox": [],
        "slirp4netns": [*drive, "slirp4netns", "--"],
        "pasta": [*drive, "pasta", "--resolver", DNS_V4, "--"],
        "mini-tapbox": [*drive, "minitapbox", "--allow-ip", HTTP_V4, "--"],
        "corral direct": [*corral_run, "--data-path", "direct", "--"],
        "corral pump": [*corral_run, "--data-path", "pump", "--"],
        "corral direct, no attribution": [*corral_run, "--data-path", "direct", "--no-attribution", "--"],
        "corral direct, async on_connect": [
            *corral, "run", "--net", "filtered", "--policy", str(POLICY_ALLOW_ALL),
            "--dns-upstream", DNS_V4, "--data-path", "direct", "--",
        ],
    }


class Bench:
    def __init__(self, world: World, netbench: str, duration: int) -> None:
        self.world = world
        self.nb = netbench
        self.duration = duration

    def _run(self, prefix: list[str], argv: list[str]) -> str:
        try:
            r = self.world.run([*prefix, *argv], capture_output=True, text=True, timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"`{' '.join(argv[:2])}` timed out after {RUN_TIMEOUT} s") from exc
        if r.returncode != 0 or not r.stdout.strip():
            raise Unavailable(f"`{' '.join(argv[:2])}` exited {r.returncode}: {r.stderr.strip()[-400:]}")
        return r.stdout

    def iperf(self, prefix: list[str], reverse: bool) -> float:
        argv = ["iperf3", "-c", HTTP_V4, "-p", str(IPERF_PORT), "-t", str(self.duration), "-O", "1", "-J"]
        out = self._run(prefix, argv + (["-R"] if reverse else []))
        report = json.loads(out[out.index("{"):])
        if "error" in report:
            raise Unavailable(f"iperf3: {report['error']}")
        return report["end"]["sum_received"]["bits_per_second"] / 1e9

    def connrate(self, prefix: list[str], n: int = 3000, c: int = 32) -> float:
        out = self._run(prefix, [self.nb, "connrate", HTTP_V4, str(NETBENCH_PORT), str(n), str(c)])
        result = json.loads(out.strip().splitlines()[-1])
        if result["errors"]:
            raise Unavailable(f"connrate: {result['errors']} of {n} connections failed")
        return result["conns_per_s"]

    def rr(self, prefix: list[str], n: int = 10000) -> float:
        spinners = [subprocess.Popen([self.nb, "spin"]) for _ in range(os.cpu_count() or 1)]
        try:
            out = self._run(prefix, [self.nb, "rr", HTTP_V4, str(NETBENCH_PORT), str(n)])
        finally:
            for s in spinners:
                s.kill()
                s.wait()
        return json.loads(out.strip().splitlines()[-1])["median_us"]

    def all_metrics(self, prefix: list[str]) -> dict[str, float]:
        return {
            "up_gbps": self.iperf(prefix, reverse=False),
            "down_gbps": self.iperf(prefix, reverse=True),
            "conns_per_s": self.connrate(prefix),
            "rr_us": self.rr(prefix),
        }


def supervisor_rss(world: World, prefix: list[str], netbench: str, conns: int) -> dict[str, float]:
    """VmRSS (MiB) of the process started with ``prefix`` (corral's supervisor) idle and
    while the sandboxed client holds ``conns`` echo connections open."""
    result = {}
    for label, argv in (("idle", ["sleep", "30"]),
                        (f"{conns} conns", [netbench, "hold", HTTP_V4, str(NETBENCH_PORT), str(conns), "30"])):
        proc = world.popen([*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if label == "idle":
                time.sleep(3)  # let start-up finish; nothing to wait on inside `sleep`
            else:
                with selectors.DefaultSelector() as sel:
                    sel.register(proc.stdout, selectors.EVENT_READ)
                    if not sel.select(90) or proc.stdout.readline().strip() != "ready":
                        raise Unavailable(f"hold {conns}: no ready line ({proc.poll()=})")
            if proc.poll() is not None:
                raise Unavailable(f"{label}: exited {proc.returncode}: {proc.stderr.read()[-300:]}")
            with open(f"/proc/{proc.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f)
            result[label] = int(fields["VmRSS"].split()[0]) / 1024
        finally:
            proc.kill()
            proc.wait(timeout=30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4, help="iperf3 seconds per run")
    parser.add_argument("--only", action="append", help="run only these paths (repeatable)")
    parser.add_argument("--hold", type=int, default=1000, help="connections for the RSS figure")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # slirp4netns needs > 1024
    netbench = build_netbench(RESULTS)
    corral = corral_argv()
    prefixes = sandbox_prefixes(corral)
    if args.only:
        prefixes = {k: v for k, v in prefixes.items() if k in args.only}
    needs = {"slirp4netns": "slirp4netns", "pasta": "pasta", "mini-tapbox": None}
    skipped: dict[str, str] = {}

    with World.start() as world:
        server = world.popen([netbench, "server", HTTP_V4, str(NETBENCH_PORT)], stdout=subprocess.PIPE, text=True)
        if server.stdout.readline().strip() != "listening":
            sys.exit("network: netbench server did not start")
        world.popen(["iperf3", "-s", "-B", HTTP_V4, "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL)
        bench = Bench(world, netbench, args.duration)
        _wait_for_iperf(bench)

        paths = {}
        for name, prefix in prefixes.items():
            tool = needs.get(name)
            if tool and shutil.which(tool) is None:
                skipped[name] = f"{tool} is not installed"
                continue
            try:  # preflight: a short connrate through the path
                bench.connrate(prefix, n=20, c=2)
            except Unavailable as exc:
                skipped[name] = f"does not work yet: {exc}"
                print(f"skipping {name}: {exc}", file=sys.stderr)
                continue
            if name in CONNRATE_ONLY:
                paths[name] = (lambda p=prefix: {"conns_per_s": bench.connrate(p)})
            else:
                paths[name] = (lambda p=prefix: bench.all_metrics(p))
        print(f"network: {args.reps} interleaved repetitions of {', '.join(paths)}", file=sys.stderr)
        samples, dropped = interleave(paths, args.reps, log=lambda m: print(m, file=sys.stderr))
        skipped.update(dropped)

        rss = {}
        if "corral direct" in samples:
            try:
                rss = supervisor_rss(world, prefixes["corral direct"], netbench, args.hold)
            except Unavailable as exc:
                skipped["corral RSS"] = str(exc)

    summary = {name: {m: summarize(v) for m, v in s.items()} for name, s in samples.items()}
    print(f"\n### Network (median, min–max over {args.reps}; ratio vs no sandbox)\n")
    print(table(summary, METRICS, baseline="no sandbox"))
    if rss:
        print("\ncorral supervisor RSS: " + ", ".join(f"{k}: {v:.1f} MiB" for k, v in rss.items()))
    for name, reason in skipped.items():
        print(f"\n- {name}: skipped: {reason}")
    data = {"machine": machine(), "reps": args.reps, "iperf_seconds": args.duration, "samples": samples,
            "summary": summary, "supervisor_rss_mib": rss, "skipped": skipped}
    print(f"\nsaved {save('network', data)}")
    png = plot("network", summary, METRICS)
    print(f"plot {png}" if png else "plot skipped: matplotlib is not installed")


def _wait_for_iperf(bench: Bench) -> None:
    """iperf3 -s prints nothing useful on a pipe; poll its port (bounded: 5 s)."""
    deadline = time.monotonic() + 5
    probe = f"import socket; socket.create_connection(({HTTP_V4!r}, {IPERF_PORT}), timeout=1).close()"
    while bench.world.run([sys.executable, "-c", probe], capture_output=True, timeout=10).returncode != 0:
        if time.monotonic() > deadline:
            sys.exit("network: iperf3 server did not start")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
