"""Which process inside the sandbox owns a flow's socket (issue 13).

Two kernel facts, neither of which a process in the sandbox can forge:

1. ``sock_diag`` (NETLINK_SOCK_DIAG, ``inet_diag``) in the *sandbox's* network
   namespace maps the flow's addresses and ports to the socket's inode.  The
   supervisor cannot setns() into that namespace (it has no CAP_SYS_ADMIN in its
   own user namespace), so pid 1 of the sandbox opens the netlink socket before
   any user code runs and passes it over with the TAP fd; a netlink socket stays
   in the namespace it was created in.  Only answers from the kernel (sender
   port id 0) are read.
2. The socket's inode appears as ``socket:[INODE]`` among the fds of every
   process holding it; the supervisor reads the host's ``/proc/PID/fd`` of the
   sandbox's processes (found from pid 1 through ``/proc/PID/task/TID/children``:
   orphans are re-parented to pid 1, so none escapes the walk).

A socket held by several processes (inherited, passed with SCM_RIGHTS) names
them all: ``Process.others``.  The lookup runs when the stack sees the flow's
first packet: a TCP client is then blocked in connect(), a DNS client waits for
its answer, so the process is there; a UDP sender that closed its socket right
after sendto() may not be, and its flow says why (``process_unknown``).
"""

import errno
import logging
import os
import socket
import struct

from ..policy import Process
from ..policy._process import program_label

log = logging.getLogger("corral.net")

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NOCOOKIE = 0xFFFFFFFF
_REQ = struct.Struct("=IHHII BBBBI HH16s16sIII")  # nlmsghdr + inet_diag_req_v2 (ports big-endian below)
_HDR = struct.Struct("=IHHII")
_INODE_AT = _HDR.size + 4 + 48 + 16  # inet_diag_msg: ..., idiag_uid, idiag_inode
_PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

# Why a flow has no process (docs/events.md).
GONE = "the socket was closed before it could be looked up (its process had already ended)"
ORPHAN = "no process in the sandbox holds the socket any more (its process ended)"
ICMP = "ICMP echo sockets are not listed by sock_diag"
NO_DIAG = "process attribution is unavailable (the sandbox's sock_diag socket could not be opened)"

BATCH = 64  # sock_diag requests per datagram
DIAG_TIMEOUT = 0.5  # seconds for the kernel's sock_diag answer (it takes microseconds)
ARGV_MAX = 16  # argv elements kept
ARG_MAX_CHARS = 256  # characters kept of each
ANCESTRY_MAX = 32


def _packed(ip):
    """(family, 16 bytes) of an address given as text or an ipaddress object."""
    text = str(ip)
    if ":" in text:
        return socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text)
    return socket.AF_INET, socket.inet_pton(socket.AF_INET, text) + bytes(12)


class Owners:
    """Flow -> :class:`Process`.  ``lookup`` is synchronous and cheap (one netlink
    round trip, then reading the fds of the sandbox's few processes)."""

    def __init__(self, diag_fd, root_pid):
        self._sock = socket.socket(fileno=diag_fd) if diag_fd is not None else None
        if self._sock is not None:
            self._sock.settimeout(DIAG_TIMEOUT)  # never hang the supervisor on an answer
        self._root_pid = root_pid  # () -> pid 1 of the sandbox, in our pid namespace
        self._root = None
        self._tree = None
        self.exact = False  # walk the process tree on every lookup (see _holders)
        self._seq = 0

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def lookup(self, proto, src_ip, src_port, dst_ip, dst_port):
        """(Process, None) or (None, reason)."""
        return self.lookup_many([(proto, src_ip, src_port, dst_ip, dst_port)])[0]

    def lookup_many(self, flows):
        """One (Process, None) or (None, reason) per (proto, src_ip, src_port,
        dst_ip, dst_port): one sock_diag request each, then one pass over the
        sandbox's fds for them all (a batch of new flows costs one scan)."""
        results = [None] * len(flows)
        if self._sock is None or self._root_pid() is None:
            return [(None, NO_DIAG)] * len(flows)
        self._root = self._root_pid()
        inodes = {}
        asks = {}
        for i, (proto, src_ip, src_port, dst_ip, dst_port) in enumerate(flows):
            if proto not in _PROTO:
                results[i] = (None, ICMP)
                continue
            family, src = _packed(src_ip)
            asks[i] = (proto, family, src, src_port, _packed(dst_ip)[1], dst_port)
        try:
            found = self._inodes(asks)
            # a v4 flow from a dual-stack AF_INET6 socket: ask again as ::ffff:a.b.c.d
            mapped = bytes(10) + b"\xff\xff"
            again = {i: (a[0], socket.AF_INET6, mapped + a[2][:4], a[3], mapped + a[4][:4], a[5])
                     for i, a in asks.items() if found.get(i) is None and a[1] == socket.AF_INET}
            found.update(self._inodes(again))
        except OSError as exc:
            log.warning("process attribution: sock_diag failed (%s)", exc)
            for i in asks:
                results[i] = (None, "sock_diag failed: %s" % (exc.strerror or exc))
            return results
        for i in asks:
            if found.get(i) is None:
                results[i] = (None, GONE)
            else:
                inodes[i] = found[i]
        if inodes:
            holders = self._holders(set(inodes.values()))
            memo = {}
            for i, inode in inodes.items():
                procs = [self._process(pid, memo) for pid in holders.get(inode, ())]
                procs = [p for p in procs if p is not None]
                if not procs:
                    results[i] = (None, ORPHAN)
                    continue
                # The deepest holder first: a socket handed down is usually used below.
                procs.sort(key=lambda p: (-len(p.ancestry), -p.pid))
                first = procs[0]
                if len(procs) > 1:
                    first = first.with_others(tuple(procs[1:]))
                results[i] = (first, None)
        return results

    # -- sock_diag ---------------------------------------------------------------
    def _inodes(self, asks):
        """{key: socket inode or None} for {key: (proto, family, src, sport, dst, dport)}:
        the requests go out in one datagram (at most BATCH at a time, so the answers
        fit the socket's buffer), the kernel's answers are matched by sequence number."""
        out = {}
        items = list(asks.items())
        for at in range(0, len(items), BATCH):
            chunk = items[at:at + BATCH]
            wanted = {}
            buf = bytearray()
            for key, (proto, family, src, sport, dst, dport) in chunk:
                if proto == "udp":  # udp_dump_one swaps src and dst ("for historical reasons")
                    src, sport, dst, dport = dst, dport, src, sport
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                wanted[self._seq] = key
                msg = bytearray(_REQ.pack(_REQ.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, self._seq, 0,
                                          family, _PROTO[proto], 0, 0, 0xFFFFFFFF,
                                          0, 0, src, dst, 0, NOCOOKIE, NOCOOKIE))
                struct.pack_into("!HH", msg, _HDR.size + 8, sport, dport)  # big-endian ports
                buf += msg
            self._sock.send(buf)
            while wanted:
                data, addr = self._sock.recvfrom(65536)
                if addr[0] != 0:  # not from the kernel: ignore
                    continue
                self._answers(data, wanted, out)
        return out

    @staticmethod
    def _answers(data, wanted, out):
        offset = 0
        while offset + _HDR.size <= len(data):
            length, kind, _flags, seq, _pid = _HDR.unpack_from(data, offset)
            if length < _HDR.size:
                break
            key = wanted.pop(seq, None)  # an answer to an older, timed-out request: skipped
            if key is not None:
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + _HDR.size)[0]
                    if code not in (0, errno.ENOENT):
                        raise OSError(code, os.strerror(code))
                    out[key] = None
                elif kind == SOCK_DIAG_BY_FAMILY and length >= _INODE_AT + 4:
                    out[key] = struct.unpack_from("=I", data, offset + _INODE_AT)[0] or None
                else:
                    out[key] = None
            offset += (length + 3) & ~3

    # -- /proc -------------------------------------------------------------------
    def _build_tree(self):
        """{host pid: parent host pid} of every process in the sandbox."""
        tree = {self._root: None}
        todo = [self._root]
        while todo:
            pid = todo.pop()
            try:
                tids = os.listdir("/proc/%d/task" % pid)
            except OSError:
                continue
            for tid in tids:
                try:
                    with open("/proc/%d/task/%s/children" % (pid, tid), "rb") as f:
                        kids = f.read().split()
                except OSError:
                    continue
                for kid in kids:
                    kid = int(kid)
                    if kid not in tree:
                        tree[kid] = pid
                        todo.append(kid)
        self._tree = tree
        return tree

    def _scan(self, pids, inodes, found):
        targets = {"socket:[%d]" % inode: inode for inode in inodes}
        for pid in pids:
            if pid == self._root:
                continue  # corral's own pid 1 holds no flow of the command
            base = "/proc/%d/fd/" % pid
            try:
                fds = os.listdir(base)
            except OSError:
                continue
            left = len(targets)
            for fd in fds:
                try:
                    inode = targets.get(os.readlink(base + fd))
                except OSError:
                    continue
                if inode is not None and pid not in found.setdefault(inode, []):
                    found[inode].append(pid)
                    left -= 1
                    if not left:
                        break  # this process holds them all: the rest of its fds cannot add a holder

    def _holders(self, inodes):
        """{inode: [host pids holding it]}.  The process tree is cached between
        calls and walked again when a socket is not found in it or ``exact``
        is set (a scoped rule or a callback decides with the holders: a
        process forked since the last walk may hold the socket too)."""
        found = {}
        tree = self._tree
        if tree is None or self._root not in tree or self.exact:
            tree = self._build_tree()
            self._scan(tree, inodes, found)
            return found
        self._scan(tree, inodes, found)
        if inodes - found.keys():
            known = tree
            tree = self._build_tree()
            self._scan([pid for pid in tree if pid not in known], inodes, found)
        return found

    def _static(self, pid, memo):
        """(inner pid, exe, argv, cwd) of one process, read once per batch (``memo``).
        Never cached across batches: an exec() keeps the pid and start time but
        changes the program, so a cached identity would follow the pid to another."""
        if pid not in memo:
            memo[pid] = self._read_static(pid)
        return memo[pid]

    @staticmethod
    def _read_static(pid):
        try:
            with open("/proc/%d/status" % pid, "rb") as f:
                status = f.read()
            nspid = int([ln for ln in status.splitlines() if ln.startswith(b"NSpid:")][0].split()[-1])
            exe = _readlink("/proc/%d/exe" % pid)
            cwd = _readlink("/proc/%d/cwd" % pid)
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                raw = f.read(ARGV_MAX * (ARG_MAX_CHARS + 1) * 4)
        except (OSError, IndexError, ValueError):
            return None
        argv = tuple(a.decode("utf-8", "replace")[:ARG_MAX_CHARS] for a in raw.split(b"\0")[:-1][:ARGV_MAX])
        return nspid, exe, argv, cwd

    def _process(self, pid, memo):
        key = ("process", pid)
        if key not in memo:
            memo[key] = self._build_process(pid, memo)
        return memo[key]

    def _build_process(self, pid, memo):
        tree = self._tree
        me = self._static(pid, memo)
        if me is None:
            return None
        chain = []
        parent = tree.get(pid)
        while parent is not None and parent != self._root and len(chain) < ANCESTRY_MAX:
            info = self._static(parent, memo)
            if info is None:
                break
            chain.append(info)
            parent = tree.get(parent)
        chain.reverse()
        if tree.get(pid) == self._root:
            ppid = 1  # corral's pid 1 (the first command's parent): nothing to read
        else:
            ppid = chain[-1][0] if chain else 0  # 0: the parent went away while we read
        nspid, exe, argv, cwd = me
        return Process(
            pid=nspid, ppid=ppid, exe=exe, argv=argv, cwd=cwd,
            ancestry=tuple(program_label(e, a) for _p, e, a, _c in chain) + (program_label(exe, argv),),
            ancestry_exe=tuple(e for _p, e, _a, _c in chain) + (exe,),
            ancestry_pids=tuple(p for p, _e, _a, _c in chain) + (nspid,),
        )


def _readlink(path):
    link = os.readlink(path)
    return link[: -len(" (deleted)")] if link.endswith(" (deleted)") else link
