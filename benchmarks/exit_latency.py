"""How long `corral run` takes to exit once the command has (issue 11: goal <= 10 ms).

Measured as strace sees it (``--seccomp-bpf``: only process calls are stopped): from the
command's ``exit_group`` to corral's own, for ``--net none`` and the default filtered
network, interleaved, medians.  ``--baseline DIR`` adds the same runs with another
checkout's ``supervisor/`` package (imported as ``corral``: ``DIR/corral`` must be that
package, e.g. ``git archive OLD supervisor | tar -x -C DIR && mv DIR/supervisor
DIR/corral && ln -s $PWD/bindings DIR/corral/bindings``), for before/after figures
from one run.  Run it as the unprivileged user corral is for.

    python benchmarks/exit_latency.py --runs 10 [--baseline DIR]
    python benchmarks/exit_latency.py --runs 10 --warm

``--warm`` compares the cold run with a run through a warm server (``corral warm
start``), whose command runs under the server, out of the caller's strace's sight: there
the command prints the time as its last act (``exec date +%s%N``) and the figure is from
that timestamp to ``corral`` having exited and been reaped, as its caller sees it — an
upper bound that also counts the command's own exit.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

COMMAND = "/bin/true"
CASES = {"none": ["--net", "none"], "filtered": []}
LAUNCH = "import sys; sys.argv[0] = 'corral'; from corral.cli import console; console()"


def one(case, pythonpath=None):
    """Milliseconds from the command's exit_group to corral's."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(["strace", "--seccomp-bpf", "-f", "-ttt", "-o", out.name,
                        "-e", "trace=execve,exit_group",
                        sys.executable, "-c", LAUNCH, "run", *CASES[case], "--", COMMAND],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=env, check=False)
        lines = out.read().splitlines()
    corral = lines[0].split()[0]
    command = exited = done = None
    for line in lines:
        pid, stamp, call = line.split(None, 2)
        if call.startswith('execve("%s"' % COMMAND):
            command = pid
        elif call.startswith("exit_group("):
            if pid == command and exited is None:
                exited = float(stamp)
            elif pid == corral:
                done = float(stamp)
    return (done - exited) * 1000


def as_caller_sees(case, env):
    """Milliseconds from the command's last timestamp to corral's reaped exit."""
    corral = [sys.executable, "-c", LAUNCH.replace("corral.cli", "corral.warm.client")]
    proc = subprocess.Popen([*corral, "run", *CASES[case], "--", "sh", "-c", "exec date +%s%N"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    proc.wait()  # corral's exit: not the end of its stdout, which pid 1's own exit holds open
    end = time.time_ns()
    stamp = int(proc.stdout.read())
    proc.stdout.close()
    return (end - stamp) / 1e6


def warm_vs_cold(runs):
    with tempfile.TemporaryDirectory(prefix="corral-exit-") as runtime:
        warm = {**os.environ, "XDG_RUNTIME_DIR": runtime}
        subprocess.run([sys.executable, "-m", "corral", "warm", "start"], env=warm, check=True,
                       capture_output=True)
        variants = {"cold": {**os.environ, "CORRAL_WARM": "off"}, "warm": warm}
        times = {(case, name): [] for case in CASES for name in variants}
        try:
            for _ in range(runs):
                for case in CASES:
                    for name, env in variants.items():
                        time.sleep(0.3)  # the previous run's background work (a spare) done
                        times[case, name].append(as_caller_sees(case, env))
        finally:
            subprocess.run([sys.executable, "-m", "corral", "warm", "stop"], env=warm,
                           capture_output=True)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--baseline", help="a directory holding another corral package")
    parser.add_argument("--warm", action="store_true",
                        help="cold vs through a warm server, as the caller sees it")
    args = parser.parse_args()
    if args.warm:
        report(warm_vs_cold(args.runs))
        return
    if not shutil.which("strace"):
        sys.exit("exit_latency: needs strace")
    variants = {"this": None}
    if args.baseline:
        variants["baseline"] = os.path.abspath(args.baseline)
    times = {(case, name): [] for case in CASES for name in variants}
    for _ in range(args.runs):
        for case in CASES:
            for name, path in variants.items():
                times[case, name].append(one(case, path))
    report(times)


def report(times):
    for (case, name), values in times.items():
        print("%-9s %-8s median %6.1f ms  min %6.1f  max %6.1f  (%d runs)" % (
            case, name, statistics.median(values), min(values), max(values), len(values)))


if __name__ == "__main__":
    main()
