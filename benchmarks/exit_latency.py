"""How long `corral run` takes to exit once the command has (issue 11: goal <= 10 ms).

Measured as strace sees it (``--seccomp-bpf``: only process calls are stopped): from the
command's ``exit_group`` to corral's own, for ``--net none`` and the default filtered
network, interleaved, medians.  ``--baseline DIR`` adds the same runs with another
checkout's ``supervisor/`` package (imported as ``corral``: ``DIR/corral`` must be that
package, e.g. ``git archive OLD supervisor | tar -x -C DIR && mv DIR/supervisor
DIR/corral && ln -s $PWD/bindings DIR/corral/bindings``), for before/after figures
from one run.  Run it as the unprivileged user corral is for.

    python benchmarks/exit_latency.py --runs 10 [--baseline DIR]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--baseline", help="a directory holding another corral package")
    args = parser.parse_args()
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
    for (case, name), values in times.items():
        print("%-9s %-8s median %6.1f ms  min %6.1f  max %6.1f  (%d runs)" % (
            case, name, statistics.median(values), min(values), max(values), len(values)))


if __name__ == "__main__":
    main()
