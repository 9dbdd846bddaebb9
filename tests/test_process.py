"""Process model (DESIGN §2, issue 2 items 2, 3, 6): exit status, signals,
pid 1, fail-closed supervision, timeouts, status fd.  Real namespaces, run
through the CLI as a user would."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import corral

pytestmark = pytest.mark.namespaces

NONE = ("run", "--net", "none", "--")


def test_exit_status_is_the_commands():
    assert corral(*NONE, "sh", "-c", "exit 7").returncode == 7
    assert corral(*NONE, "true").returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_killed_by_signal_exits_128_plus_n(sig):
    result = corral(*NONE, "sh", "-c", "kill -%d $$" % sig)
    assert result.returncode == 128 + sig


def test_command_runs_as_pid_1s_child_in_own_pid_namespace():
    out = corral(*NONE, "sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'").stdout.split()
    assert out[0] == b"2"  # pid 1 is corral's init, the command is its first child
    assert int(out[1]) <= 4  # init, sh, ls (and grep): none of the host's processes


def test_uid_is_mapped_to_itself_and_root_maps_to_zero():
    assert corral(*NONE, "id", "-u").stdout.strip() == str(os.getuid()).encode()
    root = corral("run", "--net", "none", "--root", "--", "id", "-u")
    assert root.stdout.strip() == b"0"


def test_hostname_and_cwd(tmp_path):
    result = corral("run", "--net", "none", "--hostname", "box", "--cwd", str(tmp_path), "--",
                    "sh", "-c", "hostname; pwd")
    assert result.stdout.split() == [b"box", str(tmp_path).encode()]


def test_command_not_found_exits_127_with_one_line():
    result = corral(*NONE, "no-such-command-xyz")
    assert result.returncode == 127
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "no-such-command-xyz" in lines[0] and "Traceback" not in lines[0]


def test_pid1_reaps_orphaned_zombies():
    script = "for i in 1 2 3 4 5; do sh -c 'sleep 0.01 &'; done; sleep 0.5; " \
             "grep -l '^State:.*Z' /proc/[0-9]*/status | wc -l"
    assert corral(*NONE, "sh", "-c", script).stdout.strip() == b"0"


@pytest.mark.parametrize("net", ["none", "filtered"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                                 signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH])
def test_signal_sent_to_corral_reaches_the_command(sig, net, tmp_path):
    # The command reports each signal it gets and exits on the second line.
    script = (
        "import signal, sys, time\n"
        "def got(n, f):\n"
        "    print('got', n, flush=True); sys.exit(0)\n"
        "signal.signal(%d, got)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n" % sig
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "run", "--net", net, "--", sys.executable, "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(sig)
        assert proc.stdout.readline() == b"got %d\n" % sig
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


def _host_pids_with(marker):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def test_supervisor_sigkill_kills_double_forked_setsid_daemon(tmp_path):
    marker = "corral-daemon-%d-%d" % (os.getpid(), time.monotonic_ns())
    ready = tmp_path / "ready"
    script = (
        "setsid sh -c 'sh -c \"exec -a %s sleep 300\" & ' & sleep 0.3; touch %s; sleep 300"
        % (marker, ready)
    )
    proc = subprocess.Popen([sys.executable, "-m", "corral", "run", "--net", "none",
                             "--rw", str(tmp_path), "--", "sh", "-c", script])
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline, "sandbox never became ready"
            time.sleep(0.05)
        assert _host_pids_with(marker), "the daemon should be running"
        proc.kill()  # SIGKILL the supervisor: no chance to clean up
        proc.wait()
        deadline = time.monotonic() + 1.0
        while _host_pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _host_pids_with(marker) == [], "daemon survived its supervisor"
    finally:
        proc.kill()
        for pid in _host_pids_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_timeout_sends_sigterm_and_exits_124():
    start = time.monotonic()
    result = corral("run", "--net", "none", "--timeout", "0.5", "--", "sleep", "30")
    assert result.returncode == 124
    assert time.monotonic() - start < 10
    assert b"timed out after 0.5s" in result.stderr


def test_timeout_escalates_to_sigkill_when_term_is_ignored():
    result = corral("run", "--net", "none", "--timeout", "0.5", "--kill-grace", "0.5", "--",
                    "sh", "-c", "trap '' TERM; sleep 30 & wait; sleep 30")
    assert result.returncode == 137
    assert b"SIGKILL" in result.stderr


def test_json_status_fd_reports_child_pid_and_exit_code():
    r, w = os.pipe()
    result = corral("run", "--net", "none", "--json-status-fd", str(w), "--", "sh", "-c", "exit 3",
                    pass_fds=(w,))
    os.close(w)
    with os.fdopen(r) as f:
        lines = [json.loads(line) for line in f]
    assert result.returncode == 3
    assert isinstance(lines[0]["child-pid"], int) and lines[0]["child-pid"] > 1
    assert lines[-1] == {"exit-code": 3}


def test_net_none_has_only_loopback():
    result = corral(*NONE, "cat", "/proc/net/dev")
    names = [line.split(":")[0].strip() for line in result.stdout.decode().splitlines()[2:]]
    assert names == ["lo"]


def test_net_host_shares_the_network_namespace():
    result = corral("run", "--net", "host", "--", "readlink", "/proc/self/ns/net")
    assert result.stdout.strip() == os.readlink("/proc/self/ns/net").encode()


def test_no_new_privs_is_set():
    result = corral(*NONE, "grep", "NoNewPrivs", "/proc/self/status")
    assert result.stdout.split() == [b"NoNewPrivs:", b"1"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, needle", [
    (("run", "--bogus", "--", "true"), "--bogus"),
    (("run", "true"), "missing '--'"),
    (("run", "--"), "no command"),
    (("run", "--rw", "/no/such/path-xyz", "--", "true"), "/no/such/path-xyz"),
    (("run", "--scratch", "/proc/no-such-dir/x", "--", "true"), "scratch"),
    (("run", "--timeout", "-1", "--", "true"), "timeout"),
    (("run", "--env", "1BAD", "--", "true"), "--env"),
    (("frobnicate",), "frobnicate"),
])
def test_bad_input_is_one_line_without_traceback(args, needle):
    result = corral(*args)
    assert result.returncode == 2
    text = result.stderr.decode()
    assert len(text.strip().splitlines()) == 1, text
    assert needle in text and "Traceback" not in text
    assert text.startswith("corral: ")


def test_unwritable_scratch_dir_is_a_one_line_error(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o500)
    result = corral("run", "--net", "none", "--scratch", str(scratch), "--", "true")
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "not writable" in lines[0] and "--scratch" in lines[0]


def _tun_holders():
    """Our processes that hold a /dev/net/tun fd (a sandbox's TAP device)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink("/proc/%s/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%s/fd" % pid)]
        except OSError:
            continue  # gone, or not ours
        if "/dev/net/tun" in links:
            found.append(int(pid))
    return found


@pytest.mark.parametrize("net", ["filtered", "none"])
def test_what_corral_leaves_to_finish_after_its_exit_finishes_soon(tmp_path, net):
    # `corral run` exits without waiting for its scratch tree's removal nor for its TAP
    # device's teardown; both happen in helpers that must not outlive it for long.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = set(_tun_holders())
    result = corral("run", "--net", net, "--scratch", str(scratch), "--", "sh", "-c",
                    "mkdir -p /tmp/a/b && echo x > /tmp/a/b/f && echo x > $HOME/.corral-probe || true")
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    while (os.listdir(scratch) or set(_tun_holders()) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(scratch) == []
    assert set(_tun_holders()) - before == set()
