"""Stdio latency: keystroke echo of ``bash -i`` under tmux, and the stdio relay.

Run as the unprivileged user:  ``.venv/bin/python benchmarks/stdio_latency.py [--reps 200]``.

1. *Keystroke echo*: a private tmux server runs ``bash -i`` bare and under
   ``corral run --net none`` (and the default filtered network); one key is sent
   with ``send-keys`` and the pane polled until it shows it.  A terminal is passed
   to the sandbox as is (never relayed), so corral should add nothing here.
2. *Relayed write latency*: the command writes one line to a stdout that is a
   regular file (so it goes through the supervisor's relay pipe) every 20 ms, each
   stamped with CLOCK_MONOTONIC; a reader on the host polls the file and records
   when each line appeared.  Compared with the same command writing to the file
   directly (bare, no sandbox).
3. *Relay throughput*: ``cat`` of a 256 MiB regular file into a regular file,
   bare and under corral (the start-up of ``true`` on the same path subtracted).

Prints median (min–max) per path, paths interleaved.  No network is involved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CORRAL = [sys.executable, "-m", "corral", "run"]


def summary(samples):
    samples = sorted(samples)
    return "%.2f ms (%.2f–%.2f, p95 %.2f, n=%d)" % (
        statistics.median(samples), samples[0], samples[-1],
        samples[int(len(samples) * 0.95) - 1], len(samples))


class Tmux:
    def __init__(self, name):
        self.base = ["tmux", "-L", name]

    def __call__(self, *args):
        return subprocess.run(self.base + list(args), capture_output=True, text=True, timeout=20)

    def screen(self):
        return self("capture-pane", "-p").stdout


def keystroke_echo(argv, reps, label):
    tmux = Tmux("corral-bench-%d-%d" % (os.getpid(), abs(hash(label))))
    env = "env -i HOME=%s TERM=xterm PS1='$ ' PATH=/usr/bin:/bin " % tempfile.gettempdir()
    tmux("new-session", "-d", "-x", "120", "-y", "40",
         env + " ".join(argv + ["bash", "--norc", "--noprofile", "-i"]))
    try:
        deadline = time.monotonic() + 120
        while "$" not in tmux.screen():
            if time.monotonic() > deadline:
                raise SystemExit("%s: no prompt:\n%s" % (label, tmux.screen()))
            time.sleep(0.05)
        samples = []
        for i in range(reps):
            key = "abcdefghij"[i % 10]
            before = tmux.screen().rstrip().count(key)
            t0 = time.perf_counter()
            tmux("send-keys", "-l", key)
            while tmux.screen().rstrip().count(key) == before:
                pass
            samples.append((time.perf_counter() - t0) * 1000)
            if i % 50 == 49:
                tmux("send-keys", "C-u")
                time.sleep(0.05)
        return samples
    finally:
        tmux("kill-server")


WRITER = """
import os, time
for i in range(%d):
    os.write(1, b"%%d\\n" %% time.monotonic_ns())
    time.sleep(0.02)
"""


def relayed_write(prefix, reps, directory):
    path = os.path.join(directory, "lines")
    samples = []
    with open(path, "wb") as out:
        proc = subprocess.Popen(prefix + [sys.executable, "-c", WRITER % reps], stdout=out)
        with open(path, "rb") as reader:
            buffer = b""
            while len(samples) < reps:
                chunk = reader.read()
                now = time.monotonic_ns()
                if not chunk:
                    if proc.poll() is not None:
                        break
                    continue
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                samples += [(now - int(line)) / 1e6 for line in lines]
        proc.wait()
    return samples


def throughput(prefix, directory, size=256 << 20):
    src = os.path.join(directory, "big")
    if not os.path.exists(src):
        with open(src, "wb") as f:
            f.write(os.urandom(1 << 20) * (size >> 20))
    dst = os.path.join(directory, "copy")
    t0 = time.perf_counter()
    subprocess.run(prefix + ["true"], check=True)  # start-up, subtracted below
    startup = time.perf_counter() - t0
    with open(src, "rb") as stdin, open(dst, "wb") as stdout:
        t0 = time.perf_counter()
        subprocess.run(prefix + ["cat"], stdin=stdin, stdout=stdout, check=True)
        seconds = time.perf_counter() - t0 - startup
    assert os.path.getsize(dst) == size
    return size / max(seconds, 1e-3) / (1 << 20)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--echo-only", action="store_true",
                        help="only the keystroke echo (e.g. to compare with a corral without the relay)")
    args = parser.parse_args()
    if not shutil.which("tmux"):
        raise SystemExit("tmux is needed")
    paths = {"bare": [], "corral --net none": CORRAL + ["--net", "none", "--"],
             "corral (filtered)": CORRAL + ["--"]}
    print("## keystroke echo, bash -i under tmux")
    for label, prefix in paths.items():
        print("%-20s %s" % (label, summary(keystroke_echo(prefix, args.reps, label))))
    if args.echo_only:
        return
    with tempfile.TemporaryDirectory() as directory:
        print("## a line written to a regular-file stdout until the host sees it")
        for label, prefix in paths.items():
            print("%-20s %s" % (label, summary(relayed_write(prefix, args.reps // 2, directory))))
        print("## cat 256 MiB regular file -> regular file")
        for label, prefix in paths.items():
            rates = [throughput(prefix, directory) for _ in range(3)]
            print("%-20s %.0f MiB/s (best of 3: %.0f)" % (label, statistics.median(rates), max(rates)))


if __name__ == "__main__":
    main()
