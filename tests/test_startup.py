"""Start-up (issue 11): it does not grow with the host's mount table (a real world
whose /etc/resolv.conf is a bind mount and that has 60 more read-only mounts), and
nothing on the run path forks a helper program."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from corral.fs.plan import FsSpec, build_plan
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


def _sandbox_mounts(extra, tmp_path, mount_ns=True, script=""):
    """The sandbox's mountinfo, run inside a world with ``extra`` read-only mounts
    (``mount_ns``: with its own /etc/resolv.conf, a bind mount)."""
    try:
        world = World.start(extra_mounts=extra, mount_ns=mount_ns)
    except WorldUnavailable as exc:
        pytest.skip(str(exc))
    try:
        (tmp_path / "home").mkdir(exist_ok=True)
        (tmp_path / "work").mkdir(exist_ok=True)
        script = ("cat /proc/self/mountinfo; cat /etc/resolv.conf; ls -d /etc/passwd; "
                  "touch /mnt/snap/x 2>/dev/null && echo WROTE; " + script + "true")
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


def _unreadable(top):
    """What a copy of ``top`` cannot carry and shows by a read-only bind: files the user
    cannot read, directories it cannot enter."""
    found, todo = 0, [top]
    while todo:
        with os.scandir(todo.pop()) as it:
            for entry in it:
                if entry.is_symlink():
                    continue
                if entry.is_dir():
                    if os.access(entry.path, os.X_OK):
                        todo.append(entry.path)
                    else:
                        found += 1
                elif entry.is_file() and not os.access(entry.path, os.R_OK):
                    found += 1
    return found


@pytest.mark.namespaces
def test_a_bind_mounted_resolv_conf_adds_a_handful_of_mounts_and_etc_stays_writable(tmp_path):
    # `ip netns exec` and containers bind a file over /etc/resolv.conf; overlayfs refuses
    # /etc as a lower layer then (a locked mount below), which used to split /etc into
    # ~140 mounts (~90 overlays): now one overlay of a private copy
    marker = "corral-startup-%d" % os.getpid()
    script = ("echo x > /etc/profile.d/%s.sh && echo ETC-WRITTEN; cat /etc/shadow 2>/dev/null "
              "|| echo SHADOW-REFUSED; " % marker)
    plain = _sandbox_mounts(0, tmp_path, mount_ns=False, script=script)
    netns = _sandbox_mounts(0, tmp_path, script=script)
    count = lambda text: sum(1 for line in text.splitlines() if " - " in line)  # noqa: E731
    assert count(netns) <= count(plain) + 3 + _unreadable("/etc")
    etc = [line for line in netns.splitlines() if line.split()[4:5] == ["/etc"]]
    assert len(etc) == 1 and " - overlay " in etc[0]
    assert "nameserver 198.51.100.53" in netns  # the world's resolv.conf, carried
    assert "ETC-WRITTEN" in netns and "SHADOW-REFUSED" in netns
    assert not os.path.exists("/etc/profile.d/%s.sh" % marker)


@pytest.fixture
def box(tmp_path):
    from test_fs_mounts import Box

    # in the user's home, not /var/tmp: the pretend mount below splits every directory
    # above it into its entries, and other users' entries of /var/tmp come and go
    b = Box(os.path.expanduser("~"), tmp_path)
    yield b
    shutil.rmtree(b.home, ignore_errors=True)


def _snapshot_plan(box, top):
    """A plan whose ``--overlay top`` is a snapshot: a (pretend) file mount below it."""
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read() + "999 1 0:999 /x %s/bound.conf rw - tmpfs tmpfs rw\n" % top
    spec = FsSpec(cwd=box.proj, home=box.home, scratch=box.scratch, paths=[("overlay", top)])
    plan = build_plan(spec, mountinfo).to_json()
    assert [op for op in plan if op["op"] == "snapshot" and op["path"] == top]
    return plan


def _tricky_dir(box):
    """A host directory with what a copy must not carry as it is."""
    top = box.path("conf")
    box.write("conf/bound.conf", "bound\n")
    box.write("conf/sub/b.txt", "b\n")
    os.symlink("bound.conf", top + "/link")
    box.write("conf/secret", "s3cret\n")
    os.chmod(top + "/secret", 0)
    box.write("conf/locked/inside", "hidden\n")
    os.chmod(top + "/locked", 0)
    os.mkfifo(top + "/fifo")
    return top


CONNECT = ("import socket, sys; s = socket.socket(socket.AF_UNIX); "
           "sys.exit(0 if s.connect_ex(sys.argv[1]) == 0 else 3)")


@pytest.mark.namespaces
def test_snapshot_copy_refuses_host_sockets_and_keeps_unreadable_entries_unreadable(box):
    top = _tricky_dir(box)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(top + "/ctl.sock")
    listener.listen()
    try:
        script = ('cd %s; cat bound.conf sub/b.txt link; cat secret || echo SECRET-REFUSED; '
                  'ls locked || echo LOCKED-REFUSED; test -e fifo || echo NO-FIFO; '
                  '%s -c "%s" ctl.sock; echo connect=$?; echo new > new.txt && echo WROTE'
                  % (top, sys.executable, CONNECT))
        out = box.run(script, plan=_snapshot_plan(box, top), env={"PATH": "/usr/bin:/bin"})
    finally:
        listener.close()
        os.chmod(top + "/locked", 0o700)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["bound", "b", "bound"]
    for word in ("SECRET-REFUSED", "LOCKED-REFUSED", "NO-FIFO", "connect=3", "WROTE"):
        assert word in out.stdout, out.stdout + out.stderr
    assert "s3cret" not in out.stdout and "hidden" not in out.stdout
    assert not os.path.exists(top + "/new.txt")
    # recorded in the upper layer of the topmost overlay of top (the pretend mount makes
    # every directory above it hold a mount: the base view copies top too, below)
    overlays = box.manifest()["overlays"]
    upper = max((u for u, host in overlays.items() if host == top), key=lambda u: int(u[6:]))
    assert os.path.exists(os.path.join(box.scratch, upper, "new.txt"))


@pytest.mark.namespaces
def test_snapshot_shows_a_large_subdirectory_as_an_overlay_of_its_own(box):
    # copying costs per entry, an overlay per mount: /etc/alternatives (~400 symlinks)
    # is cheaper as the overlay the split would have made
    from corral.spawn.mounts import SNAPSHOT_COPY_AT_MOST

    top = _tricky_dir(box)
    for i in range(SNAPSHOT_COPY_AT_MOST + 1):
        box.write("conf/many/f%d" % i, "%d\n" % i)
    try:
        out = box.run("cd %s; cat bound.conf many/f7; ls many | wc -l; echo x > many/new && "
                      "echo WROTE" % top, plan=_snapshot_plan(box, top))
    finally:
        os.chmod(top + "/locked", 0o700)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bound", "7", str(SNAPSHOT_COPY_AT_MOST + 1), "WROTE"]
    assert not os.path.exists(top + "/many/new")
    overlays = box.manifest()["overlays"]
    upper = max((u for u, host in overlays.items() if host == top + "/many"),
                key=lambda u: int(u[6:]))
    assert os.path.exists(os.path.join(box.scratch, upper, "new"))


@pytest.mark.parametrize("why", ["over its bounds", "a directory it may enter but not list"])
@pytest.mark.namespaces
def test_snapshot_that_cannot_copy_falls_back_to_the_split(box, why):
    top = _tricky_dir(box)
    plan = _snapshot_plan(box, top)
    if why == "over its bounds":
        for op in plan:
            if op["op"] == "snapshot":
                op["max_entries"] = 2
    else:
        box.write("conf/blind/x", "x\n")
        os.chmod(top + "/blind", 0o311)
    try:
        out = box.run("cd %s; cat bound.conf sub/b.txt; cat secret || echo SECRET-REFUSED; "
                      "test -e fifo || echo NO-FIFO" % top, plan=plan)
    finally:
        os.chmod(top + "/locked", 0o700)
        if os.path.exists(top + "/blind"):
            os.chmod(top + "/blind", 0o700)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["bound", "b"]
    assert "SECRET-REFUSED" in out.stdout and "NO-FIFO" in out.stdout
    assert top + "/sub" in box.manifest()["overlays"].values()  # split: its own overlay


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
