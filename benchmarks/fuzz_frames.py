"""Frame fuzzer for both data paths of corral's netstack (issue 5, item 5).

Pushes scapy-generated valid-ish frames (Ethernet / ARP / IPv4 / IPv6 / TCP / UDP / ICMP /
ICMPv6 / DNS / fragments), mutated and truncated copies of them, and raw noise into

- pump:   ``Netstack.inject`` in batches (the path Python drives);
- direct: a real TAP driven by Go, written from its sandbox side through an AF_PACKET
          socket bound to ``tap0`` (exactly what a program inside the sandbox could send),

and checks afterwards: no crash, goroutines back to their baseline, no fd growth, RSS
growth bounded.  Prints one JSON object per path; exit status 1 if a check failed.

    python benchmarks/fuzz_frames.py --frames 1000000            # on demand (both paths)
    python benchmarks/fuzz_frames.py --frames 20000 --path pump  # what the test suite runs

Network safety: the script re-executes itself in a fresh user+net namespace
(``unshare -Urn``) whose only interface is a down ``lo`` (plus the fuzzer's ``tap0``),
and the stack never gets a verdict (no verdict = deny after the policy timeout), so
nothing is ever dialled and no frame can leave the namespace.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time

POLICY_TIMEOUT = 0.05
BATCH = 256
POOL = 1500
SETTLE_TIMEOUT = 30.0
RSS_SLACK_KIB = 48 * 1024  # bounded growth: Go's heap reaching its working size
GOROUTINE_SLACK = 2


# ---------------------------------------------------------------- frame generation

def build_pool(rng: random.Random, n: int) -> list[bytes]:
    """``n`` well-formed frames of every kind the sandbox could send."""
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
    from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6ND_RS,
                                    IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop)
    from scapy.layers.l2 import ARP, Ether

    v4 = ["10.0.2.2", "10.0.2.3", "198.51.100.7", "203.0.113.1", "127.0.0.1",
          "169.254.169.254", "224.0.0.1", "255.255.255.255", "0.0.0.0", "10.0.2.100"]
    v6 = ["fd00::2", "fd00::3", "2001:db8::7", "::1", "fe80::1", "ff02::1",
          "::ffff:127.0.0.1", "fd00:ec2::254", "fd00::100"]
    eth = Ether(src="02:00:0a:00:02:64", dst="02:00:0a:00:02:02")
    flags = ["S", "SA", "A", "R", "F", "FA", "PA", "SF", "SR", "", "FSRPAUEC"]

    def l4(v6_: bool):
        kind = rng.randrange(6)
        sport, dport = rng.randrange(65536), rng.choice([53, 80, 443, 7, rng.randrange(65536)])
        payload = rng.randbytes(rng.choice([0, 1, 16, 200, 1400]))
        if kind == 0:
            return TCP(sport=sport, dport=dport, flags=rng.choice(flags), seq=rng.getrandbits(32),
                       ack=rng.getrandbits(32), window=rng.randrange(65536),
                       options=rng.choice([[], [("MSS", rng.randrange(65536))],
                                           [("WScale", rng.randrange(20)), ("SAckOK", b""),
                                            ("Timestamp", (1, 0))]])) / payload
        if kind == 1:
            return UDP(sport=sport, dport=53) / DNS(rd=1, qd=DNSQR(qname=f"x{rng.randrange(999)}.test",
                                                                  qtype=rng.choice([1, 28, 16, 255])))
        if kind == 2:
            return UDP(sport=sport, dport=dport) / payload
        if kind == 3:
            return (ICMPv6EchoRequest(id=rng.randrange(65536), data=payload) if v6_
                    else ICMP(type=rng.choice([8, 0, 3, 11, 5, 13]), id=rng.randrange(65536)) / payload)
        if kind == 4 and v6_:
            return rng.choice([ICMPv6ND_NS(tgt="fd00::2"), ICMPv6ND_RS()])
        return TCP(sport=sport, dport=dport, flags="S")

    pool = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            frame = eth / ARP(op=rng.choice([1, 2]), psrc="10.0.2.100", pdst=rng.choice(v4))
        elif r < 0.55:
            ip = IP(src=rng.choice(["10.0.2.100", rng.choice(v4)]), dst=rng.choice(v4),
                    ttl=rng.choice([0, 1, 64, 255]), id=rng.randrange(65536),
                    options=[IPOption_NOP()] * rng.choice([0, 0, 4, 40]))
            if rng.random() < 0.1:  # fragments, first or later
                ip.flags, ip.frag = rng.choice([("MF", 0), (0, rng.randrange(1, 8000)),
                                                ("MF", rng.randrange(1, 8000))])
            frame = eth / ip / l4(False)
        else:
            ip6 = IPv6(src=rng.choice(["fd00::100", rng.choice(v6)]), dst=rng.choice(v6),
                       hlim=rng.choice([0, 1, 64, 255]))
            if rng.random() < 0.1:
                ip6 = ip6 / rng.choice([IPv6ExtHdrHopByHop(), IPv6ExtHdrFragment(
                    offset=rng.randrange(8000), m=rng.randrange(2), id=rng.getrandbits(32))])
            frame = eth / ip6 / l4(True)
        pool.append(bytes(frame))
    return pool


def frames(pool: list[bytes], rng: random.Random, total: int):
    """``total`` frames: 45% as built, 35% mutated, 12% truncated, 8% raw noise."""
    for _ in range(total):
        base = rng.choice(pool)
        r = rng.random()
        if r < 0.45:
            yield base
        elif r < 0.80:
            b = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            yield bytes(b)
        elif r < 0.92:
            yield base[: rng.randrange(len(base))]
        else:
            yield rng.randbytes(rng.choice([0, 1, 13, 14, 34, 60, 300, 1514]))


# ---------------------------------------------------------------- measurements

def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


SPURIOUS_ENOSPC = 0


def drain(ns) -> None:
    global SPURIOUS_ENOSPC
    from corral.errors import NetstackError

    while True:
        try:
            if not ns.poll_events():
                break
        except NetstackError as exc:
            # Bug in capi.go corral_stack_poll_events: it checks events.Len() after
            # take() outside the queue lock, so an event pushed in between makes an
            # empty take look like "payload does not fit" (ENOSPC).  Counted, retried.
            if "buffer too small" not in str(exc):
                raise
            SPURIOUS_ENOSPC += 1
    if ns.mode == "pump":
        while ns.read_frames():
            pass


def settle(ns, baseline: int) -> int:
    """Wait (bounded) until the stack's goroutines are back to ``baseline``."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        drain(ns)
        g = ns.stats()["goroutines"]
        if g <= baseline + GOROUTINE_SLACK or time.monotonic() > deadline:
            return g
        time.sleep(0.05)


def still_reading(ns, send) -> bool:
    """Liveness: a well-formed ARP request for the gateway still reaches the stack."""
    from scapy.layers.l2 import ARP, Ether

    arp = bytes(Ether(src="02:00:0a:00:02:64", dst="ff:ff:ff:ff:ff:ff")
                / ARP(op=1, hwsrc="02:00:0a:00:02:64", psrc="10.0.2.100", pdst="10.0.2.2"))
    before = ns.stats()["frames_in"]
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        send([arp])
        if ns.stats()["frames_in"] > before:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- the two paths

def open_tap(mtu: int) -> int:
    from pyroute2 import IPRoute

    tun = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    # TAP, NO_PI, VNET_HDR: as corral creates it (the direct path requires the header)
    fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH", b"tap0", 0x0002 | 0x1000 | 0x4000))
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="tap0")[0]
        ipr.link("set", index=idx, mtu=mtu, txqlen=1000)
        ipr.addr("add", index=idx, address="10.0.2.100", prefixlen=24)
        ipr.link("set", index=idx, state="up")
    return tun


STACK_MAC = bytes.fromhex("02000a000202")


def kernel_like(frame: bytes) -> bytes:
    """What the sandbox's kernel emits on tap0: unicast frames go to the stack's MAC.

    gVisor's fdbased reader (readv mode, as pinned) *stops reading for good* when a frame
    is addressed to another unicast MAC (see --raw-ethernet); a sandbox needs CAP_NET_RAW
    in its netns to send one.
    """
    if len(frame) >= 6 and not frame[0] & 1:
        return STACK_MAC + frame[6:]
    return frame


def run_path(path: str, pool, seed: int, total: int, raw_ethernet: bool = False) -> dict:
    from corral.net.netstack import Netstack

    rng = random.Random(seed)
    warm = min(5000, max(total // 10, 500))
    tap = sender = -1
    if path == "pump":
        ns = Netstack.open(mode="pump", policy_timeout=POLICY_TIMEOUT, udp_idle_timeout=1.0,
                           mtu=1500)

        def send(batch):
            ns.inject(batch)
            drain(ns)
    else:
        tap = open_tap(1500)
        ns = Netstack.open(tap, mode="direct", policy_timeout=POLICY_TIMEOUT,
                           udp_idle_timeout=1.0, mtu=1500)
        os.close(tap)  # Go keeps its own dup
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sender.bind(("tap0", 0))
        rejected = 0

        def send(batch):
            nonlocal rejected
            for f in batch:
                try:
                    sender.send(f if raw_ethernet else kernel_like(f))
                except OSError:  # shorter than an ethernet header, too long, queue full
                    rejected += 1
            drain(ns)

    def push(n):
        batch = []
        for f in frames(pool, rng, n):
            batch.append(f)
            if len(batch) == BATCH:
                send(batch)
                batch = []
        if batch:
            send(batch)

    push(warm)  # the Go heap and the kernel queues reach their working size
    time.sleep(2 * POLICY_TIMEOUT + 1.0)  # the warm-up's flows time out (UDP idle: 1 s)
    drain(ns)
    base_g = ns.stats()["goroutines"]
    base_fd, base_rss = fd_count(), rss_kib()
    samples, peak_g = [], base_g
    t0 = time.monotonic()
    done = 0
    step = max(total // 10, 1)
    while done < total:
        n = min(step, total - done)
        push(n)
        done += n
        peak_g = max(peak_g, ns.stats()["goroutines"])
        samples.append(rss_kib())
    elapsed = time.monotonic() - t0
    after_g = settle(ns, base_g)
    alive = still_reading(ns, send)
    stats = ns.stats()
    after_fd, after_rss = fd_count(), rss_kib()
    tap_stats = {}
    if path == "direct":  # tx: frames the sandbox side sent into the TAP, for Go to read
        with open("/proc/net/dev") as f:  # per netns, unlike /sys/class/net here
            row = next(line for line in f if line.strip().startswith("tap0:")).split(":")[1].split()
        tap_stats = {"rx_packets": int(row[1]), "tx_packets": int(row[9]), "tx_dropped": int(row[11])}
    ns.close()
    if sender != -1:
        sender.close()
    result = {
        "path": path + ("-raw-ethernet" if raw_ethernet and path == "direct" else ""),
        "frames": total, "seconds": round(elapsed, 2),
        "frames_per_s": round(total / elapsed), "frames_in": stats["frames_in"],
        "frames_out": stats["frames_out"], "flows_total": stats["flows_total"],
        "dns_queries": stats["dns_queries"], "drops": stats["drops"],
        "still_reading": alive, "goroutines": {"baseline": base_g, "peak": peak_g, "after": after_g},
        "fds": {"before": base_fd, "after": after_fd},
        "rss_kib": {"before": base_rss, "after": after_rss, "max": max(samples),
                    "samples": samples},
    }
    result["spurious_enospc"] = SPURIOUS_ENOSPC
    if path == "direct":
        result["rejected_by_kernel"] = rejected
        result["tap"] = tap_stats
    failures = []
    if after_g > base_g + GOROUTINE_SLACK:
        failures.append(f"goroutines {base_g} -> {after_g}")
    if not alive:
        failures.append("the stack stopped reading frames (a fuzzed frame killed the data path)")
    if after_fd > base_fd:
        failures.append(f"fds {base_fd} -> {after_fd}")
    if after_rss - base_rss > RSS_SLACK_KIB:
        failures.append(f"RSS grew {after_rss - base_rss} KiB")
    result["failures"] = failures
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=1_000_000, help="per path")
    ap.add_argument("--path", choices=["pump", "direct", "both"], default="both")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--raw-ethernet", action="store_true",
                    help="direct path: keep fuzzed destination MACs (kills the pinned fdbased reader)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.inside:
        # Never fuzz in the caller's network namespace.
        cmd = ["unshare", "-Urn", sys.executable, os.path.abspath(__file__), "--inside",
               "--frames", str(args.frames), "--path", args.path, "--seed", str(args.seed),
               *(["--raw-ethernet"] if args.raw_ethernet else [])]
        return subprocess.run(cmd).returncode
    with open("/proc/net/dev") as f:
        ifaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    if ifaces != ["lo"]:
        print(f"refusing to fuzz: not in a fresh network namespace ({ifaces})", file=sys.stderr)
        return 2
    pool = build_pool(random.Random(args.seed), POOL)
    ok = True
    for path in (["pump", "direct"] if args.path == "both" else [args.path]):
        res = run_path(path, pool, args.seed, args.frames, args.raw_ethernet)
        print(json.dumps(res), flush=True)
        ok = ok and not res["failures"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
