"""corral.aio: the API for asyncio programs (issue 10, point 4).

The README's API example runs the same under trio (corral.open_sandbox / corral.run) and
asyncio (corral.aio.open_sandbox / corral.aio.run), with asyncio coroutines as callbacks;
cancelling the asyncio task kills the sandbox in both network modes.
"""

import asyncio
import json
import os
import textwrap
import time

import pytest

import corral
import corral.aio
from corral.errors import CallbackTypeError

from net_support import PROBE, PY
from world import HTTP_V4, OTHER_V4

pytestmark = pytest.mark.namespaces


def gone(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True  # dead, only not reaped yet
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_aio_run_returns_exit_code_output_and_events():
    result = asyncio.run(corral.aio.run(["sh", "-c", "cat; echo err >&2; exit 3"], net="none",
                                        capture_output=True, input=b"from asyncio\n"))
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"from asyncio\n", b"err\n")
    assert [e.TYPE for e in result.events] == ["sandbox_start", "sandbox_exit"]


def test_aio_open_sandbox_events_are_an_async_iterator():
    async def main():
        async with corral.aio.open_sandbox(net="none") as box:
            proc = await box.start(["sh", "-c", "exit 4"])
            events = [event async for event in box.events()]
            return events, await proc.wait(), proc.returncode, box.id

    events, code, returncode, box_id = asyncio.run(main())
    assert (code, returncode) == (4, 4)
    assert [e.TYPE for e in events] == ["sandbox_start", "sandbox_exit"]
    assert events[0].sandbox_id == box_id and events[-1].exit_code == 4


def test_aio_pipes_and_two_sandboxes_at_once():
    async def one(word):
        async with corral.aio.open_sandbox(net="none") as box:
            proc = await box.start(["sh", "-c", "read x; echo $x-back"], stdin=-1, stdout=-1)
            await proc.stdin.send_all(word.encode() + b"\n")
            await proc.stdin.aclose()
            out = b""
            while chunk := await proc.stdout.receive_some():
                out += chunk
            await proc.wait()
            return out

    async def main():
        return await asyncio.gather(one("a"), one("b"))

    assert asyncio.run(main()) == [b"a-back\n", b"b-back\n"]


@pytest.mark.parametrize("how", ["timeout", "task-cancel", "exception"])
def test_aio_cancellation_kills_the_sandbox_net_none(how):
    pids = []

    async def body():
        async with corral.aio.open_sandbox(net="none") as box:
            proc = await box.start(["sleep", "100"])
            pids.append(proc.pid)
            if how == "exception":
                raise KeyError("the caller failed")
            await proc.wait()

    async def main():
        if how == "timeout":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(body(), 1.0)
        elif how == "task-cancel":
            task = asyncio.create_task(body())
            while not pids:
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(KeyError):
                await body()
        return True

    started = time.monotonic()
    assert asyncio.run(main())
    assert pids and gone(pids[0]), "the sandboxed command outlived the cancellation"
    assert time.monotonic() - started < 10


def test_aio_rejects_wrong_callbacks_before_anything_starts():
    def sync_on_connect(req):
        return corral.ALLOW

    async def main():
        with pytest.raises(CallbackTypeError, match="on_connect"):
            async with corral.aio.open_sandbox(on_connect=sync_on_connect):
                raise AssertionError("the body ran")
        with pytest.raises(CallbackTypeError, match="on_dns"):
            await corral.aio.run(["true"], on_dns=42)
        with pytest.raises(corral.ConfigError, match="mode"):
            await corral.aio.run(["true"], mode="bogus")
        with pytest.raises(corral.ConfigError, match="/no/such/dir-xyz"):
            await corral.aio.run(["true"], net="none", rw=["/no/such/dir-xyz"])

    asyncio.run(main())


def test_trio_open_sandbox_under_asyncio_says_to_use_corral_aio():
    async def main():
        async with corral.open_sandbox(net="none"):
            raise AssertionError("the body ran")

    with pytest.raises(corral.ConfigError, match="corral.aio.open_sandbox"):
        asyncio.run(main())


def test_corral_aio_is_reachable_from_the_package():
    assert corral.aio.open_sandbox is not None and "aio" in corral.__all__


# -- in the world: the README example under trio and asyncio ------------------------------------

README_EXAMPLE = """
import asyncio, json, os, sys
import trio
import corral, corral.aio

FLAVOR = sys.argv[1]
ARGV = json.loads(sys.argv[2])

async def pause():  # a callback awaits its own framework
    if FLAVOR == "asyncio":
        await asyncio.sleep(0.01)
    else:
        await trio.sleep(0.01)

async def on_connect(req: corral.ConnectRequest) -> corral.Verdict:
    await pause()
    if req.name and req.name.endswith(".pythonhosted.org"):
        return corral.ALLOW
    return corral.deny("not a package host")

async def on_dns(query: corral.DnsQuery) -> corral.Verdict:
    await pause()
    return corral.ALLOW if query.qname.endswith(".pythonhosted.org") else corral.deny("no")

async def main(open_sandbox):
    # the README's pypi.org shares its address with files.pythonhosted.org in the world
    config = corral.Config(allow=["www.corral.test"], rw=[os.path.abspath("out")])  # README: "./out" (refused)
    async with open_sandbox(config, on_connect=on_connect, on_dns=on_dns) as box:
        proc = await box.start(ARGV, stdout=-1)
        events = []
        async for event in box.events():      # ends when the sandbox ends
            events.append(event.to_dict())
        out, _ = await proc.communicate()
        code = await proc.wait()
    return {"code": code, "events": events, "out": out.decode()}

if FLAVOR == "trio":
    simple = corral.run(ARGV, allow=["www.corral.test"], capture_output=True)
    full = trio.run(main, corral.open_sandbox)
else:
    simple = asyncio.run(corral.aio.run(ARGV, allow=["www.corral.test"], capture_output=True))
    full = asyncio.run(main(corral.aio.open_sandbox))
full["simple"] = {"code": simple.exit_code, "events": [e.to_dict() for e in simple.events]}
print(json.dumps(full))
"""


@pytest.mark.network
@pytest.mark.parametrize("flavor", ["trio", "asyncio"])
def test_readme_api_example_runs_under_trio_and_asyncio(world, tmp_path, flavor):
    (tmp_path / "out").mkdir()
    script = tmp_path / "example.py"
    script.write_text(README_EXAMPLE)
    probes = [{"op": "tcp", "host": "www.corral.test", "port": 80, "timeout": 3, "send": "GET / HTTP/1.0\r\n\r\n"},
              {"op": "tcp", "host": "files.pythonhosted.org", "port": 80, "timeout": 3},
              {"op": "tcp", "host": OTHER_V4[0], "port": 80, "timeout": 3}]
    argv = [PY, PROBE, json.dumps(probes)]
    proc = world.run([PY, str(script), flavor, json.dumps(argv)], capture_output=True, text=True,
                     timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == 0, out
    conns = {e["dst_ip"]: e for e in out["events"] if e["type"] == "connect"}
    assert (conns[HTTP_V4]["verdict"], conns[HTTP_V4]["rule"]) == ("allow", "www.corral.test")
    files = [e for e in out["events"] if e["type"] == "connect" and "files.pythonhosted.org" in (e.get("names") or ())]
    assert files and all((e["verdict"], e["rule"]) == ("allow", "callback") for e in files), out["events"]
    assert (conns[OTHER_V4[0]]["verdict"], conns[OTHER_V4[0]]["reason"]) == ("deny", "not a package host")
    dns = [e for e in out["events"] if e["type"] == "dns" and e["qname"].startswith("files.")]
    assert dns and dns[0]["rule"] == "callback"
    assert not [e for e in out["events"] if e["type"] == "policy_error"], out["events"]
    assert [e["type"] for e in out["events"]][-1] == "sandbox_exit"
    simple = out["simple"]
    assert simple["code"] == 0
    assert any(e["type"] == "connect" and e["rule"] == "www.corral.test" for e in simple["events"])


AIO_CANCEL = """
import asyncio, json, sys, time
import corral, corral.aio

pids, seen = [], []

async def on_connect(req):
    seen.append(str(req.dst_ip))
    await asyncio.sleep(30)  # slower than the policy timeout: its task is cancelled
    return corral.ALLOW

async def main():
    async with corral.aio.open_sandbox(on_connect=on_connect, policy_timeout=0.5) as box:
        proc = await box.start([sys.executable, "-c",
            "import socket,time; s=socket.socket(); s.settimeout(5)\\n"
            "try: s.connect(('%s', 80))\\nexcept OSError as e: print(e.errno, flush=True)\\n"
            "time.sleep(100)"], stdout=-1)
        pids.append(proc.pid)
        first = await proc.stdout.receive_some()
        pids.append(first.decode().strip())
        await proc.wait()

async def outer():
    try:
        await asyncio.wait_for(main(), 4)
    except TimeoutError:
        pass
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    return len(tasks)

left = asyncio.run(outer())
print(json.dumps({"pid": pids[0], "errno": pids[1] if len(pids) > 1 else None, "seen": seen, "left": left}))
"""


@pytest.mark.network
def test_aio_cancellation_kills_the_sandbox_filtered_and_callbacks_time_out(world, tmp_path):
    script = tmp_path / "cancel.py"
    script.write_text(AIO_CANCEL % OTHER_V4[0])
    proc = world.run([PY, str(script)], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["seen"] == [OTHER_V4[0]]
    assert out["errno"] == "111"  # the callback timed out: a deny (refused)
    assert out["left"] == 0  # no asyncio task of corral's left behind
    assert gone(out["pid"]), "the sandboxed command outlived the cancellation"


def test_aio_module_docstring_example_is_valid_python():
    import ast

    ast.parse(textwrap.dedent(corral.aio.__doc__.split("\n\n")[1]))
    assert os.path.basename(corral.aio.__file__) == "aio.py"
