"""The sandbox's TAP device, created and configured by pid 1 (DESIGN §4).

Runs inside the sandbox's network namespace before the mounts: the fd is
opened from the host's /dev/net/tun, configured with pyroute2, and handed to
the supervisor over the control socket (SCM_RIGHTS).  pyroute2 is imported
here only, so sandboxes without a network never pay for it.
"""

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFA_F_NODAD = 0x02


def create(tap):
    """Create and configure the TAP described by ``tap`` (see launch.TAP);
    return its fd (blocking, close-on-exec)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if tap.get("vnet_hdr") else 0)
        ifreq = struct.pack("16sH22x", tap["name"].encode(), flags)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
        _configure(tap)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _configure(tap):
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=tap["name"])
        ipr.link("set", index=index, mtu=tap["mtu"], txqlen=tap["txqueuelen"], state="up")
        address, prefix = tap["ipv4"].split("/")
        ipr.addr("add", index=index, address=address, prefixlen=int(prefix))
        address6, prefix6 = tap["ipv6"].split("/")
        ipr.addr("add", index=index, address=address6, prefixlen=int(prefix6), flags=IFA_F_NODAD)
        ipr.route("add", dst="0.0.0.0/0", gateway=tap["gateway4"], oif=index)
        ipr.route("add", dst="::/0", gateway=tap["gateway6"], oif=index, family=10)
