"""Start-up of ``/bin/true``: bare, unshare, bwrap, mini-sandbox, ``corral run --net none``.

Run as the unprivileged user:  ``.venv/bin/python benchmarks/startup.py [--reps 30]``.
Prints a markdown table (median, min–max, ratio to mini-sandbox) and writes
``benchmarks/results/startup-*.json`` and ``startup.png``.  Wall time is measured from
spawning the command to reaping it, paths interleaved.  No network is involved.
"""

from __future__ import annotations

import argparse
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
from pyminisandbox import pyminisandbox as ms
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
""" % (TRUE, TRUE)


def timed(argv: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    rc = subprocess.call(argv, stdout=subprocess.DEVNULL, env=env)
    dt = (time.perf_counter() - t0) * 1000
    if rc != 0:
        raise Unavailable(f"`{' '.join(argv[:6])}` exited {rc}")
    return dt


def preflight(argv: list[str], env: dict | None = None, what: str = "") -> str | None:
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    if r.returncode != 0:
        return f"{what or argv[0]} does not work here (exit {r.returncode}): {r.stderr.strip()[-300:]}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()

    ms_env = {**os.environ, "MINI_SANDBOX_DOCKER_PRIVILEGED": "1"}
    corral = [*corral_argv(), "run", "--net", "none", "--", TRUE]
    candidates = {
        "bare /bin/true": ([TRUE], None),
        "unshare -Urnm": (["unshare", "-Urnm", TRUE], None),
        "bwrap": (BWRAP, None),
        "mini-sandbox": ([sys.executable, "-I", "-c", MINISANDBOX_SCRIPT], ms_env),
        "corral --net none": (corral, None),
    }
    paths, skipped = {}, {}
    for name, (argv, env) in candidates.items():
        if shutil.which(argv[0]) is None:
            skipped[name] = f"{argv[0]} not installed"
            continue
        reason = preflight(argv, env, name)
        if reason:
            skipped[name] = reason
            print(f"skipping {name}: {reason}", file=sys.stderr)
            continue
        paths[name] = (lambda a=argv, e=env: {"ms": timed(a, e)})
    tmp_before = set(os.listdir("/tmp"))
    for fn in paths.values():  # warm caches once, unrecorded
        fn()
    print(f"start-up of {TRUE}: {args.reps} interleaved repetitions of {', '.join(paths)}", file=sys.stderr)
    samples, dropped = interleave(paths, args.reps, log=lambda m: print(m, file=sys.stderr))
    skipped.update(dropped)
    _remove_minisandbox_leftovers(tmp_before)

    summary = {name: {m: summarize(v) for m, v in s.items()} for name, s in samples.items()}
    metrics = [("ms", "start-up of /bin/true, ms")]
    baseline = "mini-sandbox" if "mini-sandbox" in summary else None
    print(f"\n### Start-up (median, min–max over {args.reps}; ratio vs {baseline})\n")
    print(table(summary, metrics, baseline=baseline))
    for name, reason in skipped.items():
        print(f"\n- {name}: skipped: {reason}")
    data = {"machine": machine(), "reps": args.reps, "samples": samples, "summary": summary, "skipped": skipped}
    print(f"\nsaved {save('startup', data)}")
    png = plot("startup", summary, metrics)
    print(f"plot {png}" if png else "plot skipped: matplotlib is not installed")


def _remove_minisandbox_leftovers(before: set[str]) -> None:
    """Each mini-sandbox start leaves /tmp/<n>.rules and /tmp/temp_<n>/ behind."""
    for name in set(os.listdir("/tmp")) - before:
        path = os.path.join("/tmp", name)
        if name.startswith("temp_") and os.path.isdir(path) and os.stat(path).st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
        elif name.endswith(".rules") and os.stat(path).st_uid == os.getuid():
            os.unlink(path)


if __name__ == "__main__":
    main()
