"""No event is lost under a burst (issue 4 acceptance): 10,000 connections
from inside the sandbox, 32 at a time; the event log has exactly one connect
and one close per connection the client made."""

import collections
import json

import pytest

from net_support import PY, corral
from world import ECHO_V4, PORT_ECHO

pytestmark = [pytest.mark.namespaces, pytest.mark.network]

CONNECTIONS = 10_000

CLIENT = r"""
import asyncio, sys
host, port, total, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 32
ok = failed = 0
async def one():
    global ok, failed
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        writer.write(b"x")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
        writer.close()
        await writer.wait_closed()
        ok += 1
    except Exception:
        failed += 1
async def worker(n):
    for _ in range(n):
        await one()
async def main():
    await asyncio.gather(*(worker(total // width + (i < total % width)) for i in range(width)))
asyncio.run(main())
print(ok, failed)
"""


def test_ten_thousand_connections_lose_no_event(world, tmp_path):
    out = corral(world, tmp_path, ["--allow", "%s:%d" % (ECHO_V4, PORT_ECHO)],
                 [PY, "-c", CLIENT, ECHO_V4, str(PORT_ECHO), str(CONNECTIONS)], timeout=300)
    assert out.proc.returncode == 0, out.proc.stderr[-2000:]
    ok, failed = map(int, out.proc.stdout.split())
    assert ok + failed == CONNECTIONS and ok >= CONNECTIONS * 0.99, (ok, failed)
    connects = [e for e in out.events if e["type"] == "connect"]
    closes = collections.Counter(e["id"] for e in out.events if e["type"] == "close")
    assert len(connects) == CONNECTIONS  # one per connection the client attempted
    assert len({e["id"] for e in connects}) == CONNECTIONS
    assert all(closes[e["id"]] == 1 for e in connects), "a connect without exactly one close"
    assert sum(closes.values()) == CONNECTIONS
    allowed = [e for e in connects if e["verdict"] == "allow"]
    assert len(allowed) >= ok
    assert json.dumps(out.events[-1]).startswith('{"type": "sandbox_exit"')
