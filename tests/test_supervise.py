"""Issue 10.2: one supervision core; errors keep their shape on every path;
cancellation, exceptions, Ctrl-C and kill -9 of the supervisor kill
everything inside, in both network modes."""

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import trio

import corral
from corral import _supervise, launch
from corral.events import SandboxExitEvent, SandboxStartEvent
from conftest import corral as corral_cli

NETS = ["none", "filtered"]


# ---------------------------------------------------------------- the state machine, no I/O


def _machine(**kw):
    kw.setdefault("stage1_pid", 100)
    kw.setdefault("now", 0.0)
    return _supervise.Supervision(**kw)


def test_timeout_sends_term_then_kill_after_the_grace():
    m = _machine(timeout=5, kill_grace=2)
    assert m.received({"d_pid": 101}) == []
    assert m.tick(4.9) == []
    assert m.next_timer() == 5
    assert m.tick(5.0) == [_supervise.TimedOut(5), _supervise.Kill(101, signal.SIGTERM)]
    assert m.next_timer() == 7.0
    assert m.tick(7.0) == [_supervise.Kill(101, signal.SIGKILL)]
    m.received(None)
    out = m.outcome(signal.SIGKILL)
    assert (out.exit_code, out.signal, out.timed_out) == (137, signal.SIGKILL, "kill")


def test_timeout_waits_for_pid_1_before_firing():
    m = _machine(timeout=1)
    assert m.next_timer() is None and m.tick(3) == []
    m.received({"d_pid": 7})
    assert m.tick(3)[1] == _supervise.Kill(7, signal.SIGTERM)


def test_pid_1_is_learned_once_a_later_message_cannot_retarget_kills():
    m = _machine()
    m.received({"d_pid": 101})
    m.received({"d_pid": 1})  # e.g. a compromised pid 1 naming the host's init
    assert m.d_pid == 101
    assert m.signalled(signal.SIGTERM) == [_supervise.Kill(101, signal.SIGTERM)]


def test_network_go_and_start_actions():
    m = _machine(wait_go=True)
    m.received({"d_pid": 5})
    assert m.received({"tap": "tap0"}, [9, 10]) == [_supervise.StartNetwork(9),
                                                     _supervise.CloseFds((10,))]
    assert m.received({"ready": True}) == [_supervise.SendGo()]
    assert m.received({"child": 2, "pid": 1234}) == [_supervise.CommandStarted(1234)]
    assert m.received({"child": 3, "pid": 99}) == []  # once
    m.received({"exit": 3, "signal": None})
    m.received(None)
    assert m.finished and m.outcome(3 << 8).exit_code == 3


def test_keyboard_signals_the_terminal_delivered_are_not_sent_twice():
    m = _machine(keyboard_direct=True)
    m.received({"d_pid": 5})
    assert m.signalled(signal.SIGINT) == []
    assert m.signalled(signal.SIGHUP) == [_supervise.Kill(5, signal.SIGHUP)]


def test_teardown_kills_pid_1_and_stage_1_once():
    m = _machine()
    assert m.teardown() == [_supervise.Kill(100, signal.SIGKILL)]  # pid 1 not known yet
    m = _machine()
    m.received({"d_pid": 5})
    assert m.teardown() == [_supervise.Kill(5, signal.SIGKILL), _supervise.Kill(100, signal.SIGKILL)]
    assert m.teardown() == []


@pytest.mark.parametrize("report, code", [
    ({"step": "exec", "errno": 2, "detail": "nope", "exit_code": 127}, 127),
    ({"step": "exec", "errno": 13, "detail": "/etc/passwd", "exit_code": 126}, 126),
    ({"step": "limits", "errno": 1, "detail": "--nofile", "exit_code": 1}, 125),
])
def test_step_errors_become_sandbox_errors_with_the_shell_codes(report, code):
    m = _machine()
    m.received({"error": report})
    m.received(None)
    outcome = m.outcome(1 << 8)
    assert isinstance(outcome.error, corral.SandboxError)
    assert outcome.exit_code == outcome.error.exit_code == code


def test_blocking_records_are_the_event_classes_dicts():
    start = launch.start_record(["a"], 5, "id1")
    assert start.keys() == SandboxStartEvent(argv=["a"]).to_dict().keys()
    assert SandboxStartEvent(argv=["a"], pid=5, sandbox_id="id1", mode="run",
                             ts=start["ts"]).to_dict() == start
    end = launch.exit_record(3, None, "id1")
    assert SandboxExitEvent(exit_code=3, sandbox_id="id1", ts=end["ts"]).to_dict() == end


# ---------------------------------------------------------------- errors keep their shape


@pytest.mark.namespaces
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("argv, code, text", [
    (["no-such-cmd"], 127, b"no-such-cmd: command not found"),
    (["/etc/passwd"], 126, b"/etc/passwd: permission denied"),
])
def test_cli_exec_failures_exit_like_a_shell_in_every_net_mode(net, argv, code, text):
    result = corral_cli("run", "--net", net, "--", *argv)
    assert result.returncode == code
    assert result.stderr.strip() == b"corral: " + text
    assert b"Traceback" not in result.stderr


@pytest.mark.namespaces
@pytest.mark.parametrize("net", NETS)
def test_cli_setup_failure_is_one_line_and_125(net):
    result = corral_cli("run", "--net", net, "--nofile", "99999999", "--", "true")
    assert result.returncode == 125
    assert len(result.stderr.strip().splitlines()) == 1
    assert b"--nofile" in result.stderr


@pytest.mark.namespaces
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("capture", [False, True])
def test_api_run_raises_sandbox_error_not_an_exception_group(net, capture):
    with pytest.raises(corral.SandboxError) as info:
        corral.run(["no-such-cmd"], net=net, capture_output=capture)
    assert info.value.exit_code == 127


@pytest.mark.namespaces
@pytest.mark.parametrize("net", NETS)
async def test_open_sandbox_wait_raises_sandbox_error(net):
    async with corral.open_sandbox(net=net) as box:
        proc = await box.start(["/etc/passwd"])
        with pytest.raises(corral.SandboxError) as info:
            await proc.wait()
    assert info.value.exit_code == 126


# ---------------------------------------------------------------- nothing survives


def _gone(pid, timeout=10):
    """True once ``pid`` has exited (it is not our child: poll a pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.mark.namespaces
@pytest.mark.parametrize("net", NETS)
async def test_cancelling_open_sandbox_kills_the_command(net):
    with trio.move_on_after(3) as scope:
        async with corral.open_sandbox(net=net) as box:
            proc = await box.start(["sleep", "1000"])
            pid = proc.pid
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert _gone(pid)
    assert proc.returncode is not None


@pytest.mark.namespaces
@pytest.mark.parametrize("net", NETS)
async def test_an_exception_in_the_block_kills_the_command(net):
    with pytest.raises(KeyError):
        async with corral.open_sandbox(net=net) as box:
            proc = await box.start(["sleep", "1000"])
            raise KeyError("boom")
    assert _gone(proc.pid)


@pytest.mark.namespaces
@pytest.mark.parametrize("net", NETS)
async def test_cancelled_before_the_command_started_leaves_nothing(net, tmp_path):
    # Cancel while stage-1 is still setting up: pid 1 may not have reported yet.
    marker = tmp_path / "ran"
    with trio.move_on_after(0.05):
        async with corral.open_sandbox(net=net, rw=[str(tmp_path)]) as box:
            await box.start(["sh", "-c", "sleep 1; touch %s" % marker])
    await trio.sleep(2)
    assert not marker.exists()


SCRIPT = textwrap.dedent("""
    import os, sys, corral
    print(os.getpid(), flush=True)
    corral.run(["sleep", "1000"], net=sys.argv[1], capture_output=sys.argv[2] == "1",
               json_status_fd=1)
""")


def _script_and_command_pid(net, capture):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, net, "1" if capture else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    int(proc.stdout.readline())
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, json.loads(line)["child-pid"]


@pytest.mark.namespaces
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("capture", [False, True])
def test_ctrl_c_of_the_supervisor_kills_the_command(net, capture):
    proc, pid = _script_and_command_pid(net, capture)
    try:
        proc.send_signal(signal.SIGINT)
        assert _gone(pid)
        proc.wait(timeout=20)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.namespaces
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("capture", [False, True])
def test_kill_9_of_the_supervisor_kills_the_command(net, capture):
    proc, pid = _script_and_command_pid(net, capture)
    proc.kill()
    proc.wait()
    assert _gone(pid)


@pytest.mark.namespaces
@pytest.mark.parametrize("net", NETS)
def test_ctrl_c_of_corral_run_kills_the_command(net):
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "corral", "run", "--net", net,
                             "--json-status-fd", str(w), "--", "sleep", "1000"],
                            pass_fds=(w,), stderr=subprocess.PIPE)
    os.close(w)
    with os.fdopen(r) as status:
        pid = json.loads(status.readline())["child-pid"]
        proc.send_signal(signal.SIGINT)
        assert _gone(pid)
    assert proc.wait(timeout=20) == 128 + signal.SIGINT


def test_gone_helper_sees_a_live_process():
    child = subprocess.Popen(["sleep", "5"])
    try:
        start = time.monotonic()
        assert not _gone(child.pid, timeout=0.2)
        assert time.monotonic() - start >= 0.2
    finally:
        child.kill()
        child.wait()


# ---------------------------------------------------------------- bad input: one line, exit 2


def _one_line_usage_error(result, *words):
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_allow_file_dev_zero_is_refused_not_read_forever():
    result = corral_cli("run", "--allow-file", "/dev/zero", "--", "true", timeout=30)
    _one_line_usage_error(result, "/dev/zero", "1 MiB")


def test_allow_file_with_an_endless_line_is_refused(tmp_path):
    rules = tmp_path / "rules.txt"
    rules.write_text("example.com\n" + "a" * 5000 + "\n")
    _one_line_usage_error(corral_cli("run", "--allow-file", str(rules), "--", "true"),
                          "rules.txt:2", "longer than")


@pytest.mark.parametrize("body, said", [
    ("import os\nos._exit(0)\n", "os._exit(0)"),
    ("import sys\nsys.exit(3)\n", "sys.exit(3)"),
    ("raise SystemExit\n", "sys.exit(None)"),
])
def test_policy_file_that_exits_at_import_is_a_policy_error(tmp_path, body, said):
    policy = tmp_path / "policy.py"
    policy.write_text(body)
    result = corral_cli("run", "--policy", str(policy), "--", "true")
    _one_line_usage_error(result, "--policy", said)


def test_policy_file_exit_does_not_leave_os_exit_patched(tmp_path):
    from corral.net import service

    policy = tmp_path / "policy.py"
    policy.write_text("import os\nos._exit(1)\n")
    real = os._exit
    with pytest.raises(corral.ConfigError):
        service.load_policy_file(str(policy))
    assert os._exit is real


@pytest.mark.parametrize("rule", ["2001:db8::1:53/udp", "2001:db8::1:53", "fe80::1:443/tcp"])
def test_ambiguous_ipv6_with_port_is_refused_with_the_bracket_fix(rule):
    result = corral_cli("run", "--allow", rule, "--", "true")
    _one_line_usage_error(result, "ambiguous", "[")
    from corral.policy import parse_rules

    with pytest.raises(corral.ConfigError, match=r"Fix: write \["):
        parse_rules([rule], "allow")


@pytest.mark.parametrize("rule", ["[2001:db8::1]:53/udp", "[2001:db8::1:53]", "::1", "2001:db8::53",
                                  "2001:db8:0:0:0:0:1:53", "2001:db8::/32"])
def test_unambiguous_ipv6_rules_still_parse(rule):
    from corral.policy import parse_rules

    assert parse_rules([rule], "allow")


def test_an_ambiguous_address_prints_with_brackets_and_parses_back():
    from corral.policy import parse_rules

    rule = parse_rules(["[2001:db8::1:53]"], "deny")[0]
    assert str(rule) == "[2001:db8::1:53]"
    assert parse_rules([str(rule)], "deny")[0] == rule


@pytest.mark.namespaces
def test_json_status_fd_that_is_not_open_is_refused_before_running(tmp_path):
    marker = tmp_path / "ran"
    result = corral_cli("run", "--net", "none", "--rw", str(tmp_path), "--json-status-fd", "99",
                        "--", "touch", str(marker))
    _one_line_usage_error(result, "--json-status-fd 99", "not an open file descriptor")
    assert not marker.exists()
    with pytest.raises(corral.ConfigError, match="--json-status-fd 99"):
        corral.run(["true"], net="none", json_status_fd=99)


@pytest.mark.parametrize("args, words", [
    (("--kill-grace", "-1"), ("--kill-grace", "0 or more seconds")),
    (("--memory", "1"), ("--memory", "minimum is 16M")),
    (("--memory", "1M"), ("--memory", "minimum is 16M")),
    (("--max-conns", "-1"), ("--max-conns -1", "positive number of open flows")),
    (("--max-rate", "0"), ("--max-rate", "flows per second")),
])
def test_bad_numbers_are_one_line_with_the_right_words(args, words):
    _one_line_usage_error(corral_cli("run", *args, "--", "true"), *words)


# ---------------------------------------------------------------- argv and types


@pytest.mark.parametrize("argv", ["true", b"true", __import__("pathlib").Path("/bin/true")])
def test_run_with_a_string_is_a_type_error_not_a_split_argv(argv):
    with pytest.raises(TypeError, match="list of strings"):
        corral.run(argv, net="none")


async def test_start_with_a_string_is_a_type_error():
    async with corral.open_sandbox(net="none") as box:
        with pytest.raises(TypeError, match="list of strings"):
            await box.start("true")
        with pytest.raises(TypeError, match="items must be str"):
            await box.start(["echo", 3])


def test_config_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="corral.Config"):
        corral.run(["true"], config={"net": "none"})


def test_package_ships_py_typed():
    import importlib.resources

    assert importlib.resources.files("corral").joinpath("py.typed").is_file()
