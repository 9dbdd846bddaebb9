"""Start-up of ``/bin/true`` side by side, in the three conditions users have.

Run as the unprivileged user:  ``.venv/bin/python benchmarks/startup.py [--reps 10]``
(needs ``pip install '.[bench]'`` for mini-sandbox / mini-tapbox).

Cases alternate round by round (``--rounds``), and within a round the paths are interleaved
(A B C A B C …); medians (min–max):

- ``plain host``: this machine's own mount table.
- ``netns``: inside a private user+net+mount namespace whose ``/etc/resolv.conf`` is a bind
  mount, exactly what ``ip netns exec`` and every container give a command
  (a :class:`corral.world.World`, built here; nothing reaches a real network).
- ``netns + 60 mounts``: the same plus 60 read-only tmpfs mounts under /mnt/snap (a snap
  desktop has that many).

Paths: bare ``/bin/true``, ``unshare -Urnm``, bwrap, mini-sandbox (no network), mini-tapbox
(its tap network), ``corral run --net none`` and the default ``corral run`` (filtered network,
DNS and policy ready), each cold (``CORRAL_WARM=off``) and through a warm server
(``corral warm start``, started in each case's namespaces before its repetitions and
stopped after them: its own start-up is not counted, as a daemon's is not), with and without
its spare sandbox (``--no-spare``).  Each warm row has a server of its own: the spare serves
a run like the previous one, and one server's runs alternating between two rows would never
take it.  Ratios: corral
default vs mini-tapbox, corral ``--net none`` vs mini-sandbox (issue 11's goals).  Wall time
from spawning the command to reaping it; stdin is /dev/null for every path (a terminal on
stdin makes corral start cold); after every run of every path the harness waits 0.3 s, so
that what a run leaves to do in the background (corral's sweeper removing its scratch, a warm
server building its next spare) is not charged to the next path's run.
Prints markdown tables; writes ``benchmarks/results/startup-*.json`` and ``startup.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Unavailable, corral_argv, interleave, machine, plot, save, summarize, table  # noqa: E402

TRUE = "/bin/true"
BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev",
         "--proc", "/proc", "--tmpfs", "/tmp", TRUE]
# mini-sandbox's Python library path, as lean as it gets: start, exec /bin/true in the
# sandboxed child; the original process (start() returns -1 once the child has ended)
# exits itself.  MINI_SANDBOX_DOCKER_PRIVILEGED=1 or it does nothing on a /.dockerenv box.
MINISANDBOX_SCRIPT = """
import os, sys
from pyminisandbox import %s as ms
if ms.mini_sandbox_setup_default() != 0:
    sys.exit("setup: " + ms.mini_sandbox_get_last_error_msg())
own = os.readlink("/proc/self/ns/net")
rc = ms.mini_sandbox_start()
if rc == 0:
    if os.readlink("/proc/self/ns/net") == own:
        os.write(2, b"mini-sandbox did not unshare the network\\n")
        os._exit(125)
    os.execv(%r, [%r])
os._exit(0 if rc == -1 else 1)
"""
CASES = {"plain host": 0, "netns": None, "netns + 60 mounts": 60}
PAIRS = (("corral run (default)", "mini-tapbox"), ("corral --net none", "mini-sandbox"),
         ("corral run (default), warm", "mini-tapbox"),
         ("corral --net none, warm", "mini-sandbox"),
         ("corral run (default), warm, no spare", "mini-tapbox"),
         ("corral --net none, warm, no spare", "mini-sandbox"))


SETTLE = 0.3  # seconds after every run: what it leaves to do in the background (corral's
# sweeper, a warm server's next spare, mini-sandbox's leftovers) is not charged to the next


def timed(argv: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    rc = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    dt = (time.perf_counter() - t0) * 1000
    time.sleep(SETTLE)
    if rc != 0:
        raise Unavailable(f"`{' '.join(argv[:6])}` exited {rc}")
    return dt


def preflight(argv: list[str], env: dict | None = None, what: str = "") -> str | None:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                       timeout=60)
    if r.returncode != 0:
        return f"{what or argv[0]} does not work here (exit {r.returncode}): {r.stderr.strip()[-300:]}"
    return None


def candidates(warm_envs: dict) -> dict[str, tuple[list[str], dict | None]]:
    ms_env = {**os.environ, "MINI_SANDBOX_DOCKER_PRIVILEGED": "1"}
    cold_env = {**os.environ, "CORRAL_WARM": "off"}
    corral = corral_argv()
    return {
        "bare /bin/true": ([TRUE], None),
        "unshare -Urnm": (["unshare", "-Urnm", TRUE], None),
        "bwrap": (BWRAP, None),
        "mini-sandbox": ([sys.executable, "-I", "-c",
                          MINISANDBOX_SCRIPT % ("pyminisandbox", TRUE, TRUE)], ms_env),
        "mini-tapbox": ([sys.executable, "-I", "-c",
                         MINISANDBOX_SCRIPT % ("pyminitapbox", TRUE, TRUE)], ms_env),
        "corral --net none": ([*corral, "run", "--net", "none", "--", TRUE], cold_env),
        "corral run (default)": ([*corral, "run", "--", TRUE], cold_env),
        **{row: ([*corral, "run", *(["--net", "none"] if "none" in row else []), "--", TRUE],
                 warm_envs[row]) for row in WARM},
    }


WARM = {  # row: the warm server's options; one server per row, so that each row's runs are
    # "a run like the last one" for its server (one spare per server; docs/cli.md)
    "corral --net none, warm": (),
    "corral run (default), warm": (),
    "corral --net none, warm, no spare": ("--no-spare",),
    "corral run (default), warm, no spare": ("--no-spare",),
}


@contextlib.contextmanager
def warm_servers():
    """{row: env} with a warm server of its own (a private state directory) for each warm
    row, in these namespaces."""
    import tempfile

    with contextlib.ExitStack() as stack:
        envs = {}
        for row, options in WARM.items():
            runtime = stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-bench-"))
            env = envs[row] = {**os.environ, "XDG_RUNTIME_DIR": runtime}
            proc = subprocess.run([*corral_argv(), "warm", "start", "--idle", "600", *options],
                                  env=env, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                print(f"no warm server: {proc.stderr.strip()}", file=sys.stderr)
            stack.callback(subprocess.run, [*corral_argv(), "warm", "stop"], env=env,
                           capture_output=True, timeout=60)
        yield envs


def measure(reps: int) -> dict:
    """Interleaved samples of every path that works here (in this process's namespaces)."""
    with warm_servers() as warm_envs:
        return _measure(reps, warm_envs)


def _measure(reps: int, warm_envs: dict) -> dict:
    paths, skipped = {}, {}
    for name, (argv, env) in candidates(warm_envs).items():
        if shutil.which(argv[0]) is None:
            skipped[name] = f"{argv[0]} not installed"
            continue
        reason = preflight(argv, env, name)
        if not reason and name in WARM:
            reason = preflight([*corral_argv(), "warm", "status"], env, "the warm server")
        if reason:
            skipped[name] = reason
            print(f"skipping {name}: {reason}", file=sys.stderr)
            continue
        paths[name] = (lambda a=argv, e=env: {"ms": timed(a, e)})
    tmp_before = set(os.listdir("/tmp"))
    for fn in paths.values():  # warm caches once, unrecorded
        fn()
    samples, dropped = interleave(paths, reps, log=lambda m: print(m, file=sys.stderr))
    skipped.update(dropped)
    _remove_minisandbox_leftovers(tmp_before)
    return {"samples": samples, "skipped": skipped, "mounts": _mount_count()}


def _mount_count() -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for _ in f)


def _in_world(world, reps: int) -> dict:
    proc = world.run([sys.executable, __file__, "--inner", "--reps", str(reps)],
                     capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit("startup: the run inside the namespace failed:\n" + proc.stderr[-2000:])
    sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _merge(into: dict, got: dict) -> None:
    for name, metrics in got["samples"].items():
        for metric, values in metrics.items():
            into["samples"].setdefault(name, {}).setdefault(metric, []).extend(values)
    into["skipped"].update(got["skipped"])
    into["mounts"] = got["mounts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5,
                        help="split the repetitions into rounds that alternate the cases")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:  # inside a world: measure and report as one JSON line
        print(json.dumps(measure(args.reps)))
        return

    cases = args.cases.split(",")
    rounds = max(1, min(args.rounds, args.reps))
    per_round = [args.reps // rounds + (i < args.reps % rounds) for i in range(rounds)]
    results = {case: {"samples": {}, "skipped": {}, "mounts": 0} for case in cases}
    with contextlib.ExitStack() as stack:
        from corral.world import World

        worlds = {case: stack.enter_context(World.start(extra_mounts=CASES[case] or 0))
                  for case in cases if CASES[case] != 0}
        # The cases alternate round by round (plain, netns, +60, plain, ...): a change of
        # the machine's load lands on every row alike instead of on one block.
        for i, reps in enumerate(per_round):
            for case in cases:
                print(f"== round {i + 1}/{rounds}, {case}: {reps} interleaved repetitions",
                      file=sys.stderr)
                got = measure(reps) if case not in worlds else _in_world(worlds[case], reps)
                _merge(results[case], got)
    metrics = [("ms", "start-up of /bin/true, ms")]
    report = {}
    for case, res in results.items():
        summary = {name: {m: summarize(v) for m, v in s.items()} for name, s in res["samples"].items()}
        report[case] = summary
        print(f"\n### {case} ({res['mounts']} mounts; median, min–max over {args.reps})\n")
        print(table(summary, metrics))
        for ours, theirs in PAIRS:
            if ours in summary and theirs in summary:
                ratio = summary[ours]["ms"]["median"] / summary[theirs]["ms"]["median"]
                print(f"- {ours} / {theirs}: **{ratio:.2f}×**")
        for name, reason in res["skipped"].items():
            print(f"- {name}: skipped: {reason}")
    print("\n### Side by side (medians, ms; ratio)\n")
    print(side_by_side(report))
    data = {"machine": machine(), "reps": args.reps, "results": results, "summary": report}
    print(f"\nsaved {save('startup', data)}")
    combined = {}  # one panel per case, the sandboxes as bars
    for case, summary in report.items():
        for name, stats in summary.items():
            if name not in ("bare /bin/true", "unshare -Urnm"):
                combined.setdefault(name, {})[case] = stats["ms"]
    png = plot("startup", combined, [(case, "start-up of /bin/true, ms: " + case) for case in report])
    print(f"plot {png}" if png else "plot skipped: matplotlib is not installed")


def side_by_side(report: dict) -> str:
    """The README's table: one row per case, issue 11's four columns."""
    cols = ["corral run (default)", "corral run (default), warm", "mini-tapbox",
            "corral --net none", "corral --net none, warm", "mini-sandbox"]
    lines = ["| case | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for case, summary in report.items():
        cells = []
        for name in cols:
            s = summary.get(name, {}).get("ms")
            if s is None:
                cells.append("—")
                continue
            cell = f"{s['median']:,.0f}" if s["median"] >= 100 else f"{s['median']:.1f}"
            pair = dict(PAIRS).get(name)  # ours -> theirs
            base = summary.get(pair, {}).get("ms") if pair else None
            if base:
                cell += f" ({s['median'] / base['median']:.2f}×)"
            cells.append(cell)
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _remove_minisandbox_leftovers(before: set[str]) -> None:
    """Each mini-sandbox start leaves /tmp/<n>.rules and /tmp/temp_<n>/ behind."""
    for name in set(os.listdir("/tmp")) - before:
        path = os.path.join("/tmp", name)
        try:
            if name.startswith("temp_") and os.path.isdir(path) and os.stat(path).st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
            elif name.endswith(".rules") and os.stat(path).st_uid == os.getuid():
                os.unlink(path)
        except OSError:
            pass


if __name__ == "__main__":
    main()
