"""Network-side limits (issue 5 item 3): --max-conns and --max-rate refuse new
flows beyond the limit at once, with an event naming the limit, and the
supervisor keeps serving."""

import pytest

from net_support import PY, corral
from world import ECHO_V4, PORT_ECHO

pytestmark = [pytest.mark.namespaces, pytest.mark.network]

HOLD_OPEN = r"""
import socket, sys
held, refused = [], 0
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((sys.argv[2], int(sys.argv[3])))
        held.append(s)
    except ConnectionRefusedError:
        refused += 1
print(len(held), refused)
"""


def test_connection_flood_beyond_max_conns_is_refused(world, tmp_path):
    out = corral(world, tmp_path, ["--allow", ECHO_V4, "--max-conns", "3"],
                 [PY, "-c", HOLD_OPEN, "8", ECHO_V4, str(PORT_ECHO)])
    assert out.proc.returncode == 0, out.dump()
    assert out.proc.stdout.split() == ["3", "5"]
    limited = [e for e in out.connects() if e["rule"] == "limit:max-conns"]
    assert len(limited) == 5 and all(e["verdict"] == "deny" for e in limited)


def test_connection_rate_beyond_max_rate_is_refused(world, tmp_path):
    out = corral(world, tmp_path, ["--allow", ECHO_V4, "--max-rate", "4"],
                 [PY, "-c", HOLD_OPEN, "20", ECHO_V4, str(PORT_ECHO)])
    assert out.proc.returncode == 0, out.dump()
    held, refused = map(int, out.proc.stdout.split())
    assert 4 <= held < 20 and held + refused == 20  # a burst of one second's worth, then refused
    assert any(e["rule"] == "limit:max-rate" for e in out.connects())
