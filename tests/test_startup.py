"""Start-up (issue 11): it does not grow with the host's mount table (a real world
whose /etc/resolv.conf is a bind mount and that has 60 more read-only mounts), and
nothing on the run path forks a helper program."""

import subprocess
import sys

import pytest

from corral.world import World, WorldUnavailable

SNAPS = 60

NO_HELPER = """
import subprocess, sys
import corral
spawned = []
subprocess.Popen.__init__ = lambda self, argv, *a, **kw: spawned.append(argv) or 1 / 0
import trio
from trio._core import _thread_cache
assert _thread_cache.set_os_thread_name is not None, "trio lost thread names"
assert not spawned, spawned
"""


def test_importing_trio_through_corral_runs_no_ldconfig():
    # trio asks ctypes.util.find_library for libpthread, which forks /sbin/ldconfig -p
    proc = subprocess.run([sys.executable, "-c", NO_HELPER], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def _sandbox_mounts(extra, tmp_path):
    """The sandbox's mountinfo, run inside a world with ``extra`` read-only mounts."""
    try:
        world = World.start(extra_mounts=extra)
    except WorldUnavailable as exc:
        pytest.skip(str(exc))
    try:
        (tmp_path / "home").mkdir(exist_ok=True)
        (tmp_path / "work").mkdir(exist_ok=True)
        script = ("cat /proc/self/mountinfo; cat /etc/resolv.conf; ls -d /etc/passwd; "
                  "touch /mnt/snap/x 2>/dev/null && echo WROTE; true")
        proc = world.run([sys.executable, "-m", "corral", "run", "--net", "none", "--",
                          "sh", "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path / "work"),
                         env={"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    finally:
        world.close()
    assert proc.returncode == 0, proc.stderr
    assert "nameserver" in proc.stdout and "/etc/passwd" in proc.stdout
    return proc.stdout


@pytest.mark.namespaces
def test_sixty_read_only_host_mounts_add_no_overlay_and_a_single_bind(tmp_path):
    base = _sandbox_mounts(0, tmp_path)
    out = _sandbox_mounts(SNAPS, tmp_path)
    snaps = [line for line in out.splitlines() if " /mnt/snap/" in line]
    assert len(snaps) == SNAPS  # each carried by the one recursive bind of /mnt
    assert not [line for line in snaps if " - overlay " in line]
    assert all(line.split()[5].split(",")[0] == "ro" for line in snaps)
    assert "WROTE" not in out
    count = lambda text: sum(1 for line in text.splitlines() if " - " in line)  # noqa: E731
    assert count(out) - count(base) <= SNAPS + 3


LEAVES_OPEN = r"""
import os, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.create_connection((host, port), timeout=10) for _ in range(count)]
for s in socks:
    s.sendall(b"x")
    assert s.recv(1) == b"x"
print(count, flush=True)
os._exit(0)  # every connection still open: the sandbox's teardown ends them
"""


@pytest.mark.namespaces
@pytest.mark.network
def test_teardown_loses_no_event_of_connections_left_open(world, tmp_path):
    from net_support import PY, corral
    from world import ECHO_V4, PORT_ECHO

    count = 20
    out = corral(world, tmp_path, ["--allow", "%s:%d" % (ECHO_V4, PORT_ECHO)],
                 [PY, "-c", LEAVES_OPEN, ECHO_V4, str(PORT_ECHO), str(count)])
    assert out.proc.returncode == 0 and out.proc.stdout.split() == [str(count)], out.proc.stderr
    connects = [e for e in out.events if e["type"] == "connect"]
    closes = [e["id"] for e in out.events if e["type"] == "close"]
    assert len(connects) == count and all(e["verdict"] == "allow" for e in connects)
    assert sorted(closes) == sorted(e["id"] for e in connects)  # exactly one close each
    assert [e["type"] for e in out.events][0] == "sandbox_start"
    assert [e["type"] for e in out.events][-1] == "sandbox_exit"
