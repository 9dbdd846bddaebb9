"""The public Python API (issue 2 item 7): corral.run, open_sandbox, enter."""

import subprocess
import sys
import textwrap

import pytest
import trio

import corral

pytestmark = pytest.mark.namespaces


def test_public_names_are_reexported_lazily():
    code = "import sys, corral; print(sorted(m for m in ('trio', 'cffi', 'pyroute2', 'scapy', 'attrs') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # importing corral pulls in nothing heavy
    for name in corral.__all__:
        assert getattr(corral, name) is not None


def test_run_returns_exit_code():
    assert corral.run(["sh", "-c", "exit 5"], net="none").exit_code == 5


def test_run_captures_output_and_feeds_input():
    result = corral.run(["sh", "-c", "cat; echo err >&2; exit 2"], net="none",
                        capture_output=True, input=b"from stdin\n")
    assert (result.exit_code, result.stdout, result.stderr) == (2, b"from stdin\n", b"err\n")


def test_run_rejects_bad_config_before_spawning():
    with pytest.raises(corral.ConfigError, match="mode"):
        corral.run(["true"], mode="bogus")
    with pytest.raises(corral.ConfigError, match="/no/such/dir-xyz"):
        corral.run(["true"], net="none", rw=["/no/such/dir-xyz"])


def test_missing_command_raises_sandbox_error_with_127():
    with pytest.raises(corral.SandboxError) as info:
        trio.run(_start_and_wait, ["no-such-command-xyz"])
    assert info.value.exit_code == 127
    assert "command not found" in str(info.value)


async def _start_and_wait(argv):
    async with corral.open_sandbox(corral.Config(net="none")) as box:
        proc = await box.start(argv)
        return await proc.wait()


async def test_open_sandbox_runs_and_reports():
    config = corral.Config(net="none", hostname="api-box")
    async with corral.open_sandbox(config) as box:
        proc = await box.start(["sh", "-c", "test $(hostname) = api-box && exit 9"],
                               stdout=subprocess.PIPE)
        assert proc.pid is not None and proc.pid > 1
        assert await proc.wait() == 9
        assert proc.returncode == 9
    kinds = [type(e).__name__ for e in box.recorded_events]
    assert kinds == ["SandboxStartEvent", "SandboxExitEvent"]


async def test_open_sandbox_kills_the_command_when_the_block_ends():
    async with corral.open_sandbox(corral.Config(net="none")) as box:
        proc = await box.start(["sleep", "60"])
    assert proc.returncode == 128 + 9


async def test_send_signal_reaches_the_command():
    async with corral.open_sandbox(corral.Config(net="none")) as box:
        proc = await box.start(["sh", "-c", "trap 'exit 42' USR1; echo ready; "
                                "while :; do sleep 0.05; done"], stdout=subprocess.PIPE)
        assert await proc.stdout.receive_some(6) == b"ready\n"  # the trap is in place
        proc.send_signal(10)
        assert await proc.wait() == 42


async def test_events_iterator_ends_with_the_sandbox():
    async with corral.open_sandbox(corral.Config(net="none")) as box:
        proc = await box.start(["true"])
        seen = []

        async def collect():
            async for event in box.events():
                seen.append(type(event).__name__)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            await proc.wait()
            await box.aclose()
    assert seen == ["SandboxStartEvent", "SandboxExitEvent"]


def test_enter_sandboxes_the_rest_of_the_program(tmp_path):
    marker = tmp_path / "outside.txt"
    script = textwrap.dedent(f"""
        import os, sys, corral
        host_pidns = os.readlink("/proc/self/ns/pid")
        corral.enter(corral.Config(net="none", hostname="entered"))
        # From here on we are inside.
        print(os.uname().nodename, os.getpid(), flush=True)
        open({str(marker)!r}, "w").write("lands in the overlay, not on the host")
        sys.exit(7)
    """)
    work = tmp_path / "work"
    work.mkdir()  # the writable cwd; the marker is outside it
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=work, timeout=60)
    lines = result.stdout.split()
    assert result.returncode == 7, result.stderr
    assert lines[0] == "entered" and lines[1] == "2"
    assert not marker.exists()
