"""Run inside a `corral run --root` sandbox by tests/test_net_cli.py: hand-craft TCP SYNs
on tap0 to destinations the sandbox's own kernel would never route there (127.0.0.1,
::1, ::ffff:127.0.0.1), to prove the stack refuses them "via any path".

    python net_rawsyn.py PORT   ->  one JSON object: {name: reply summary or null}, or
                                    {"raw_sockets": "EPERM"} when the sandbox cannot
                                    craft packets at all (no CAP_NET_RAW)
"""

import json
import socket
import sys

try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
except PermissionError:
    print(json.dumps({"raw_sockets": "EPERM"}))
    sys.exit(0)

from scapy.all import ARP, IP, TCP, Ether, IPv6, conf, srp1  # noqa: E402

conf.verb = 0
port = int(sys.argv[1])
arp = srp1(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.0.2.2", psrc="10.0.2.100"),
           iface="tap0", timeout=2)
result = {"gateway_mac": arp[ARP].hwsrc if arp is not None else None}
probes = {
    "loopback": IP(src="10.0.2.100", dst="127.0.0.1"),
    "loopback6": IPv6(src="fd00::100", dst="::1"),
    "mapped-loopback": IPv6(src="fd00::100", dst="::ffff:127.0.0.1"),
}
for i, (name, l3) in enumerate(probes.items()):
    reply = srp1(Ether(dst=result["gateway_mac"]) / l3 / TCP(sport=41000 + i, dport=port, flags="S"),
                 iface="tap0", timeout=0.5)
    result[name] = None if reply is None else {"summary": reply.summary(),
                                               "flags": str(reply[TCP].flags) if TCP in reply else None}
print(json.dumps(result))
