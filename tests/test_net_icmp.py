"""ICMP echo (issue 3 item 1): a ping from inside is a policy-checked flow,
forwarded through the supervisor's unprivileged ping socket; pid 1 opens
ICMP echo sockets to the sandbox's own group so `ping` needs no CAP_NET_RAW."""

import pytest

from net_support import PY, corral
from world import ECHO_V4, HTTP_V4

pytestmark = [pytest.mark.namespaces, pytest.mark.network]

PING = r"""
import socket, struct, sys
for dst in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    s.settimeout(3)
    s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 7) + b"corral-ping", (dst, 0))
    try:
        data, _ = s.recvfrom(1500)
        print(dst, "reply" if data[0] == 0 and data.endswith(b"corral-ping") else "bad")
    except OSError as exc:
        print(dst, type(exc).__name__)
"""


def test_ping_is_forwarded_when_allowed_and_refused_otherwise(world, tmp_path):
    out = corral(world, tmp_path, ["--allow", HTTP_V4], [PY, "-c", PING, HTTP_V4, ECHO_V4])
    assert out.proc.returncode == 0, out.dump()
    lines = dict(line.split() for line in out.proc.stdout.splitlines())
    assert lines[HTTP_V4] == "reply", out.dump()
    assert lines[ECHO_V4] != "reply", out.dump()
    allowed = out.connect(proto="icmp", dst_ip=HTTP_V4)
    denied = out.connect(proto="icmp", dst_ip=ECHO_V4)
    assert allowed["verdict"] == "allow" and denied["verdict"] == "deny"
    assert len(out.closes_of(allowed["id"])) == 1 and len(out.closes_of(denied["id"])) == 1
