"""A private tmux server for terminal tests: start a command in a real
terminal, type into it, and read the screen a user would see."""

import os
import subprocess
import time

import pytest


class Tmux:
    def __init__(self, name):
        self.base = ["tmux", "-L", name]

    def __call__(self, *args):
        return subprocess.run(self.base + list(args), capture_output=True, text=True, timeout=10)

    def start(self, command, width=150, height=40):
        result = self("new-session", "-d", "-x", str(width), "-y", str(height), "sh", "-c", command)
        assert result.returncode == 0, result.stderr

    def send(self, *keys):
        self("send-keys", *keys)

    def screen(self, escapes=False):
        return self("capture-pane", "-p", "-J", *(["-e"] if escapes else [])).stdout

    def wait_for(self, *texts, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if all(t in screen for t in texts):
                return screen
            time.sleep(0.05)
        raise AssertionError("%r never appeared on the terminal:\n%s" % (texts, self.screen()))


@pytest.fixture
def tmux(request):
    t = Tmux("corral-%s-%d" % (request.node.name[:40], os.getpid()))
    yield t
    t("kill-server")
