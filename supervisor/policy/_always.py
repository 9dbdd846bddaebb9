"""The always-denied destinations.

A sandbox must not reach the host through a side door nor the cloud's metadata service,
whatever its policy says, unless the user names that address explicitly. The set:

===============  ===========================================================
category         ranges
===============  ===========================================================
loopback         127.0.0.0/8, ::1
gateway          10.0.2.2, 10.0.2.3, fd00::2, fd00::3 (corral's virtual gateway
                 and DNS address inside the sandbox; dialing them from the host
                 would hit whatever holds those addresses on the host's networks)
metadata         169.254.169.254, 100.100.100.200, 168.63.129.16, fd00:ec2::/32
link-local       169.254.0.0/16, fe80::/10
unspecified      0.0.0.0/8, ::
multicast        224.0.0.0/4, 255.255.255.255, ff00::/8 (the host's LAN, not the internet)
===============  ===========================================================

IPv6 spellings of the IPv4 ranges are denied too: IPv4-mapped ``::ffff:a.b.c.d``
(normalized to the IPv4 address before anything else), IPv4-compatible ``::a.b.c.d``,
NAT64 ``64:ff9b::a.b.c.d`` and 6to4 ``2002:AABB:CCDD::``.

"Named explicitly" means: an *allow* rule for one exact address (an address rule, or a
/32 or /128 network) that the user gave directly (``--allow``, ``Config(allow=...)``,
``Policy(allow=...)``), never one read from a file (``--allow-file``, and so never a
suggested allowlist fed back), never a wider network and never a domain rule. The rule
must lie inside the (most specific) always-denied range the destination falls in and
contain the destination as written: ``--allow 169.254.169.254`` opens the metadata
address; ``--allow 169.254.0.0/16``, ``--allow 0.0.0.0/0`` and ``--allow localhost`` open
nothing (a DNS answer pointing at 127.0.0.1 stays denied). The embedded forms are opened
only by naming the IPv6 form itself. ``--allow-host-port PORT`` is the way to reach a port
on the host's loopback (10.0.2.2:PORT → 127.0.0.1:PORT).
"""

from __future__ import annotations

import functools
import ipaddress

from ._rules import IPAddress, IPNetwork

__all__ = ["ALWAYS_DENIED", "GATEWAY_V4", "GATEWAY_V6", "always_denied"]

GATEWAY_V4 = ipaddress.IPv4Address("10.0.2.2")
GATEWAY_V6 = ipaddress.IPv6Address("fd00::2")

_N = ipaddress.ip_network
# Most specific first: 169.254.169.254 reports as metadata, not link-local.
ALWAYS_DENIED: tuple[tuple[str, IPNetwork], ...] = (
    ("metadata", _N("169.254.169.254/32")),
    ("metadata", _N("100.100.100.200/32")),
    ("metadata", _N("168.63.129.16/32")),
    ("metadata", _N("fd00:ec2::/32")),
    ("loopback", _N("127.0.0.0/8")),
    ("loopback", _N("::1/128")),
    ("gateway", _N("10.0.2.2/32")),
    ("gateway", _N("10.0.2.3/32")),
    ("gateway", _N("fd00::2/128")),
    ("gateway", _N("fd00::3/128")),
    ("link-local", _N("169.254.0.0/16")),
    ("link-local", _N("fe80::/10")),
    ("unspecified", _N("0.0.0.0/8")),
    ("unspecified", _N("::/128")),
    ("multicast", _N("224.0.0.0/4")),
    ("multicast", _N("255.255.255.255/32")),
    ("multicast", _N("ff00::/8")),
)

_COMPAT = _N("::/96")
_NAT64 = _N("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (compatible, NAT64, 6to4), if any.

    ``::`` and ``::1`` are not treated as IPv4-compatible: they are themselves.
    """
    if ip.version != 6:
        return None
    if ip in _COMPAT and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ip.ipv4_mapped


def _lookup(ip: IPAddress) -> tuple[str, IPNetwork] | None:
    for category, net in ALWAYS_DENIED:
        if ip.version == net.version and ip in net:
            return category, net
    return None


@functools.lru_cache(maxsize=4096)  # pure; a sandbox talks to few addresses, each many times
def always_denied(ip: IPAddress) -> tuple[str, IPNetwork] | None:
    """``(category, range)`` when *ip* (already normalized) is always denied.

    For an IPv6 form of an always-denied IPv4 address the range returned is the /128 of
    the address itself: only naming that exact IPv6 address opens it.
    """
    hit = _lookup(ip)
    if hit is not None:
        return hit
    v4 = embedded_ipv4(ip)
    if v4 is not None:
        hit = _lookup(v4)
        if hit is not None:
            return hit[0], ipaddress.ip_network(ip)
    return None
