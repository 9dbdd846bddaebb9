"""The netstack library never writes to the supervisor's stderr (DESIGN §5: Go does
not log): what gVisor would log is counted in the stats instead."""

import subprocess
import sys

CODE = r"""
from scapy.all import IP, TCP, Ether
from corral.net.netstack import Netstack

ns = Netstack.open(mode="pump")
# a "martian" frame: loopback source, which gVisor drops and would log to stderr
frame = bytes(Ether(dst="02:00:0a:00:02:02", src="02:00:00:00:00:01") /
              IP(src="127.0.0.1", dst="10.0.2.2") / TCP(dport=80, flags="S"))
ns.inject([frame] * 3)
print(ns.stats()["log_lines"])
ns.close()
"""


def test_gvisor_log_lines_are_counted_not_printed():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) >= 1, proc.stdout  # rate-limited: one line a minute
    assert proc.stderr == "", proc.stderr
