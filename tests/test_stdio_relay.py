"""Issue 9 class 2: what the command can do with its stdin/stdout/stderr is
what the fd allows, nothing more.  A regular file given as stdio must not be
reopenable through /proc/self/fd/N with more rights (write a `<` file,
truncate or read back a `>>` log); terminals, pipes and /dev/null pass as is;
relayed streams stay byte-exact and in order."""

import os
import subprocess
import sys

import pytest
import trio

import corral
from conftest import corral as corral_cli

pytestmark = pytest.mark.namespaces

NETS = ["none", "filtered"]

# Tries every way to reopen fd N (given on argv) with more rights; prints what worked.
ATTACK = r"""
import os, sys
fd = int(sys.argv[1])
for name, flags in (("write", os.O_WRONLY), ("rdwr", os.O_RDWR), ("trunc", os.O_WRONLY | os.O_TRUNC),
                    ("read", os.O_RDONLY | os.O_NONBLOCK)):
    try:
        f = os.open("/proc/self/fd/%d" % fd, flags)
    except OSError as exc:
        continue
    try:
        if name == "read":
            try:
                data = os.read(f, 4096)
            except BlockingIOError:
                data = b""
            if b"HOSTSECRET" in data:
                os.write(2, b"ATTACK read back the host file\n")
        else:
            os.write(f, b"PWNED")
    except OSError:
        pass
    os.close(f)
"""


def _run(net, *argv, **kw):
    return corral_cli("run", "--net", net, "--", *argv, **kw)


@pytest.mark.parametrize("net", NETS)
def test_stdin_file_reopened_writable_cannot_overwrite_the_host_file(net, tmp_path):
    target = tmp_path / "input.txt"
    target.write_bytes(b"HOSTSECRET original\n")
    with open(target, "rb") as stdin:
        result = _run(net, sys.executable, "-c", ATTACK, "0", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == b"HOSTSECRET original\n"


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("fd", [1, 2])
def test_append_log_reopened_cannot_be_truncated_or_read_back(net, fd, tmp_path):
    log = tmp_path / "log"
    log.write_bytes(b"HOSTSECRET earlier run\n")
    script = ATTACK + "\nos.write(%d, b'appended\\n')\n" % fd
    with open(log, "ab") as out:
        result = subprocess.run([sys.executable, "-m", "corral", "run", "--net", net, "--",
                                 sys.executable, "-c", script, str(fd)],
                                stdout=out if fd == 1 else subprocess.PIPE,
                                stderr=out if fd == 2 else subprocess.PIPE, timeout=60)
    assert result.returncode == 0
    data = log.read_bytes()
    # Writes through a reopened fd land in the relay pipe: appended, like stdout itself.
    assert data.startswith(b"HOSTSECRET earlier run\n"), data
    assert data.replace(b"PWNED", b"").endswith(b"earlier run\nappended\n"), data
    assert b"ATTACK" not in data + (result.stderr or b"")


@pytest.mark.parametrize("net", NETS)
def test_stdout_file_reopened_cannot_rewrite_what_was_there(net, tmp_path):
    """`> file` at an offset: the old content before the offset stays private."""
    out_path = tmp_path / "out"
    out_path.write_bytes(b"HOSTSECRET header\n")
    with open(out_path, "r+b") as out:
        out.seek(0, os.SEEK_END)
        result = subprocess.run([sys.executable, "-m", "corral", "run", "--net", net, "--",
                                 sys.executable, "-c", ATTACK + "\nprint('body')", "1"],
                                stdout=out, stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr
    assert out_path.read_bytes().replace(b"PWNED", b"") == b"HOSTSECRET header\nbody\n"
    assert b"ATTACK" not in result.stderr


@pytest.mark.parametrize("net", NETS)
def test_relayed_streams_are_byte_exact(net, tmp_path):
    payload = os.urandom(3 << 20) + b"\0\r\n\xff"
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    dst = tmp_path / "out.bin"
    with open(src, "rb") as stdin, open(dst, "wb") as stdout:
        result = _run(net, "cat", stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                      capture_output=False)
    assert result.returncode == 0, result.stderr
    assert dst.read_bytes() == payload


@pytest.mark.parametrize("net", NETS)
def test_shared_stdout_and_stderr_keep_their_interleaving(net, tmp_path):
    log = tmp_path / "log"
    script = "import os\nfor i in range(300):\n    os.write(1 + i % 2, b'%d\\n' % i)\n"
    with open(log, "wb") as out:
        result = subprocess.run([sys.executable, "-m", "corral", "run", "--net", net, "--",
                                 sys.executable, "-c", script], stdout=out,
                                stderr=subprocess.STDOUT, timeout=60)
    assert result.returncode == 0
    assert log.read_bytes() == b"".join(b"%d\n" % i for i in range(300))


@pytest.mark.parametrize("net", NETS)
def test_stdin_file_eof_reaches_the_command(net, tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"one\ntwo\n")
    with open(src, "rb") as stdin:
        result = _run(net, "wc", "-l", stdin=stdin)
    assert result.returncode == 0
    assert result.stdout.strip() == b"2"


@pytest.mark.parametrize("net", NETS)
def test_pipes_and_dev_null_pass_as_they_are(net):
    show = "for n in 0 1 2; do readlink /proc/self/fd/$n; done"
    result = _run(net, "sh", "-c", show, stdin=subprocess.DEVNULL)
    lines = result.stdout.decode().split()
    assert lines[0] == "/dev/null"
    assert lines[1].startswith("pipe:") and lines[2].startswith("pipe:")
    piped = _run(net, "cat", input=b"through a pipe\n")
    assert piped.stdout == b"through a pipe\n"


def test_regular_file_stdio_inside_is_a_pipe(tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"x")
    with open(src, "rb") as stdin, open(tmp_path / "out", "wb") as stdout:
        result = _run("none", "sh", "-c", "readlink /proc/self/fd/0 /proc/self/fd/1 >&2",
                      stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, capture_output=False)
    shown = result.stderr.split()
    assert len(shown) == 2 and all(s.startswith(b"pipe:") for s in shown), shown


def test_a_tty_stays_a_tty(tmux):
    tmux.start("%s -m corral run --net none -- sh -c 'test -t 0 && test -t 1 && test -t 2 && "
               "echo IS''ATTY'; sleep 30" % sys.executable)
    tmux.wait_for("ISATTY")


@pytest.mark.parametrize("net", NETS)
async def test_api_file_object_as_stdout_is_relayed(net, tmp_path):
    log = tmp_path / "log"
    log.write_bytes(b"HOSTSECRET\n")
    with open(log, "ab") as out:
        async with corral.open_sandbox(net=net) as box:
            proc = await box.start([sys.executable, "-c", ATTACK + "\nprint('api')", "1"],
                                   stdout=out, stderr=subprocess.PIPE)
            _, err = await proc.communicate()
            assert await proc.wait() == 0
    assert log.read_bytes().replace(b"PWNED", b"") == b"HOSTSECRET\napi\n"
    assert b"ATTACK" not in err


def test_background_child_holding_stdout_does_not_hang_corral(tmp_path):
    """The command exits while a child it left keeps the relayed pipe open:
    pid 1's exit kills the child, the pipe closes, corral returns."""
    out = tmp_path / "out"
    with open(out, "wb") as stdout:
        result = subprocess.run([sys.executable, "-m", "corral", "run", "--net", "none", "--",
                                 "sh", "-c", "(sleep 100; echo late) & echo early"],
                                stdout=stdout, stderr=subprocess.PIPE, timeout=30)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == b"early\n"


async def test_relay_of_a_sandbox_cancelled_midway_finishes(tmp_path):
    out = tmp_path / "out"
    with open(out, "wb") as stdout:
        with trio.move_on_after(2):
            async with corral.open_sandbox(net="none") as box:
                await box.start(["sh", "-c", "echo start; exec sleep 100"], stdout=stdout)
                await trio.sleep_forever()
    assert out.read_bytes() == b"start\n"


def test_stdin_the_command_does_not_read_stays_in_the_file(tmp_path):
    """`while read l; do corral run ...; done < file`: the relay reads ahead,
    but what the command never read is given back to the shared offset."""
    src = tmp_path / "lines"
    src.write_bytes(b"".join(b"line %d\n" % i for i in range(3)))
    script = ("while read l; do echo \"$l\"; %s -m corral run --net none -- true; done"
              % sys.executable)
    with open(src, "rb") as stdin:
        result = subprocess.run(["sh", "-c", script], stdin=stdin, capture_output=True,
                                timeout=120)
    assert result.stdout.splitlines() == [b"line 0", b"line 1", b"line 2"]
    content = b"".join(b"line %d\n" % i for i in range(20000))
    src.write_bytes(content)
    with open(src, "rb") as stdin:
        result = subprocess.run(["sh", "-c", "read l; %s -m corral run --net none -- "
                                 "head -n 2; cat" % sys.executable],
                                stdin=stdin, capture_output=True, timeout=60)
    out = result.stdout
    assert out.startswith(b"line 1\nline 2\n")
    # head read one buffer from its pipe (as from `cat file | head`); cat goes on right after
    # it, not after all the relay had read ahead (up to 1 MiB)
    rest = out[len(b"line 1\nline 2\n"):]
    assert content.endswith(rest) and len(rest) > len(content) - 65536


@pytest.mark.network
@pytest.mark.parametrize("net", ["none", "filtered"])
def test_callers_extra_fds_do_not_reach_the_command(world, tmp_path, net):
    """`corral run -- sh -c 'echo X >&5' 5>>~/file` must not write a host file: the
    command gets stdio and nothing else, neither the caller's fds nor corral's own."""
    import shlex

    target = tmp_path / "host-file"
    target.write_text("before\n")
    corral_argv = [sys.executable, "-m", "corral", "run", "--net", net, "--", "sh", "-c",
                   "ls /proc/self/fd; echo X >&5"]
    proc = world.run(["sh", "-c", "exec %s 5>>%s" % (shlex.join(corral_argv),
                                                      shlex.quote(str(target)))],
                     stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert target.read_text() == "before\n"
    fds = sorted(int(n) for n in proc.stdout.split())
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4, proc.stdout  # + ls's own directory fd
    assert "5" in proc.stderr, proc.stderr  # sh: 5: Bad file descriptor
