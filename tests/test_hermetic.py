"""Issue 9, class 7: hermetic mode on merged-/usr systems, through the CLI.

``--mode hermetic --ro /usr`` must run /usr/bin/python3 (the host's /bin,
/lib64... symlinks into /usr are recreated), and when exec fails because the
ELF loader or a #! interpreter is missing, the message says so instead of
"command not found".
"""

import os
import sys

import pytest

from conftest import corral

pytestmark = pytest.mark.namespaces

PY = os.path.realpath(sys.executable)
MERGED_USR = all(os.path.islink(p) and os.path.realpath(p).startswith("/usr/")
                 for p in ("/bin", "/lib") if os.path.lexists(p))


def run(tmp_path, *args):
    return corral("run", "--net", "none", "--mode", "hermetic", *args, cwd=tmp_path)


@pytest.mark.skipif(not MERGED_USR, reason="needs a merged-/usr host (/bin -> usr/bin)")
def test_hermetic_ro_usr_runs_python_and_the_shell(tmp_path):
    result = run(tmp_path, "--ro", "/usr", "--", PY, "-c", "print('hello')")
    assert (result.returncode, result.stdout) == (0, b"hello\n"), result.stderr
    # by name through PATH, and /bin/sh through the recreated /bin link
    result = run(tmp_path, "--ro", "/usr", "--", "/bin/sh", "-c",
                 "python3 -c 'print(2)'; readlink /bin; test -e /etc || echo no-etc")
    assert result.stdout.decode().split() == ["2", "usr/bin", "no-etc"], result.stderr


def test_top_level_links_are_recreated_only_when_their_target_is_shown():
    from test_fs_plan import Stat, host, ops, plan_of

    fs = host(**{"/sbin": ("symlink", "usr/sbin"), "/usr/sbin/init": Stat("file"),
                 "/vmlinuz": ("symlink", "boot/vmlinuz-6"), "/boot/vmlinuz-6": Stat("file"),
                 "/lib": ("symlink", "/usr/lib"), "/usr/lib/x": Stat("file")})
    plan = plan_of(fs, mode="hermetic", paths=(("ro", "/usr"),))
    links = {o["path"]: o["target"] for o in ops(plan, "symlink")}
    assert links == {"/bin": "usr/bin", "/sbin": "usr/sbin", "/lib64": "usr/lib64",
                     "/lib": "/usr/lib"}
    assert ops(plan, "overlay", "/usr")[0]["ro"]
    # only /usr/bin shown: /bin only
    plan = plan_of(fs, mode="hermetic", paths=(("ro", "/usr/bin"),))
    assert {o["path"] for o in ops(plan, "symlink")} == {"/bin"}


def test_missing_elf_loader_is_named_not_command_not_found(tmp_path):
    # /usr/bin alone: python3 is there, its loader (/lib64/ld-linux-...) is not
    result = run(tmp_path, "--ro", "/usr/bin", "--", PY, "-c", "1")
    assert result.returncode == 127
    err = result.stderr.decode()
    assert "ELF loader" in err and "is missing" in err and "command not found" not in err, err
    assert "Fix: show the directory that holds it (e.g. --ro /" in err
    assert err.count("\n") == 1


def test_missing_script_interpreter_is_named(tmp_path):
    script = tmp_path / "tool"
    script.write_text("#!/opt/nowhere/bin/interp\necho hi\n")
    script.chmod(0o755)
    result = corral("run", "--net", "none", "--", "./tool", cwd=tmp_path)
    assert result.returncode == 127
    err = result.stderr.decode()
    assert "#! interpreter /opt/nowhere/bin/interp is missing" in err, err
    assert "--ro /opt/nowhere/bin" in err


def test_a_missing_command_is_still_command_not_found(tmp_path):
    result = run(tmp_path, "--ro", "/usr", "--", "no-such-command-corral")
    assert result.returncode == 127
    assert result.stderr.decode().strip() == "corral: no-such-command-corral: command not found"


def _elf64(interp, entsize=56, count=1):
    import struct

    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 32, 64)  # e_phoff
    struct.pack_into("<HH", header, 54, entsize, count)
    data = interp.encode() + b"\0"
    phdr = struct.pack("<IIQQQQQQ", 3, 4, 64 + 56, 0, 0, len(data), len(data), 1)
    return bytes(header) + phdr + data


def test_elf_loader_is_read_from_pt_interp_and_bad_headers_are_ignored(tmp_path):
    from corral.spawn.stage1 import _missing_to_start

    prog = tmp_path / "prog"
    prog.write_bytes(_elf64("/nowhere/ld-test.so.2"))
    assert _missing_to_start(str(prog), "") == ("/nowhere/ld-test.so.2", "ELF loader")
    prog.write_bytes(_elf64(PY))  # the loader exists: the command itself was missing
    assert _missing_to_start(str(prog), "") is None
    for hostile in (_elf64("/x", entsize=60000, count=65535), _elf64("/x")[:70], b"\x7fELF"):
        prog.write_bytes(hostile)
        assert _missing_to_start(str(prog), "") is None
    os.mkfifo(tmp_path / "fifo")  # never blocks on something that is not a file
    assert _missing_to_start(str(tmp_path / "fifo"), "") is None


def test_corral_exec_names_a_missing_interpreter_too(tmp_path):
    import subprocess

    from test_runtime import corral as runtime_corral
    from test_runtime import start, wait_listed

    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    script = tmp_path / "tool"
    script.write_text("#!/opt/nowhere/bin/interp\n")
    script.chmod(0o755)
    proc = start(env, "--net", "none", argv=["sh", "-c", "echo ready; exec sleep 30"],
                 cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        row = wait_listed(env, proc)
        out = runtime_corral(env, "exec", row["id"], "--", "./tool")
        assert out.returncode == 127
        assert "#! interpreter /opt/nowhere/bin/interp is missing" in out.stderr, out.stderr
    finally:
        proc.kill()
        proc.wait(timeout=10)
