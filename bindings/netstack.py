"""Thin wrappers over libcorralnet (bindings/netstack.h).

Each function validates its arguments, calls the C function, turns a negative
status into :class:`corral.errors.NetstackError` and copies results out of
caller-owned buffers.  Buffers that are reused call after call (events,
frames) live in small reader objects so that the hot paths allocate nothing
on the C side.  Sizes come from the library (``ffi.sizeof``), not from
constants copied by hand.
"""

import os

from ._lib import load

ffi, lib = load()

_STATUS_NAMES = {
    lib.CORRAL_EINVAL: "invalid argument",
    lib.CORRAL_EBADHANDLE: "unknown or closed stack handle",
    lib.CORRAL_ENOSPC: "buffer too small",
    lib.CORRAL_EINTERNAL: "stack failure",
    lib.CORRAL_EUNKNOWN: "no such flow or query",
    lib.CORRAL_ENOTSUP: "not available in this mode",
}

MODES = {"direct": lib.CORRAL_MODE_DIRECT, "pump": lib.CORRAL_MODE_PUMP}
PROTOS = {lib.CORRAL_PROTO_TCP: "tcp", lib.CORRAL_PROTO_UDP: "udp", lib.CORRAL_PROTO_ICMP: "icmp"}
PROTO_NUMBERS = {name: number for number, name in PROTOS.items()}
KINDS = {
    lib.CORRAL_EV_NEW_FLOW: "new_flow",
    lib.CORRAL_EV_FLOW_CLOSED: "flow_closed",
    lib.CORRAL_EV_DNS_QUERY: "dns_query",
    lib.CORRAL_EV_FLOW_DATA: "flow_data",
}
ACTIONS = {"deny": lib.CORRAL_VERDICT_DENY, "allow": lib.CORRAL_VERDICT_ALLOW, "peek": lib.CORRAL_VERDICT_PEEK,
           "observe": lib.CORRAL_VERDICT_OBSERVE}
REASONS = {
    getattr(lib, name): name[len("CORRAL_REASON_"):].lower().replace("_", "-")
    for name in dir(lib)
    if name.startswith("CORRAL_REASON_")
}
FLAG_DECIDED = lib.CORRAL_FLAG_DECIDED
FLAG_INBOUND = lib.CORRAL_FLAG_INBOUND
FLAG_LAST = lib.CORRAL_FLAG_LAST
# Large enough for one frame at the maximum MTU plus its ethernet header.
MAX_FRAME = 65520 + 14


def _error():
    from corral.errors import NetstackError

    return NetstackError


def last_error(h):
    """The library's text for the last failure on handle ``h`` (0: stack_new)."""
    buf = ffi.new("char[]", 512)
    n = lib.corral_last_error(h, buf, len(buf))
    if n < 0:
        return ""
    return ffi.string(buf).decode("utf-8", "replace")


def check(rc, what, h=0):
    """Return ``rc`` if it is a success, else raise NetstackError naming ``what``."""
    if rc >= 0:
        return rc
    text = last_error(h) if rc in (lib.CORRAL_EINTERNAL, lib.CORRAL_EINVAL) else ""
    msg = "netstack: %s failed: %s" % (what, _STATUS_NAMES.get(rc, "status %d" % rc))
    if text:
        msg += " (%s)" % text
    err = _error()(msg)
    err.status = rc
    raise err


def stack_new(*, mode, tap_fd=-1, mtu=0, policy_timeout_ms=0, max_pending=0,
              udp_idle_timeout_ms=0, dial_timeout_ms=0, peek_timeout_ms=0, pcap_fd=None):
    """Create a stack; returns its handle.  Zero means "library default".
    ``pcap_fd``: capture every frame to this fd (the library dups it)."""
    if mode not in MODES:
        raise ValueError("mode must be 'direct' or 'pump', not %r" % (mode,))
    if mode == "direct" and (not isinstance(tap_fd, int) or tap_fd < 0):
        raise ValueError("direct mode needs the TAP fd, got %r" % (tap_fd,))
    for name, value in (("mtu", mtu), ("policy_timeout_ms", policy_timeout_ms),
                        ("max_pending", max_pending), ("udp_idle_timeout_ms", udp_idle_timeout_ms),
                        ("dial_timeout_ms", dial_timeout_ms), ("peek_timeout_ms", peek_timeout_ms)):
        if not isinstance(value, int) or not 0 <= value < 2**32:
            raise ValueError("%s must be an integer in [0, 2**32), got %r" % (name, value))
    cfg = ffi.new("corral_config *")
    cfg.mode = MODES[mode]
    cfg.tap_fd = tap_fd if mode == "direct" else -1
    cfg.mtu = mtu
    cfg.policy_timeout_ms = policy_timeout_ms
    cfg.max_pending = max_pending
    cfg.udp_idle_timeout_ms = udp_idle_timeout_ms
    cfg.dial_timeout_ms = dial_timeout_ms
    cfg.peek_timeout_ms = peek_timeout_ms
    if pcap_fd is not None:
        if not isinstance(pcap_fd, int) or pcap_fd < 0:
            raise ValueError("pcap_fd must be an open file descriptor, got %r" % (pcap_fd,))
        cfg.flags |= lib.CORRAL_CONFIG_PCAP
        cfg.pcap_fd = pcap_fd
    return check(lib.corral_stack_new(cfg), "creating the stack", 0)


def stack_shutdown(h):
    """End every flow (their flow_closed events stay readable); idempotent."""
    check(lib.corral_stack_shutdown(h), "shutting the stack down", h)


def stack_close(h):
    """Close the stack (idempotent); waits for its goroutines."""
    check(lib.corral_stack_close(h), "closing the stack", h)


def stack_eventfd(h):
    return check(lib.corral_stack_eventfd(h), "getting the eventfd", h)


def _ip(family, raw):
    return bytes(raw[0:4]) if family == 4 else bytes(raw[0:16])


class EventReader:
    """Drains events into reusable buffers.

    ``read(h)`` returns a list of tuples
    ``(id, kind, proto, flags, reason, family, src_ip, src_port, dst_ip,
    dst_port, bytes_out, bytes_in, duration_ns, payload)`` with ``kind``,
    ``proto`` and ``reason`` as ints (see KINDS, PROTOS, REASONS) and the IPs
    as packed bytes (4 or 16).
    """

    def __init__(self, cap=256, payload_cap=1 << 20):
        self.cap = cap
        self._evs = ffi.new("corral_event[]", cap)
        self._payload = ffi.new("uint8_t[]", payload_cap)
        self._payload_cap = payload_cap

    def read(self, h):
        out = []
        while True:
            n = check(lib.corral_stack_poll_events(h, self._evs, self.cap, self._payload, self._payload_cap),
                      "polling events", h)
            buf = ffi.buffer(self._payload)
            for i in range(n):
                e = self._evs[i]
                payload = bytes(buf[e.payload_off:e.payload_off + e.payload_len]) if e.payload_len else b""
                out.append((e.id, e.kind, e.proto, e.flags, e.reason, e.family,
                            _ip(e.family, e.src_ip), e.src_port, _ip(e.family, e.dst_ip), e.dst_port,
                            e.bytes_out, e.bytes_in, e.duration_ns, payload))
            if n < self.cap:
                return out


def set_verdicts(h, verdicts):
    """Apply ``[(flow_id, action, dial_ip_bytes_or_None, dial_port), ...]``,
    ``action`` one of ``"allow"``, ``"deny"``, ``"peek"``, ``"observe"`` (see ACTIONS).

    Returns how many matched a pending flow (late ones are ignored: their
    FLOW_CLOSED reports policy-timeout).
    """
    n = len(verdicts)
    if n == 0:
        return 0
    arr = ffi.new("corral_verdict[]", n)
    for i, (fid, action, dial_ip, dial_port) in enumerate(verdicts):
        if action not in ACTIONS:
            raise ValueError("verdict action must be one of %s, not %r" % (sorted(ACTIONS), action))
        v = arr[i]
        v.id = fid
        v.action = ACTIONS[action]
        if dial_port is not None:
            if not 0 <= dial_port <= 65535:
                raise ValueError("dial port out of range: %r" % (dial_port,))
            v.dial_port = dial_port
        if dial_ip is not None:
            if len(dial_ip) not in (4, 16):
                raise ValueError("dial address must be 4 or 16 packed bytes")
            v.dial_family = 4 if len(dial_ip) == 4 else 6
            ffi.memmove(v.dial_ip, dial_ip, len(dial_ip))
    return check(lib.corral_stack_set_verdicts(h, arr, n), "setting verdicts", h)


def dns_reply(h, qid, data):
    """Answer DNS query ``qid`` (empty ``data`` drops it).  False if it expired."""
    if len(data) > 0xFFFF:
        raise ValueError("a DNS message is at most 65535 bytes, got %d" % len(data))
    rc = lib.corral_stack_dns_reply(h, qid, ffi.from_buffer(data) if data else ffi.NULL, len(data))
    if rc == lib.CORRAL_EUNKNOWN:
        return False
    check(rc, "answering DNS query %d" % qid, h)
    return True


def inject(h, frames):
    """Pump mode: push ethernet frames (a list of bytes) into the stack."""
    n = len(frames)
    if n == 0:
        return 0
    lens = ffi.new("uint32_t[]", [len(f) for f in frames])
    data = b"".join(frames)
    return check(lib.corral_stack_inject(h, ffi.from_buffer(data), lens, n), "injecting frames", h)


def inject_packed(h, data, lens, n):
    """Pump mode: push ``n`` frames packed back to back in ``data`` (any
    buffer: bytearray, memoryview) with their sizes in ``lens`` (a
    ``uint32_t[]`` from :func:`new_lens`).  No copy on the Python side."""
    if n == 0:
        return 0
    if not 0 < n <= len(lens):
        raise ValueError("frame count %d does not fit the %d lengths" % (n, len(lens)))
    if sum(lens[0:n]) > len(data):
        raise ValueError("frame lengths exceed the buffer")
    return check(lib.corral_stack_inject(h, ffi.from_buffer(data), lens, n), "injecting frames", h)


def new_lens(n):
    """A reusable ``uint32_t[n]`` for :func:`inject_packed`."""
    return ffi.new("uint32_t[]", n)


class FrameReader:
    """Pump mode: drains outbound frames into a reusable buffer."""

    def __init__(self, max_frames=64, buf_size=max(4 << 20, MAX_FRAME)):
        self.max_frames = max_frames
        self._buf = ffi.new("uint8_t[]", buf_size)
        self._lens = ffi.new("uint32_t[]", max_frames)
        self._size = buf_size
        self._view = memoryview(ffi.buffer(self._buf))

    def read(self, h):
        """Return up to ``max_frames`` frames (bytes); fewer means the queue
        is empty."""
        return [bytes(v) for v in self.read_views(h)]

    def read_views(self, h):
        """Like :meth:`read` but returns memoryviews into the reader's buffer,
        valid until the next call: no copy per frame."""
        n = check(lib.corral_stack_read_frames(h, self._buf, self._size, self._lens, self.max_frames),
                  "reading frames", h)
        out = []
        off = 0
        view = self._view
        for i in range(n):
            ln = self._lens[i]
            out.append(view[off:off + ln])
            off += ln
        return out


def publish(h, proto, host_ip, host_port, sandbox_port):
    """Forward host_ip:host_port (0 = any free port) to the sandbox's port."""
    if proto not in PROTO_NUMBERS or proto == "icmp":
        raise ValueError("publish protocol must be 'tcp' or 'udp', not %r" % (proto,))
    if not 0 <= host_port <= 65535 or not 0 < sandbox_port <= 65535:
        raise ValueError("publish ports out of range: %r -> %r" % (host_port, sandbox_port))
    return check(lib.corral_stack_publish(h, PROTO_NUMBERS[proto], str(host_ip).encode(), host_port, sandbox_port),
                 "publishing %s %s:%d" % (proto, host_ip, host_port), h)


STATS_FIELDS = ("flows_total", "flows_open", "pending", "dns_queries", "frames_in", "frames_out",
                "drops", "events_queued", "goroutines", "pcap_frames", "pcap_errors",
                "log_lines", "refused")


def stats(h):
    """Counters as a dict (see corral_stats in netstack.h)."""
    out = ffi.new("corral_stats *")
    check(lib.corral_stack_stats(h, out), "reading stats", h)
    return {name: getattr(out, name) for name in STATS_FIELDS}


def socket_inodes(diag_fd, flows, timeout_ms):
    """The socket inode (0: none) of each flow ``(proto, family, src, src_port, dst,
    dst_port)`` — proto 6 or 17, family 4 or 6, addresses as 16 bytes — asked over
    the sandbox's sock_diag socket ``diag_fd``.  Raises OSError when the kernel
    refused or did not answer within ``timeout_ms``."""
    n = len(flows)
    addrs = ffi.new("corral_flow_addr[]", n)
    for a, (proto, family, src, src_port, dst, dst_port) in zip(addrs, flows):
        a.proto, a.family, a.src_port, a.dst_port = proto, family, src_port, dst_port
        ffi.memmove(a.src, src, 16)
        ffi.memmove(a.dst, dst, 16)
    inodes = ffi.new("uint32_t[]", n)
    err = ffi.new("int32_t *")
    rc = lib.corral_socket_inodes(diag_fd, addrs, n, inodes, timeout_ms, err)
    if rc == lib.CORRAL_EINTERNAL:
        raise OSError(err[0], os.strerror(err[0]))
    check(rc, "asking sock_diag")
    return list(inodes)


def socket_holders(inodes, pids, max_holders):
    """For each socket inode, the pids among ``pids`` (host pids) whose fds hold it
    (at most ``max_holders``, in the order of ``pids``)."""
    n = len(inodes)
    holders = ffi.new("int32_t[]", n * max_holders)
    counts = ffi.new("int32_t[]", n)
    check(lib.corral_socket_holders(ffi.new("uint32_t[]", inodes), n, ffi.new("int32_t[]", pids), len(pids),
                                    holders, max_holders, counts), "reading /proc fd links")
    return [list(holders[i * max_holders:i * max_holders + counts[i]]) for i in range(n)]
