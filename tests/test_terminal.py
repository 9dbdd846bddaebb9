"""An interactive shell in a real terminal (tmux): job control works inside
the sandbox — Ctrl-Z stops a job, `jobs` lists it, `fg` resumes it, Ctrl-C
interrupts it — and the shell's exit status is corral's."""

import os
import shlex
import shutil
import sys
import time

import pytest

pytestmark = [pytest.mark.namespaces,
              pytest.mark.skipif(shutil.which("tmux") is None and os.environ.get("CORRAL_MUST_WORK") != "1",
                                 reason="tmux not installed")]




def test_bash_job_control_in_a_terminal(tmux, tmp_path):
    status = tmp_path / "status"
    command = "%s -m corral run --net none -- bash --norc --noprofile -i; echo $? > %s; sleep 30" % (
        sys.executable, status)
    tmux.start("PS1='box$ ' exec sh -c %s" % shlex.quote(command), width=100, height=30)
    tmux.wait_for("box$")
    tmux.send("sleep 100", "Enter")
    time.sleep(0.3)  # let sleep start before the terminal sends SIGTSTP
    tmux.send("C-z")
    tmux.wait_for("Stopped")
    tmux.send("jobs", "Enter")
    assert "sleep 100" in tmux.wait_for("[1]+")
    tmux.send("fg", "Enter")
    tmux.wait_for("fg\nsleep 100")
    time.sleep(0.3)
    tmux.send("C-c")
    tmux.send("echo alive-$((6*7))", "Enter")
    tmux.wait_for("alive-42")  # Ctrl-C stopped the job, not the shell or corral
    tmux.send("exit 3", "Enter")
    deadline = time.monotonic() + 15
    while not (status.exists() and status.read_text().strip()):
        assert time.monotonic() < deadline, tmux.screen()
        time.sleep(0.05)
    assert status.read_text().strip() == "3"
