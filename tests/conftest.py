"""Shared fixtures.  Capabilities are probed once; with CORRAL_MUST_WORK=1 (CI)
a missing capability fails the run instead of skipping, and running as root
is refused, so "rootless" is proven rather than assumed."""

import os
import subprocess
import sys

import pytest

from tmux import tmux  # noqa: F401  (fixture: a private terminal)
from world import world  # noqa: F401  (session fixture: the network test world)

MUST_WORK = os.environ.get("CORRAL_MUST_WORK") == "1"


def _probe_userns():
    probe = subprocess.run(
        ["unshare", "-Urm", "true"], capture_output=True, text=True, timeout=30
    )
    return probe.returncode == 0, probe.stderr.strip()


USERNS_OK, USERNS_WHY = _probe_userns()


def pytest_configure(config):
    if MUST_WORK and os.getuid() == 0:
        pytest.exit("CORRAL_MUST_WORK=1: run the tests as an unprivileged user, not root", 2)
    if MUST_WORK and not USERNS_OK:
        pytest.exit("CORRAL_MUST_WORK=1 but user namespaces do not work: " + USERNS_WHY, 2)


def pytest_collection_modifyitems(config, items):
    if USERNS_OK:
        return
    for item in items:
        if "namespaces" in item.keywords or "network" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="no user namespaces: " + USERNS_WHY))


def corral(*args, **kw):
    """Run the corral CLI the way a user does; return CompletedProcess."""
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", 60)
    return subprocess.run([sys.executable, "-m", "corral", *args], **kw)


@pytest.fixture
def cli():
    return corral


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A throw-away $HOME with fake secrets, so tests never touch real dotfiles."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


try:  # hypothesis keeps no example database: the checkout may not be writable
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("corral", database=None)
    _hsettings.load_profile("corral")
except ImportError:
    pass


@pytest.fixture
def stop_all():
    """Popen objects a test appends here are killed (if still running) when it ends."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
