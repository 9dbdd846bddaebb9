"""A short run of benchmarks/fuzz_frames.py (issue 5, item 5): 20,000 fuzzed frames into
each data path, in a fresh user+net namespace, bounded in time.  The fuzzer itself
checks no crash, goroutines back to baseline, no fd growth, bounded RSS growth and that
the stack still reads frames afterwards; ≥ 1,000,000 frames on demand:
``python benchmarks/fuzz_frames.py --frames 1000000``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz_frames.py"
pytestmark = pytest.mark.namespaces


def fuzz(*args):
    proc = subprocess.run([sys.executable, str(FUZZER), "--frames", "20000", *args],
                          capture_output=True, text=True, timeout=60)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, results


@pytest.mark.parametrize("path", ["pump", "direct"])
def test_fuzzed_frames_leave_the_stack_healthy(path):
    proc, results = fuzz("--path", path)
    assert len(results) == 1, proc.stderr
    (res,) = results
    assert res["failures"] == [] and proc.returncode == 0, res
    assert res["seconds"] < 30, res
    assert res["frames_in"] > 10_000, res  # the frames really reached the stack
    assert res["goroutines"]["after"] <= res["goroutines"]["baseline"] + 2, res
    assert res["fds"]["after"] <= res["fds"]["before"], res


def test_frames_to_a_foreign_mac_do_not_stop_the_direct_path():
    proc, results = fuzz("--path", "direct", "--raw-ethernet")
    assert len(results) == 1, proc.stderr
    assert results[0]["still_reading"], results[0]
