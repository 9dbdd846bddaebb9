"""Run by tests/test_net_cli.py from OUTSIDE a running sandbox: join the sandbox's user and
network namespaces (the test user owns them, so it has every capability there, which the
sandboxed command itself never has), then hand-craft frames on its tap0 -- they go straight
into corral's netstack -- to destinations the sandbox's own kernel would never route there
(127.0.0.1, ::1, ::ffff:127.0.0.1), to prove the stack refuses them "via any path".

    python net_rawsyn.py PID PORT   ->  one JSON object {name: reply summary or null}
"""

import ctypes
import json
import os
import sys

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
pid, port = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
for ns, flag in (("user", CLONE_NEWUSER), ("net", CLONE_NEWNET)):
    fd = os.open("/proc/%d/ns/%s" % (pid, ns), os.O_RDONLY)
    if libc.setns(fd, flag) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns(%s): %s" % (ns, os.strerror(err)))
    os.close(fd)

from scapy.all import ARP, IP, TCP, Ether, IPv6, conf, srp1  # noqa: E402

conf.verb = 0
arp = srp1(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.0.2.2", psrc="10.0.2.100"),
           iface="tap0", timeout=2)
result = {"gateway_mac": arp[ARP].hwsrc if arp is not None else None}
probes = {
    "loopback": IP(src="10.0.2.100", dst="127.0.0.1"),
    "loopback6": IPv6(src="fd00::100", dst="::1"),
    "mapped-loopback": IPv6(src="fd00::100", dst="::ffff:127.0.0.1"),
    # a control: the same kind of frame to an allowed world address is answered
    "control": IP(src="10.0.2.100", dst=sys.argv[3]) if len(sys.argv) > 3 else None,
}
for i, (name, l3) in enumerate(probes.items()):
    if l3 is None or result["gateway_mac"] is None:
        continue
    dport = port if name != "control" else int(sys.argv[4])
    reply = srp1(Ether(dst=result["gateway_mac"]) / l3 / TCP(sport=41000 + i, dport=dport, flags="S"),
                 iface="tap0", timeout=1)
    result[name] = None if reply is None else {"summary": reply.summary(),
                                               "flags": str(reply[TCP].flags) if TCP in reply else None}
print(json.dumps(result))
