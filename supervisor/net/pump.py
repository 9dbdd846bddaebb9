"""The pump data path: trio moves ethernet frames between the TAP fd and the
netstack, running the user's packet filter on each one (DESIGN §4).

    async with trio.open_nursery() as nursery:
        pump = await nursery.start(run_pump, netstack, tap_fd, on_packet)

``on_packet(pkt) -> bool`` sees a :class:`Packet` (cheap parsed header fields,
``.scapy()`` for a full decode) and returns False to drop it.  A filter that
raises drops the packet and is counted (``Pump.filter_errors``), it never
kills the pump.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import struct

import attrs
import trio

from corral.bindings.netstack import new_lens

log = logging.getLogger("corral.net.pump")

# Frames read from the TAP per batch before they are injected together.
BATCH = 64
_READ_SIZE = 65520 + 14

_TUNGETIFF = 0x800454D2
_IFF_VNET_HDR = 0x4000
_VNET_HDR_SIZE = 10  # struct virtio_net_hdr, the TAP's default

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
ETH_ARP = 0x0806


class Packet:
    """One ethernet frame, parsed lazily: only the fields read are decoded.

    ``direction`` is ``"egress"`` (sandbox -> world) or ``"ingress"``.
    ``src``/``dst`` are ipaddress objects (None for non-IP), ``proto`` the IP
    protocol number (6 tcp, 17 udp, 1/58 icmp), ``sport``/``dport`` the
    ports (None when not TCP/UDP or for a later fragment), ``length`` the
    frame length, ``raw`` the bytes.
    """

    __slots__ = ("raw", "direction", "_l3")

    def __init__(self, raw, direction):
        self.raw = raw
        self.direction = direction
        self._l3 = None

    def __repr__(self):
        return "<Packet %s %s %s -> %s proto=%s len=%d>" % (
            self.direction, hex(self.ethertype), self.src, self.dst, self.proto, self.length)

    @property
    def length(self):
        return len(self.raw)

    @property
    def ethertype(self):
        return struct.unpack_from("!H", self.raw, 12)[0] if len(self.raw) >= 14 else 0

    def _parse(self):
        # (src, dst, proto, l4 offset or None)
        if self._l3 is None:
            raw, et = self.raw, self.ethertype
            parsed = (None, None, None, None)
            if et == ETH_IPV4 and len(raw) >= 34:
                ihl = (raw[14] & 0x0F) * 4
                frag_off = struct.unpack_from("!H", raw, 20)[0] & 0x1FFF
                parsed = (ipaddress.IPv4Address(raw[26:30]), ipaddress.IPv4Address(raw[30:34]),
                          raw[23], 14 + ihl if frag_off == 0 else None)
            elif et == ETH_IPV6 and len(raw) >= 54:
                # Extension headers are not walked: proto is the next header.
                parsed = (ipaddress.IPv6Address(raw[22:38]), ipaddress.IPv6Address(raw[38:54]),
                          raw[20], 54)
            self._l3 = parsed
        return self._l3

    @property
    def src(self):
        return self._parse()[0]

    @property
    def dst(self):
        return self._parse()[1]

    @property
    def proto(self):
        return self._parse()[2]

    def _ports(self):
        _, _, proto, off = self._parse()
        if proto in (6, 17) and off is not None and len(self.raw) >= off + 4:
            return struct.unpack_from("!HH", self.raw, off)
        return (None, None)

    @property
    def sport(self):
        return self._ports()[0]

    @property
    def dport(self):
        return self._ports()[1]

    def scapy(self):
        """Full decode with scapy (imported on first use: it is slow)."""
        from scapy.layers.l2 import Ether

        return Ether(self.raw)


@attrs.define
class Pump:
    """Counters of a running pump (read them any time)."""

    frames_in: int = 0  # sandbox -> stack, injected
    frames_out: int = 0  # stack -> sandbox, written
    dropped_in: int = 0  # dropped by the filter
    dropped_out: int = 0
    filter_errors: int = 0

    def __repr__(self):
        return "<Pump in=%d out=%d dropped=%d/%d errors=%d>" % (
            self.frames_in, self.frames_out, self.dropped_in, self.dropped_out, self.filter_errors)


def _filter(pump, on_packet, frames, direction):
    kept = []
    for raw in frames:
        try:
            ok = on_packet(Packet(raw, direction))
        except Exception:
            if pump.filter_errors == 0:
                log.warning("packet filter raised; dropping the packet", exc_info=True)
            pump.filter_errors += 1
            ok = False
        if ok:
            kept.append(raw)
        elif direction == "egress":
            pump.dropped_in += 1
        else:
            pump.dropped_out += 1
    return kept


def _vnet_hdr_size(fd):
    """10 if the TAP behind ``fd`` was opened with IFF_VNET_HDR (each frame
    then starts with a virtio_net_hdr), else 0."""
    ifr = bytearray(40)
    try:
        fcntl.ioctl(fd, _TUNGETIFF, ifr)
    except OSError:  # not a TAP (tests may pump a socketpair)
        return 0
    (flags,) = struct.unpack_from("=H", ifr, 16)
    return _VNET_HDR_SIZE if flags & _IFF_VNET_HDR else 0


async def run_pump(netstack, tap_fd, on_packet=None, *, task_status=trio.TASK_STATUS_IGNORED):
    """Move frames until cancelled.  ``tap_fd`` is set non-blocking and stays
    the caller's.  ``task_status.started(pump)`` hands back the counters.

    A TAP with IFF_VNET_HDR works too: the header is stripped on the way in
    and written as zeros (no offload asked, none used) on the way out; the
    pump never enables offloads, so the sandbox's kernel keeps sending
    complete checksums."""
    os.set_blocking(tap_fd, False)
    vnet = _vnet_hdr_size(tap_fd)
    pump = Pump()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sandbox_to_stack, netstack, tap_fd, on_packet, pump, vnet)
        nursery.start_soon(_stack_to_sandbox, netstack, tap_fd, on_packet, pump, vnet)
        task_status.started(pump)


async def _sandbox_to_stack(netstack, fd, on_packet, pump, vnet):
    if on_packet is not None:
        await _sandbox_to_stack_filtered(netstack, fd, on_packet, pump, vnet)
        return
    # No filter: read frames back to back into one reused buffer and inject
    # them in one call, without a Python object per frame; outbound frames
    # are written straight from the reader's buffer.  With Go keeping packet
    # references instead of copies (link.go), measured in the world, iperf3,
    # 4 interleaved rounds, medians [min-max] Gbit/s: up 8.28 [8.08-8.50] vs
    # 4.87 [4.69-5.05] with bytes per frame, down 8.62 [8.22-8.85] vs 5.92
    # [5.71-6.03].
    data = bytearray(BATCH * _READ_SIZE)
    view = memoryview(data)
    lens = new_lens(BATCH)
    readv = os.readv
    hdr = [bytearray(vnet)] if vnet else []
    while True:
        await trio.lowlevel.wait_readable(fd)
        n = off = 0
        while n < BATCH:
            try:
                got = readv(fd, (*hdr, view[off:off + _READ_SIZE])) - vnet
            except BlockingIOError:
                break
            if got <= 0:  # a bare header: nothing to deliver
                break
            lens[n] = got
            off += got
            n += 1
        if n:
            netstack.inject_packed(view, lens, n)
            pump.frames_in += n
        # Let the outbound loop and the event loop run between batches.
        await trio.lowlevel.checkpoint()


async def _sandbox_to_stack_filtered(netstack, fd, on_packet, pump, vnet):
    while True:
        await trio.lowlevel.wait_readable(fd)
        frames = []
        while len(frames) < BATCH:
            try:
                raw = os.read(fd, _READ_SIZE + vnet)
            except BlockingIOError:
                break
            if len(raw) <= vnet:  # a bare header: nothing to deliver
                break
            frames.append(raw[vnet:] if vnet else raw)
        frames = _filter(pump, on_packet, frames, "egress")
        if frames:
            netstack.inject(frames)
            pump.frames_in += len(frames)
        await trio.lowlevel.checkpoint()


async def _stack_to_sandbox(netstack, fd, on_packet, pump, vnet):
    if vnet:
        zero_hdr = bytes(vnet)

        def write(fd, raw):
            return os.writev(fd, (zero_hdr, raw))
    else:
        write = os.write
    while True:
        gen = netstack.ready_gen
        if on_packet is None:
            # Views into the reader's buffer: written before the next read.
            frames = netstack.read_frame_views()
        else:
            frames = netstack.read_frames()
        if not frames:
            await netstack.wait_ready(gen)
            continue
        if on_packet is not None:
            frames = _filter(pump, on_packet, frames, "ingress")
        for raw in frames:
            while True:
                try:
                    write(fd, raw)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
        pump.frames_out += len(frames)
        await trio.lowlevel.checkpoint()
