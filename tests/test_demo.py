"""The README's first command works and its transcript is true (issue 12.1, 12.7): the demo
(examples/demo.py, what scripts/demo runs after set-up) exits 0 with no traceback, and every
line of the README's "30 seconds" transcript appears in its output."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.namespaces, pytest.mark.network]


def normalize(line):
    """What may differ between runs and machines: paths, the exfiltrated label, numbers."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    line = re.sub(r"\S*python[0-9.]* \S*installer\.py", "python installer.py", line)
    line = re.sub(r"/tmp/corral-demo-[^/\s]+/home", "~", line)
    line = re.sub(r"\b[a-z2-7]{32}\b", "LABEL", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return " ".join(line.split())


def transcript():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## 30 seconds", 1)[1]
    return section.split("```console\n", 1)[1].split("```", 1)[0].splitlines()


@pytest.fixture(scope="module")
def demo():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    return proc


def test_demo_runs_to_the_end_without_a_traceback(demo):
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "Traceback" not in demo.stdout + demo.stderr
    assert "unchanged ~/.bashrc" in demo.stdout


def test_readme_transcript_lines_appear_in_the_demo_output(demo):
    seen = [normalize(line) for line in (demo.stdout + demo.stderr).splitlines()]
    missing = []
    for line in transcript():
        want = normalize(line)
        if want in ("…", ""):
            continue
        if want.endswith("…"):
            if not any(got.startswith(want[:-1].rstrip()) for got in seen):
                missing.append(line)
        elif want not in seen:
            missing.append(line)
    assert not missing, "README lines the demo no longer prints:\n" + "\n".join(missing)
