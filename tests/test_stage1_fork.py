"""Issue 11: stage-1 is a fork of the supervisor whenever that is safe, and on the
default `corral run` path it is forked before trio, the policy and the network load,
so that their imports overlap the sandbox's set-up.  Everything a fresh interpreter
guaranteed still holds: it dies with the supervisor, holds none of its other fds,
and nothing runs before the supervisor says go."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.namespaces

PY = sys.executable

# Records each fork of this process (what was loaded then) and any exec'd stage-1.
RECORD = textwrap.dedent("""
    import os, sys
    from corral import launch
    forks, execs = [], []
    real_fork = os.fork
    me = os.getpid()

    def fork():
        if os.getpid() == me:
            forks.append(sorted(m for m in ("trio", "dns.message", "corral.net.netstack",
                                             "corral.events") if m in sys.modules))
        return real_fork()

    def no_exec(*args, **kw):
        execs.append(1)
        return real_exec(*args, **kw)

    os.fork = fork
    real_exec, launch.exec_stage1 = launch.exec_stage1, no_exec
""")


def _run_script(body, *args):
    out = subprocess.run([PY, "-c", RECORD + textwrap.dedent(body), *args], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_default_run_forks_stage1_before_trio_and_the_network_load():
    out = _run_script("""
        from corral import cli
        code = cli.main(["run", "--", "sh", "-c", "exit 3"])
        print(code, forks[0] if forks else None, len(execs))
    """)
    assert out.split("\n")[0] == "3 [] 0"


def test_library_run_forks_stage1_when_it_can_and_execs_once_threads_run():
    out = _run_script("""
        import threading
        import corral
        def once():
            r = corral.run(["sh", "-c", "cat; echo err >&2; exit 4"], net="none",
                           capture_output=True, input=b"in\\n")
            return r.exit_code, r.stdout, r.stderr
        print(once(), bool(forks), len(execs))
        forks.clear()
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        print(once(), bool(forks), len(execs))
    """)
    assert out.splitlines() == ["(4, b'in\\n', b'err\\n') True 0", "(4, b'in\\n', b'err\\n') False 1"]


def test_forked_stage1_gets_popen_stdio_devnull_and_stderr_to_stdout():
    out = _run_script("""
        import subprocess, trio, corral
        async def main():
            async with corral.open_sandbox(net="none") as box:
                proc = await box.start(["sh", "-c", "cat; echo out; echo err >&2"],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)
                out, _ = await proc.communicate()
                print(repr(out), await proc.wait(), bool(forks), len(execs))
        trio.run(main)
    """)
    assert out == "b'out\\nerr\\n' 0 True 0\n"


def test_forked_stage1_holds_no_pipe_of_another_sandbox_so_its_stdin_ends():
    # The second sandbox's stage-1 is forked while the first one's stdin pipe is open
    # in the supervisor: had it kept that fd (a fork keeps everything), `cat` in the
    # first sandbox would never see the end of its input.
    out = _run_script("""
        import subprocess, trio, corral
        async def main():
            async with corral.open_sandbox(net="none") as a:
                cat = await a.start(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                async with corral.open_sandbox(net="none") as b:
                    await b.start(["sleep", "30"])
                    await cat.stdin.send_all(b"hello")
                    await cat.stdin.aclose()
                    with trio.fail_after(20):
                        out, _ = await cat.communicate()
                        print(repr(out), await cat.wait(), len(forks), len(execs))
                    b.process.kill()
        trio.run(main)
    """)
    assert out == "b'hello' 0 2 0\n"


def _children():
    """{ppid: [pid, ...]} of every process."""
    tree = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(name))
    return tree


def _descendants(pid):
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_kill_9_of_corral_run_before_it_adopted_its_early_stage1_leaves_nothing(tmp_path, stop_all):
    # The policy file loads after the early fork and hangs: the supervisor is killed
    # while stage-1 has built the sandbox and waits for the go that never comes.
    loading, ran = tmp_path / "loading", tmp_path / "ran"
    policy = tmp_path / "policy.py"
    policy.write_text("import pathlib, time\npathlib.Path(%r).touch()\ntime.sleep(60)\n" % str(loading))
    proc = subprocess.Popen([PY, "-m", "corral", "run", "--policy", str(policy), "--rw", str(tmp_path),
                             "--", "touch", str(ran)], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stop_all.append(proc)
    assert _wait_for(loading.exists), proc.stderr.read() if proc.poll() is not None else ""
    # stage-1 (C), its undertaker and pid 1 (D): three processes, all set up by now
    assert _wait_for(lambda: len(_descendants(proc.pid)) >= 3)
    inside = _descendants(proc.pid)
    proc.kill()
    proc.wait()
    assert _wait_for(lambda: not any(_alive(pid) for pid in inside)), \
        [(pid, _alive(pid)) for pid in inside]
    assert not ran.exists()


def test_bad_input_found_after_the_early_fork_leaves_no_process_and_no_scratch(tmp_path):
    scratch, kept = tmp_path / "scratch", tmp_path / "kept"
    before = set(_children().get(os.getpid(), []))
    out = subprocess.run([PY, "-m", "corral", "run", "--scratch", str(scratch), "--keep-changes",
                          str(kept), "--allow", "bad:::", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "invalid allow rule 'bad:::'" in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert not scratch.exists() or not os.listdir(scratch)
    assert not kept.exists()  # nothing ran: nothing kept
    assert set(_children().get(os.getpid(), [])) <= before



@pytest.mark.parametrize("net", ["none", "filtered"])
def test_closed_stdin_and_stdout_stay_closed_and_never_carry_a_corral_fd(net):
    # With fds 0 and 1 closed, the ctl socket or a pipe of stage-1 or pid 1 would land
    # there, and the command would get it as its stdin or stdout.
    probe = "for n in 0 1; do [ -e /proc/$$/fd/$n ] && echo open-$n >&2 || echo closed-$n >&2; done"
    out = subprocess.run(["sh", "-c", 'exec "$@" <&- >&-', "sh", PY, "-m", "corral", "run",
                          "--net", net, "--", "sh", "-c", probe],
                         stderr=subprocess.PIPE, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (0, "closed-0\nclosed-1\n")


def test_forked_stage1_drops_the_event_loops_signal_handlers():
    # trio (here, for SIGUSR1 and SIGWINCH) handles signals through a wakeup fd that is
    # the supervisor's: a forked stage-1 keeping its handlers would catch those signals
    # and write them into a fd that is not what it was, where an exec'd one dies of them.
    out = _run_script("""
        import signal, trio, corral
        async def main():
            with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGWINCH):
                async with corral.open_sandbox(net="none") as box:
                    proc = await box.start(["sleep", "30"])
                    with open("/proc/%d/status" % proc._popen.pid) as f:
                        line = next(l for l in f if l.startswith("SigCgt:"))
                    print(int(line.split()[1], 16), bool(forks), len(execs))
                    proc.kill()
        trio.run(main)
    """)
    assert out == "0 True 0\n"
