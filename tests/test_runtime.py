"""Running sandboxes (issue 4, item 6): `corral ps`, `logs`, `stop`, `exec`, as a user
runs them, against real sandboxes.  Each test gets its own state directory
(XDG_RUNTIME_DIR in a temp dir).  The network policy test runs the sandbox in the
test world (tests/world.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from world import ECHO_V4, HELLO_BODY, HTTP_V4

pytestmark = pytest.mark.namespaces

PY = sys.executable
HERE = Path(__file__).resolve().parent
DEADLINE = 20.0  # seconds: bound for anything that should take well under one


@pytest.fixture
def env(tmp_path):
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    return dict(os.environ, XDG_RUNTIME_DIR=str(runtime))


def corral(env, *args, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run([PY, "-m", "corral", *args], env=env, **kw)


def start(env, *options, argv, **kw):
    """`corral run OPTIONS -- ARGV` in the background."""
    return subprocess.Popen([PY, "-m", "corral", "run", *options, "--", *argv], env=env, **kw)


def ps(env, runner=corral):
    out = runner(env, "ps", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_listed(env, proc, runner=corral):
    """The sandbox's `corral ps` row, once it registered (it does when the command starts;
    there is no event to wait on from outside, so poll, bounded)."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        rows = ps(env, runner)
        if rows:
            assert len(rows) == 1, rows
            return rows[0]
        assert proc.poll() is None, f"the sandbox ended early: {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("the sandbox never appeared in `corral ps`")


def state_dir(env):
    return Path(env["XDG_RUNTIME_DIR"]) / "corral"


# ------------------------------------------------------------------ ps


def test_ps_lists_a_running_sandbox_and_forgets_it_when_it_ends(env, stop_all):
    proc = start(env, "--net", "none", argv=["sleep", "30"], stdin=subprocess.DEVNULL)
    stop_all.append(proc)
    row = wait_listed(env, proc)
    assert row["argv"] == ["sleep", "30"]
    assert row["supervisor_pid"] == proc.pid
    assert row["net"] == "none" and row["conns"] == 0
    assert 0 <= row["age"] < DEADLINE
    assert len(row["id"]) == 8 and int(row["id"], 16) >= 0
    assert (state_dir(env) / row["id"] / "info.json").is_file()
    assert os.stat(state_dir(env)).st_mode & 0o777 == 0o700

    table = corral(env, "ps")
    assert table.returncode == 0
    header, line = table.stdout.splitlines()
    assert header.split() == ["ID", "PID", "AGE", "CONNS", "NET", "COMMAND"]
    assert line.split()[0] == row["id"] and line.split()[-2:] == ["sleep", "30"]

    os.kill(proc.pid, signal.SIGTERM)  # the supervisor forwards it
    assert proc.wait(timeout=DEADLINE) == 128 + signal.SIGTERM
    assert ps(env) == []
    assert not (state_dir(env) / row["id"]).exists()  # removed by the supervisor itself


def test_ps_prunes_a_sandbox_whose_supervisor_was_killed(env, stop_all):
    proc = start(env, "--net", "none", argv=["sleep", "30"], stdin=subprocess.DEVNULL)
    stop_all.append(proc)
    row = wait_listed(env, proc)
    proc.kill()  # no chance to clean up: the entry stays behind
    proc.wait(timeout=DEADLINE)
    assert (state_dir(env) / row["id"]).is_dir()
    assert ps(env) == []
    assert not (state_dir(env) / row["id"]).exists()


def test_fallback_state_dir_refuses_a_directory_owned_by_someone_else(tmp_path, monkeypatch):
    from corral import state
    from corral.errors import SandboxError

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert state.state_root() == "/tmp/corral-%d/run" % os.getuid()
    if os.getuid() != 0 and os.stat("/").st_uid == 0:
        with pytest.raises(SandboxError, match="not a directory owned by you"):
            state.open_private("/", ("usr",), create=False)  # root's; any directory not ours


# ------------------------------------------------------------------ logs


def test_logs_shows_start_and_follow_ends_at_exit(env, stop_all):
    proc = start(env, "--net", "none", argv=["sh", "-c", "read line; exit 3"],
                 stdin=subprocess.PIPE, text=True)
    stop_all.append(proc)
    row = wait_listed(env, proc)

    once = corral(env, "logs", row["id"])
    assert once.returncode == 0, once.stderr
    assert "start" in once.stdout and "read line; exit 3" in once.stdout
    raw = corral(env, "logs", "--json", row["id"][:4])  # a unique prefix will do
    (start_event,) = [json.loads(line) for line in raw.stdout.splitlines()]
    assert start_event["type"] == "sandbox_start" and start_event["sandbox_id"] == row["id"]
    assert start_event["argv"] == ["sh", "-c", "read line; exit 3"]

    follow = subprocess.Popen([PY, "-m", "corral", "logs", "-f", "--json", row["id"]], env=env,
                              stdout=subprocess.PIPE, text=True)
    stop_all.append(follow)
    first = json.loads(follow.stdout.readline())
    assert first["type"] == "sandbox_start"
    proc.stdin.write("go\n")
    proc.stdin.close()
    assert proc.wait(timeout=DEADLINE) == 3
    rest = follow.communicate(timeout=DEADLINE)[0]
    assert follow.returncode == 0
    (last,) = [json.loads(line) for line in rest.splitlines()]
    assert (last["type"], last["exit_code"], last["sandbox_id"]) == ("sandbox_exit", 3, row["id"])


# ------------------------------------------------------------------ stop


def test_stop_ends_the_command_with_sigterm(env, stop_all):
    proc = start(env, "--net", "none", argv=["sleep", "30"], stdin=subprocess.DEVNULL)
    stop_all.append(proc)
    row = wait_listed(env, proc)
    t0 = time.monotonic()
    out = corral(env, "stop", "--grace", "5", row["id"])
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 5
    assert proc.poll() == 128 + signal.SIGTERM  # already gone when stop returned
    assert ps(env) == []


def test_stop_kills_a_command_that_ignores_sigterm_after_the_grace(env, stop_all):
    proc = start(env, "--net", "none", argv=["sh", "-c", "trap '' TERM; echo ready; sleep 30"],
                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    stop_all.append(proc)
    assert proc.stdout.readline() == "ready\n"  # the trap is set
    row = wait_listed(env, proc)
    t0 = time.monotonic()
    out = corral(env, "stop", "--grace", "1", row["id"])
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert "SIGKILL" in out.stderr
    assert 1 <= elapsed < 1 + DEADLINE / 2
    assert proc.wait(timeout=DEADLINE) == 128 + signal.SIGKILL


def test_unknown_ids_are_one_line_errors(env):
    for args in (("exec", "abcdef12", "--", "true"), ("stop", "abcdef12"), ("logs", "abcdef12"),
                 ("exec", "not-hex", "--", "true")):
        out = corral(env, *args)
        assert out.returncode == 2, (args, out)
        assert out.stderr.count("\n") == 1 and "corral ps" in out.stderr, out.stderr


# ------------------------------------------------------------------ exec


STATUS = "grep -E '^(NoNewPrivs|Seccomp|CapEff|CapBnd):' /proc/self/status"


def test_exec_sees_the_same_files_names_processes_and_restrictions(env, stop_all):
    main = (f"echo written-by-the-command > /tmp/marker; {STATUS} > /tmp/status; "
            "echo ready; exec sleep 30")
    proc = start(env, "--net", "none", "--hostname", "boxy",
                 argv=["sh", "-c", main], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 text=True)
    stop_all.append(proc)
    assert proc.stdout.readline() == "ready\n"
    row = wait_listed(env, proc)

    # /tmp is the sandbox's private tmpfs: seeing the file proves the same mount namespace.
    out = corral(env, "exec", row["id"], "--", "cat", "/tmp/marker")
    assert (out.returncode, out.stdout) == (0, "written-by-the-command\n"), out.stderr
    assert not Path("/tmp/marker").exists() or Path("/tmp/marker").read_text() != out.stdout

    out = corral(env, "exec", row["id"], "--", "hostname")
    assert out.stdout == "boxy\n"

    # Same pid namespace: the main command is there, pid 1 is corral's.
    out = corral(env, "exec", row["id"], "--", "ps", "-e", "-o", "pid=,args=")
    procs = dict(line.strip().split(None, 1) for line in out.stdout.splitlines())
    assert "sleep 30" in procs.values(), out.stdout
    assert "corral" in procs["1"]
    assert len(procs) <= 4, procs  # pid 1, sleep, ps (and nothing of the host)

    # The command's restrictions (no_new_privs, seccomp, capabilities), exactly.
    out = corral(env, "exec", row["id"], "--", "sh", "-c", STATUS)
    assert "NoNewPrivs:\t1" in out.stdout
    ours = corral(env, "exec", row["id"], "--", "cat", "/tmp/status").stdout
    assert out.stdout == ours

    # The working directory and the environment are the command's; --env adds.
    out = corral(env, "exec", "--env", "EXTRA=1", row["id"], "--", "sh", "-c",
                 'echo "$PWD $EXTRA $CORRAL_SANDBOX"')
    assert out.stdout == f"{os.getcwd()} 1 1\n"

    # Exit statuses, as `corral run` reports them.
    assert corral(env, "exec", row["id"], "--", "sh", "-c", "exit 7").returncode == 7
    assert corral(env, "exec", row["id"], "--", "sh", "-c", "kill -TERM $$").returncode == 143
    missing = corral(env, "exec", row["id"], "--", "no-such-command-here")
    assert missing.returncode == 127 and "command not found" in missing.stderr

    # An exec'd process dies with the sandbox.
    long = subprocess.Popen(
        [PY, "-m", "corral", "exec", row["id"], "--", "sh", "-c", "echo in; exec sleep 30"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    stop_all.append(long)
    assert long.stdout.readline() == "in\n"
    assert corral(env, "stop", row["id"]).returncode == 0
    assert long.wait(timeout=DEADLINE) == 128 + signal.SIGKILL
    assert proc.wait(timeout=DEADLINE) == 128 + signal.SIGTERM


def test_exec_forwards_sigterm(env, stop_all):
    proc = start(env, "--net", "none", argv=["sleep", "30"], stdin=subprocess.DEVNULL)
    stop_all.append(proc)
    row = wait_listed(env, proc)
    inner = subprocess.Popen(
        [PY, "-m", "corral", "exec", row["id"], "--", "sh", "-c",
         "trap 'echo got-term; exit 5' TERM; echo ready; while :; do sleep 0.1; done"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    stop_all.append(inner)
    assert inner.stdout.readline() == "ready\n"
    inner.send_signal(signal.SIGTERM)
    assert inner.wait(timeout=DEADLINE) == 5
    assert inner.stdout.read() == "got-term\n"
    assert proc.poll() is None  # the sandbox itself goes on


def test_exec_from_a_threaded_program_uses_a_fresh_interpreter(env, stop_all):
    """setns into a user namespace refuses a multithreaded caller: the library
    then starts the joining process with exec instead of fork."""
    proc = start(env, "--net", "none", argv=["sh", "-c", "echo hi > /tmp/f; echo ready; sleep 30"],
                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    stop_all.append(proc)
    assert proc.stdout.readline() == "ready\n"
    row = wait_listed(env, proc)
    code = f"""
import threading
threading.Thread(target=threading.Event().wait, daemon=True).start()
from corral import launch, state
assert not launch.can_fork()
print(state.exec_in(state.find({row["id"]!r}), ["sh", "-c", "cat /tmp/f; exit 4"]))
"""
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert (out.stdout, out.returncode) == ("hi\n4\n", 0), out.stderr


# ------------------------------------------------------------------ network policy


@pytest.mark.network
def test_exec_is_subject_to_the_sandbox_network_policy(world, env, stop_all):
    def in_world(env, *args, **kw):
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return world.run([PY, "-m", "corral", *args], env=env, cwd=str(HERE), **kw)

    proc = world.popen([PY, "-m", "corral", "run", "--allow", HTTP_V4, "--", "sleep", "30"],
                       env=env, cwd=str(HERE), stdin=subprocess.DEVNULL)
    stop_all.append(proc)
    row = wait_listed(env, proc, in_world)
    assert row["net"] == "filtered" and row["conns"] == 0

    ok = in_world(env, "exec", row["id"], "--", "curl", "-sS", "-m", "5", f"http://{HTTP_V4}/")
    assert (ok.returncode, ok.stdout) == (0, HELLO_BODY.decode()), ok.stderr
    denied = in_world(env, "exec", row["id"], "--", "curl", "-sS", "-m", "5", f"http://{ECHO_V4}/")
    assert denied.returncode == 7, denied  # curl: could not connect (refused by policy)
    assert not [r for r in world.http_requests() if r["local"].startswith(ECHO_V4)]

    # An open connection shows in `corral ps`, and goes when it closes.
    holder = world.popen(
        [PY, "-m", "corral", "exec", row["id"], "--", PY, "-c",
         "import socket, sys; s = socket.create_connection((%r, 80), timeout=5); "
         "print('connected', flush=True); sys.stdin.read()" % HTTP_V4],
        env=env, cwd=str(HERE), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    stop_all.append(holder)
    assert holder.stdout.readline() == "connected\n"
    # A silent client's connect is recorded when corral's read-ahead of its first
    # bytes ends (300 ms, docs/policy.md), not at the handshake.
    deadline = time.monotonic() + DEADLINE
    while ps(env, in_world)[0]["conns"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ps(env, in_world)[0]["conns"] == 1
    holder.stdin.close()
    assert holder.wait(timeout=DEADLINE) == 0
    deadline = time.monotonic() + DEADLINE
    while ps(env, in_world)[0]["conns"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the close event follows the FIN through the netstack
    assert ps(env, in_world)[0]["conns"] == 0

    logs = in_world(env, "logs", "--json", row["id"])
    events = [json.loads(line) for line in logs.stdout.splitlines()]
    connects = [(e["dst_ip"], e["dst_port"], e["verdict"]) for e in events if e["type"] == "connect"]
    assert connects == [(HTTP_V4, 80, "allow"), (ECHO_V4, 80, "deny"), (HTTP_V4, 80, "allow")]
    assert events[0]["type"] == "sandbox_start" and events[0]["sandbox_id"] == row["id"]
    human = in_world(env, "logs", row["id"]).stdout
    assert f"{ECHO_V4}:80" in human and "deny" in human

    assert in_world(env, "stop", row["id"]).returncode == 0
    assert proc.wait(timeout=DEADLINE) == 128 + signal.SIGTERM
