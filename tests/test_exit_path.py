"""corral exits right after the command (issue 11) and loses nothing on the way.

Once pid 1 reports the command's exit, `corral run` no longer waits for stage-1's exit
(when nothing more is read from inside), and what is left to remove goes to a sweeper
forked at the start (corral.launch.Sweeper).  These tests look at what a user finds the
moment corral's process has exited: every event written (the last one sandbox_exit,
with the command's exit code), the exit status exact, --keep-changes kept; and, within
a bounded wait, no scratch tree and no state entry left behind.  None is timed.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import corral
from world import ECHO_V4, PORT_ECHO

pytestmark = pytest.mark.namespaces

# Holds an allowed connection open past its own exit: a child keeps the socket while the
# command (its parent) exits 3, so the flow is still open when pid 1 reports the exit.
OPEN_FLOW = f"""
import os, socket, time
s = socket.create_connection(({ECHO_V4!r}, {PORT_ECHO}), timeout=10)
s.sendall(b"ping")
assert s.recv(4) == b"ping"
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
os._exit(3)
"""


def _private_env(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    return dict(os.environ, XDG_RUNTIME_DIR=str(runtime)), runtime / "corral"


def _eventually_empty(*dirs, within=10.0):
    """What is still in ``dirs`` once they empty, or ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while True:
        left = [name for d in dirs if d.exists() for name in os.listdir(d)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _events(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_fast_exit_records_a_flow_still_open_and_the_exit_before_corral_exits(world, tmp_path):
    env, state = _private_env(tmp_path)
    scratch, events = tmp_path / "scratch", tmp_path / "events.jsonl"
    scratch.mkdir()
    result = world.run([sys.executable, "-m", "corral", "run", "--allow", ECHO_V4, "--scratch",
                        str(scratch), "--events", str(events), "--", sys.executable, "-c", OPEN_FLOW],
                       env=env, capture_output=True, timeout=60, cwd=str(tmp_path))
    assert result.returncode == 3, result.stderr
    found = _events(events)  # read at once: corral has exited
    connects = [e for e in found if e["type"] == "connect" and e["dst_ip"] == ECHO_V4]
    assert [e["verdict"] for e in connects] == ["allow"], found
    closes = [e for e in found if e["type"] == "close" and e["id"] == connects[0]["id"]]
    assert len(closes) == 1 and closes[0]["bytes_out"] >= 4, found
    assert found[0]["type"] == "sandbox_start"
    assert found[-1]["type"] == "sandbox_exit" and found[-1]["exit_code"] == 3, found[-1]
    assert _eventually_empty(scratch, state) == []


@pytest.mark.parametrize("script, code", [
    ("sleep 60 & exit 5", 5),  # a background process outlives the command: it dies with pid 1
    ("kill -TERM $$", 128 + signal.SIGTERM),
])
def test_fast_exit_without_network_reports_the_exact_status_and_leaves_nothing(tmp_path, script,
                                                                               code):
    env, state = _private_env(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r, w = os.pipe()
    try:
        result = corral("run", "--net", "none", "--scratch", str(scratch), "--json-status-fd",
                        str(w), "--", "sh", "-c", script, env=env, pass_fds=(w,), cwd=tmp_path)
    finally:
        os.close(w)
    with os.fdopen(r) as f:
        status = [json.loads(line) for line in f]
    assert result.returncode == code, result.stderr
    assert [list(line) for line in status] == [["child-pid"], ["exit-code"]]
    assert status[-1]["exit-code"] == code
    assert _eventually_empty(scratch, state) == []


def test_keep_changes_are_there_when_corral_exits(tmp_path):
    work, kept, scratch = tmp_path / "work", tmp_path / "kept", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    result = corral("run", "--net", "none", "--scratch", str(scratch), "--keep-changes", str(kept),
                    "--", "sh", "-c", "echo kept > /etc/corral-exit-path-test", cwd=work)
    assert result.returncode == 0, result.stderr
    from corral.fs.changes import collect_changes

    changes = {c.path: c.change for c in collect_changes(kept).changes}
    assert changes.get("/etc/corral-exit-path-test") == "created"
    assert _eventually_empty(scratch) == []


def _in_fresh_process(code, *args):
    """Run ``code`` in a fresh interpreter (a sweeper is forked only by a process with no
    thread and no Go runtime, which this test process may have loaded); its JSON answer."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_sweeper_removes_what_it_is_told_and_closes_the_fds_it_is_given_last(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    os.chmod(tree / "a", 0o500)  # removed whatever its modes
    answer = _in_fresh_process("""
        import json, os, sys
        from corral.launch import Sweeper
        r, w = os.pipe()
        sweeper = Sweeper.fork()
        sweeper.finish([sys.argv[1], None], [w])  # our w is closed here; its copy when done
        eof = os.read(r, 1) == b""  # the last writer is gone: the sweeper has exited
        os.waitpid(sweeper.pid, 0)
        print(json.dumps({"eof": eof, "tree": os.path.exists(sys.argv[1])}))
        """, tree)
    assert answer == {"eof": True, "tree": False}


def test_a_sweeper_holds_nothing_of_the_supervisor_but_its_socket():
    # A pipe the supervisor holds (its stdout to `| cat`, another sandbox's stdin) must
    # end with the supervisor, not with a helper that lingers.
    fds = _in_fresh_process("""
        import json, os, time
        from corral.launch import Sweeper
        r, w = os.pipe()
        sweeper = Sweeper.fork()
        deadline = time.monotonic() + 10
        while True:  # (it drops them right after the fork)
            fds = {fd: os.readlink("/proc/%d/fd/%s" % (sweeper.pid, fd))
                   for fd in os.listdir("/proc/%d/fd" % sweeper.pid)}
            if len(fds) == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        sweeper.abandon()
        os.waitpid(sweeper.pid, 0)
        print(json.dumps(fds))
        """)
    assert all(fds[fd] == os.devnull for fd in ("0", "1", "2")), fds
    assert [t for fd, t in fds.items() if int(fd) > 2 and not t.startswith("socket:")] == [], fds
    assert len(fds) == 4, fds


def test_a_sweeper_left_without_a_word_removes_nothing(tmp_path):
    # The supervisor was killed before it was done: a --keep-changes record still in
    # scratch, or a report still to collect, must not be removed behind its back.
    tree = tmp_path / "tree"
    tree.mkdir()
    _in_fresh_process("""
        import os
        from corral.launch import Sweeper
        sweeper = Sweeper.fork()
        sweeper.abandon()
        os.waitpid(sweeper.pid, 0)
        print("{}")
        """)
    assert tree.exists()


def test_a_reserved_entry_is_listed_only_once_published_and_never_pruned_before(tmp_path):
    from corral import state

    place = state.Place(str(tmp_path), ("corral",))
    entry = state.reserve(spec={"argv": ["true"], "env": {}}, supervisor_pid=os.getpid(),
                          d_pid=os.getpid(), place=place)
    try:
        assert state.list_running(place) == []  # not listed, and not pruned either:
        assert os.listdir(tmp_path / "corral") == [entry.id]
        entry.publish(command_pid=4242)
        [running] = state.list_running(place)
        assert running.id == entry.id and running.info["command_pid"] == 4242
    finally:
        entry.close()
    assert os.listdir(tmp_path / "corral") == []
