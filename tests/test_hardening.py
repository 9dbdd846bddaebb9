"""Issue 5 items 1-3: the seccomp filter, capabilities, nesting and limits,
each tested as the attack it stops.  Real namespaces, through the CLI; the
attacks run inside as small Python programs.  Where the kernel would refuse
an attack by itself, a control run with ``--seccomp off`` shows what the
filter changes."""

import ctypes
import errno
import fcntl
import os
import platform
import pty
import struct
import subprocess
import sys
import termios

import pytest

from conftest import corral

pytestmark = pytest.mark.namespaces

NONE = ("run", "--net", "none")
PY = sys.executable

# syscall(nr, args...) for each "nr,arg,..." argument; prints ok or the errno name.
SYSCALLS = """
import ctypes, errno, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
for spec in sys.argv[1:]:
    parts = [int(x, 0) for x in spec.split(",")]
    rc = libc.syscall(*[ctypes.c_long(a) for a in parts])
    print(errno.errorcode.get(ctypes.get_errno(), "?") if rc == -1 else "ok")
"""


def inside(code, *args, options=(), **kw):
    return corral(*NONE, *options, "--", PY, "-c", code, *args, **kw)


def _nr(name):
    lib = ctypes.CDLL("libseccomp.so.2")
    number = lib.seccomp_syscall_resolve_name(name.encode())
    assert number >= 0, name
    return number


def syscall_results(calls, options=()):
    """Run raw system calls inside; return their results (ok / errno name)."""
    specs = [",".join(str(v) for v in (_nr(name),) + args) for name, args in calls]
    result = inside(SYSCALLS, *specs, options=options)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().split()


# ------------------------------------------------------------ terminal injection

INJECT = """
import errno, fcntl, sys, termios
try:
    fcntl.ioctl(0, termios.TIOCSTI, b"x")
    print("injected")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""

INJECT_HIGH_BITS = """
import ctypes, errno, termios
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
char = ctypes.c_char(b"x")
rc = libc.syscall(ctypes.c_long(%d), ctypes.c_long(0),
                  ctypes.c_ulong(termios.TIOCSTI | 0x100000000), ctypes.byref(char))
print("injected" if rc == 0 else errno.errorcode[ctypes.get_errno()])
"""

TIOCLINUX = """
import errno, fcntl
try:
    fcntl.ioctl(0, 0x541C, b"\\x06\\x00")
    print("ok")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


def _on_a_terminal(code, options=()):
    """Run ``code`` in corral with a pty as stdin that is the controlling
    terminal (as when a user types `corral run` in a shell)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [PY, "-m", "corral", *NONE, *options, "--", PY, "-c", code],
            stdin=slave, capture_output=True, timeout=60, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode().strip()


def test_tiocsti_terminal_injection_is_blocked():
    assert _on_a_terminal(INJECT) == "EPERM"
    # Control: the same program, unfiltered, reaches the terminal (or the
    # kernel's dev.tty.legacy_tiocsti=0 refuses with EIO): EPERM above is ours.
    assert _on_a_terminal(INJECT, ("--seccomp", "off")) in ("injected", "EIO")


def test_tiocsti_with_high_bits_set_is_blocked():
    """CVE-2019-10063: the kernel truncates the request to 32 bits, so a
    filter comparing 64 bits misses TIOCSTI | 1 << 32."""
    code = INJECT_HIGH_BITS % _nr("ioctl")
    assert _on_a_terminal(code) == "EPERM"
    assert _on_a_terminal(code, ("--seccomp", "off")) in ("injected", "EIO")


def test_tioclinux_is_blocked():
    assert _on_a_terminal(TIOCLINUX) == "EPERM"
    assert _on_a_terminal(TIOCLINUX, ("--seccomp", "off")) != "EPERM"  # a pty is no VT


def test_terminal_still_works_for_ordinary_ioctls():
    code = "import os, termios; termios.tcgetattr(0); print(os.get_terminal_size(0).columns >= 0)"
    assert _on_a_terminal(code) == "True"


# ------------------------------------------------------------ denied system calls

# (name, harmless arguments, the result unfiltered differs from EPERM on
# Linux 6.x as an unprivileged user: then the control run proves the filter).
DENIED_CALLS = [
    ("keyctl", (0, -3, 0), True),  # KEYCTL_GET_KEYRING_ID of the session keyring
    ("add_key", (0, 0, 0, 0, 0), True),
    ("request_key", (0, 0, 0, 0), True),
    ("bpf", (0, 0, 0), True),
    ("perf_event_open", (0, 0, -1, -1, 0), True),
    ("open_by_handle_at", (-1, 0, 0), True),
    ("userfaultfd", (1,), False),  # UFFD_USER_MODE_ONLY
    ("kexec_load", (0, 0, 0, 0), False),
    ("kexec_file_load", (-1, -1, 0, 0, 0), False),
    ("init_module", (0, 0, 0), False),
    ("finit_module", (-1, 0, 0), False),
    ("delete_module", (0, 0), False),
    ("iopl", (3,), False),
    ("ioperm", (0, 1, 1), False),
    ("swapon", (0, 0), False),
    ("swapoff", (0,), False),
    ("reboot", (0, 0, 0, 0), False),
]


def test_keyctl_is_blocked():
    assert syscall_results([("keyctl", (0, -3, 0))]) == ["EPERM"]
    assert syscall_results([("keyctl", (0, -3, 0))], ("--seccomp", "off")) == ["ok"]


def test_bpf_is_blocked():
    assert syscall_results([("bpf", (0, 0, 0))]) == ["EPERM"]
    assert syscall_results([("bpf", (0, 0, 0))], ("--seccomp", "off")) != ["EPERM"]


def test_kernel_attack_surface_syscalls_are_blocked():
    calls = [(name, args) for name, args, _ in DENIED_CALLS]
    assert syscall_results(calls) == ["EPERM"] * len(calls)
    unfiltered = syscall_results(calls, ("--seccomp", "off"))
    for (name, _, differs), result in zip(DENIED_CALLS, unfiltered):
        if differs:
            assert result != "EPERM", name


@pytest.mark.skipif(platform.machine() != "x86_64", reason="i386/x32 ABIs are x86_64's")
def test_keyctl_via_the_32bit_and_x32_abis_is_blocked():
    """The filter covers the compat ABIs too: keyctl through `int 0x80` (i386
    numbering, 288) and through the x32 bit."""
    code = """
import ctypes, mmap
# push rbx; mov eax,288 (i386 keyctl); mov ebx,0; mov ecx,-3; xor edx,edx; int 0x80; pop rbx; ret
text = bytes.fromhex("53b820010000bb00000000b9fdffffff31d2cd805bc3")
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(text)
print(ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))())
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
rc = libc.syscall(ctypes.c_long(0x40000000 + 250), ctypes.c_long(0), ctypes.c_long(-3), ctypes.c_long(0))
print(ctypes.get_errno() if rc == -1 else "ok")
"""
    filtered = inside(code)
    assert filtered.returncode == 0, filtered.stderr
    i386, x32 = filtered.stdout.split()
    assert int(i386) == -errno.EPERM
    assert int(x32) == errno.EPERM
    unfiltered = inside(code, options=("--seccomp", "off"))
    if unfiltered.returncode == 0:  # a kernel with IA32 emulation
        assert int(unfiltered.stdout.split()[0]) > 0  # the keyring's id


def test_threads_and_subprocesses_still_work_with_clone3_denied():
    """clone3 gets ENOSYS so that libc falls back to clone (whose flags the
    filter can read): threads and fork/exec must keep working."""
    code = ("import threading, subprocess; out = []; t = threading.Thread(target=out.append, "
            "args=(1,)); t.start(); t.join(); "
            "print(out, subprocess.run(['true']).returncode)")
    result = inside(code)
    assert result.stdout.split() == [b"[1]", b"0"], result.stderr
    assert syscall_results([("clone3", (0, 0))]) == ["ENOSYS"]


def test_seccomp_file_denies_extra_syscalls(tmp_path):
    rules = tmp_path / "deny.json"
    rules.write_text('["mkdir", "mkdirat"]')
    denied = corral(*NONE, "--seccomp", str(rules), "--", "mkdir", "/tmp/x")
    assert denied.returncode != 0 and b"Operation not permitted" in denied.stderr
    assert syscall_results([("keyctl", (0, -3, 0))], ("--seccomp", str(rules))) == ["EPERM"]
    assert corral(*NONE, "--", "mkdir", "/tmp/x").returncode == 0


@pytest.mark.parametrize("content", ['{"deny": 1}', "not json", '["no such call!"]'])
def test_bad_seccomp_file_is_a_usage_error(tmp_path, content):
    rules = tmp_path / "deny.json"
    rules.write_text(content)
    result = corral(*NONE, "--seccomp", str(rules), "--", "true")
    assert result.returncode == 2
    assert b"--seccomp" in result.stderr and b"Traceback" not in result.stderr


def test_unknown_syscall_in_seccomp_file_fails_closed(tmp_path):
    rules = tmp_path / "deny.json"
    rules.write_text('["no_such_syscall_xyz"]')
    result = corral(*NONE, "--seccomp", str(rules), "--", "echo", "ran")
    assert result.returncode == 125 and b"ran" not in result.stdout
    assert b"no_such_syscall_xyz" in result.stderr


def test_seccomp_off_loads_no_filter():
    out = corral(*NONE, "--seccomp", "off", "--", "grep", "^Seccomp:", "/proc/self/status")
    assert out.stdout.split() == [b"Seccomp:", b"0"]
    out = corral(*NONE, "--", "grep", "^Seccomp:", "/proc/self/status")
    assert out.stdout.split() == [b"Seccomp:", b"2"]


def test_truncated_or_missing_seccomp_program_from_stage1_is_refused():
    """Pid 1 gets the command's filter from stage-1 over a pipe (stage-1 builds it
    while pid 1 mounts).  A program cut short (stage-1 killed mid-write), with a
    wrong length, or missing (stage-1 could not build it or set up the network,
    and said why; or sent "no filter" where one is asked for) is refused: pid 1
    starts nothing rather than load a shorter, weaker filter, or none."""
    from corral.spawn import harden, stage1

    spec = {"harden": {"seccomp": "default"}}
    program = harden.seccomp_program(spec["harden"])
    whole = struct.pack("I", len(program)) + program

    def received(sent):
        r, w = os.pipe()
        os.write(w, sent)
        os.close(w)
        return stage1._receive_program(spec, r)

    nothing = struct.pack("I", 0)  # what stage-1 sends with --seccomp off
    for sent in (b"", whole[:2], whole[:-8], struct.pack("I", len(program) - 8) + program, program,
                 nothing):
        with pytest.raises(stage1.Unfiltered):
            received(sent)
    assert received(whole) == program
    spec = {"harden": {"seccomp": "off"}}
    assert received(nothing) is None
    with pytest.raises(stage1.Unfiltered):
        received(b"")  # stage-1 failed (and said why)


# ------------------------------------------------------------ mounts, nesting

NESTED_MOUNT = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def name(rc):
    return "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
print("mount", name(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
print("fsopen", name(libc.syscall(ctypes.c_long(%d), b"tmpfs", 0)))
print("unshare", name(libc.unshare(0x10000000 | 0x00020000)))  # NEWUSER | NEWNS
print("mount", name(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
""" % _nr("fsopen")


def test_mount_after_setup_is_blocked():
    """The command may not mount, not even as root of a user namespace it
    creates itself (which the filter refuses anyway)."""
    out = inside(NESTED_MOUNT, options=("--root",)).stdout.decode().split("\n")
    assert out[:4] == ["mount EPERM", "fsopen EPERM", "unshare EPERM", "mount EPERM"]
    # Control: unfiltered, a nested user namespace gives the power to mount.
    out = inside(NESTED_MOUNT, options=("--seccomp", "off")).stdout.decode().split("\n")
    assert out[2:4] == ["unshare ok", "mount ok"]


def test_userns_nesting_is_blocked():
    result = corral(*NONE, "--", "unshare", "-U", "true")
    assert result.returncode != 0 and b"Operation not permitted" in result.stderr
    assert syscall_results([("setns", (-1, 0))]) == ["EPERM"]


def test_corral_inside_corral_is_refused_with_a_clear_message():
    result = corral(*NONE, "--", PY, "-m", "corral", *NONE, "--", "echo", "inner ran")
    assert result.returncode == 125 and b"inner ran" not in result.stdout
    message = result.stderr.decode()
    assert "corral cannot nest inside corral" in message
    assert "Fix: --allow-nested on the outer sandbox" in message


def test_allow_nested_runs_an_equally_strict_inner_corral():
    result = corral(*NONE, "--allow-nested", "--", PY, "-m", "corral", *NONE, "--", "sh", "-c",
                    "echo inner ran; grep ^Seccomp_filters: /proc/self/status; unshare -U true")
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "inner ran"
    assert lines[1].split() == ["Seccomp_filters:", "2"]  # the outer filter and its own
    assert b"Operation not permitted" in result.stderr  # the inner one blocks nesting again


# ------------------------------------------------------------ capabilities

POWERS = """
import ctypes, errno, os, socket
def attempt(what, func):
    try:
        func()
        print(what, "ok")
    except OSError as exc:
        print(what, errno.errorcode[exc.errno])
caps = dict(line.split(":") for line in open("/proc/self/status") if line.startswith("Cap"))
print("caps", sorted({v.strip() for v in caps.values()}))
attempt("sethostname", lambda: socket.sethostname("owned"))
attempt("raw-socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("bind-80", lambda: socket.socket().bind(("127.0.0.1", 80)))
attempt("mknod", lambda: os.mknod("/tmp/null", 0o600 | 0o020000, os.makedev(1, 3)))
attempt("chroot", lambda: os.chroot("/tmp"))
"""
POWERLESS = [
    "caps ['0000000000000000']", "sethostname EPERM", "raw-socket EPERM", "bind-80 EACCES",
    "mknod EPERM", "chroot EPERM",
]


@pytest.mark.parametrize("seccomp", ["default", "off"])
def test_root_inside_is_powerless(seccomp):
    """--root maps the user to uid 0 but leaves no capability at all — not
    thanks to seccomp: the same holds with the filter off."""
    result = inside(POWERS, options=("--root", "--seccomp", seccomp))
    assert result.stdout.decode().splitlines() == POWERLESS, result.stderr
    assert corral(*NONE, "--root", "--", "id", "-u").stdout.strip() == b"0"


def test_root_inside_cannot_change_the_hostname():
    result = corral(*NONE, "--root", "--hostname", "box", "--", "sh", "-c",
                    "hostname owned; hostname")
    assert result.stdout.strip() == b"box" and result.returncode == 0


# ------------------------------------------------------------ limits

FORK_BOMB = """
import errno, os
children, outcome = 0, "no limit hit"
r, w = os.pipe()
for _ in range(200):  # bounded: a real bomb would not stop
    try:
        pid = os.fork()
    except OSError as exc:
        outcome = errno.errorcode[exc.errno]
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # wait until the parent is done, then exit
        os._exit(0)
    children += 1
os.close(w)
print(children, outcome)
"""


def test_fork_bomb_with_pids_limit_hits_eagain():
    result = inside(FORK_BOMB, options=("--pids", "10", "--timeout", "30"))
    children, outcome = result.stdout.split()
    assert outcome == b"EAGAIN"
    assert int(children) == 9  # the command itself is one of the 10


def test_shell_fork_bomb_with_pids_limit_is_contained():
    """A real fork bomb: bounded by --pids, ended by --timeout; the host can
    still start processes meanwhile."""
    bomb = subprocess.Popen([PY, "-m", "corral", *NONE, "--pids", "8", "--timeout", "3",
                             "--kill-grace", "1", "--", "sh", "-c", "(b() { b | b & }; b); exec sleep 20"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert subprocess.run(["true"], timeout=10).returncode == 0
        _, stderr = bomb.communicate(timeout=30)
    finally:
        bomb.kill()
        bomb.wait()
    assert bomb.returncode in (124, 137)  # ended by --timeout, everything inside with it
    assert b"fork" in stderr.lower()  # the shell met the limit


def test_memory_hog_with_memory_limit_gets_enomem():
    code = "b = bytearray(1 << 30); print('allocated')"
    result = inside(code, options=("--memory", "256M"))
    assert result.returncode == 1 and b"MemoryError" in result.stderr
    assert b"allocated" not in result.stdout


def test_cpu_time_limit_kills_a_busy_loop():
    result = inside("while True: pass", options=("--cpu-time", "1", "--timeout", "30"))
    assert result.returncode == 128 + 9  # RLIMIT_CPU at the hard limit: SIGKILL


def test_fsize_limit_stops_a_large_write():
    result = corral(*NONE, "--fsize", "1M", "--", "sh", "-c",
                    "head -c 3000000 /dev/zero > /tmp/big; stat -c %s /tmp/big")
    assert result.stdout.strip() == str(1 << 20).encode()


def test_nofile_limit():
    code = ("import errno\nfiles = []\ntry:\n    for _ in range(1000): files.append(open('/dev/null'))\n"
            "except OSError as exc: print(len(files), errno.errorcode[exc.errno])")
    count, outcome = inside(code, options=("--nofile", "20")).stdout.split()
    assert outcome == b"EMFILE" and int(count) < 20


@pytest.mark.parametrize("option, value", [("--memory", "lots"), ("--pids", "0"),
                                           ("--fsize", "-1"), ("--cpu-time", "x")])
def test_bad_limit_is_a_usage_error(option, value):
    result = corral(*NONE, option, value, "--", "true")
    assert result.returncode == 2 and option.encode() in result.stderr


def test_limit_above_the_hard_limit_is_refused_before_running():
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard RLIMIT_NOFILE to exceed")
    result = corral(*NONE, "--nofile", str(hard + 1), "--", "echo", "ran")
    assert result.returncode == 125 and b"ran" not in result.stdout
    assert b"--nofile" in result.stderr and b"hard limit" in result.stderr


def test_tmpfs_filler_is_bounded():
    st = corral(*NONE, "--", PY, "-c", "import os; s = os.statvfs('/tmp'); "
                "print(s.f_blocks * s.f_frsize)").stdout
    assert int(st) <= 1 << 30  # the default cap, not half the host's RAM


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
def test_tmpfs_filler_hits_enospc_at_tmp_size(where):
    filler = (
        "import errno\n"
        "f = open(%r + '/fill', 'wb')\n"
        "try:\n"
        "    for _ in range(64):\n"
        "        f.write(b'x' * (1 << 20)); f.flush()\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode[exc.errno])\n" % where
    )
    result = corral("run", "--net", "none", "--tmp-size", "8M", "--", PY, "-c", filler)
    assert result.stdout.strip() == b"ENOSPC"


# ------------------------------------------------------------ pure parts


@pytest.mark.parametrize("text, size", [("512M", 512 << 20), ("2G", 2 << 30), ("1048576", 1 << 20),
                                        ("64k", 64 << 10), ("1GiB", 1 << 30), (4096, 4096)])
def test_sizes(text, size):
    from corral.hardening import parse_size

    assert parse_size(text) == size


def _fake_cgroup(tmp_path, controllers, writable=True, v1=False):
    root = tmp_path / "cgroup"
    here = root / "user.slice" / "app.scope"
    here.mkdir(parents=True)
    if not v1:
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (here / "cgroup.controllers").write_text(controllers)
    (here / "cgroup.procs").write_text("")
    if not writable:
        here.chmod(0o555)
        (here / "cgroup.procs").chmod(0o444)
    status = tmp_path / "self_cgroup"
    status.write_text("0::/user.slice/app.scope\n")
    return str(root), str(status)


def test_cgroup_delegation_detection(tmp_path):
    from corral.hardening import cgroup_delegation

    ok, detail = cgroup_delegation(*_fake_cgroup(tmp_path / "a", "memory pids\n"))
    assert ok and "delegated" in detail
    ok, detail = cgroup_delegation(*_fake_cgroup(tmp_path / "b", "cpu\n"))
    assert not ok and "memory, pids" in detail
    ok, detail = cgroup_delegation(*_fake_cgroup(tmp_path / "c", "memory pids\n", v1=True))
    assert not ok and "v1" in detail
    if os.getuid() != 0:
        ok, detail = cgroup_delegation(*_fake_cgroup(tmp_path / "d", "memory pids\n", writable=False))
        assert not ok and "not delegated" in detail


def test_doctor_says_whether_cgroup_delegation_is_available():
    from corral import doctor
    from corral.hardening import cgroup_delegation

    check = next(c for c in doctor.checks() if c.name == "cgroup v2 delegation")
    available = cgroup_delegation()[0]
    assert check.optional and check.ok == available
    assert check.detail.startswith("not available") != available
    assert check.status == ("ok" if available else "warn")


def test_library_mode_gets_the_same_hardening():
    """corral.enter(): the calling Python program goes on inside, with no
    execve in between — it must lose its capabilities and get the filter."""
    code = ("import corral\ncorral.enter(corral.Config(net='none'))\n"
            "s = dict(l.split(':\\t') for l in open('/proc/self/status').read().splitlines() "
            "if ':\\t' in l)\nprint(s['Seccomp'], s['CapEff'], s['CapBnd'])\n"
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.unshare(0x10000000), ctypes.get_errno())")
    result = subprocess.run([PY, "-c", code], capture_output=True, timeout=60)
    lines = result.stdout.decode().splitlines()
    assert lines == ["2 0000000000000000 0000000000000000", "-1 %d" % errno.EPERM], result.stderr
