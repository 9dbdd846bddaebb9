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

The two loops over system calls (the sock_diag requests, the fd links) run in
the Go library (netstack_go/owners.go, ``corral_socket_inodes`` /
``corral_socket_holders``): there they cost about half what they cost here.
"""

import logging
import os
import socket

from corral.bindings import netstack
from ..policy import Process
from ..policy._process import program_label

log = logging.getLogger("corral.net")

_PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

# Why a flow has no process (docs/events.md).
GONE = "the socket was closed before it could be looked up (its process had already ended)"
ORPHAN = "no process in the sandbox holds the socket any more (its process ended)"
ICMP = "ICMP echo sockets are not listed by sock_diag"
NO_DIAG = "process attribution is unavailable (the sandbox's sock_diag socket could not be opened)"
OFF = "process attribution is off (--no-attribution)"

DIAG_TIMEOUT_MS = 500  # for the kernel's sock_diag answers (they take microseconds)
HOLDERS_MAX = 16  # room for the holders of one socket in the first pass (then: all)
ARGV_MAX = 16  # argv elements kept
ARG_MAX_CHARS = 256  # characters kept of each
ANCESTRY_MAX = 32
DIRS_MAX = 256  # /proc/PID fds kept open between batches


_PACKED = {}  # address -> (4 or 6, 16 bytes): a sandbox talks to few addresses
_PACKED_MAX = 4096


def _packed(ip):
    """(4 or 6, 16 bytes) of an address given as text or an ipaddress object."""
    found = _PACKED.get(ip)
    if found is None:
        text = str(ip)
        if ":" in text:
            found = 6, socket.inet_pton(socket.AF_INET6, text)
        else:
            found = 4, socket.inet_pton(socket.AF_INET, text) + bytes(12)
        if len(_PACKED) >= _PACKED_MAX:
            _PACKED.clear()
        _PACKED[ip] = found
    return found


class Owners:
    """Flow -> :class:`Process`.  ``lookup`` is synchronous and cheap (one netlink
    round trip, then reading the fds of the sandbox's few processes)."""

    def __init__(self, diag_fd, root_pid, unavailable=NO_DIAG):
        self._sock = socket.socket(fileno=diag_fd) if diag_fd is not None else None
        self._unavailable = unavailable  # why no flow has a process without the socket
        self._root_pid = root_pid  # () -> pid 1 of the sandbox, in our pid namespace
        self._root = None
        self._tree = None
        self.exact = False  # walk the process tree on every lookup (see _holders)
        self._dirs = {}  # host pid -> fd of /proc/PID (see _dir)
        self._nspids = {}  # host pid -> its pid in the sandbox

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._forget()

    def lookup(self, proto, src_ip, src_port, dst_ip, dst_port):
        """(Process, None) or (None, reason)."""
        return self.lookup_many([(proto, src_ip, src_port, dst_ip, dst_port)])[0]

    def lookup_many(self, flows):
        """One (Process, None) or (None, reason) per (proto, src_ip, src_port,
        dst_ip, dst_port): one sock_diag request each, then one pass over the
        sandbox's fds for them all (a batch of new flows costs one scan)."""
        results = [None] * len(flows)
        if self._sock is None or self._root_pid() is None:
            return [(None, self._unavailable)] * len(flows)
        self._root = self._root_pid()
        inodes = {}
        asks = {}
        for i, (proto, src_ip, src_port, dst_ip, dst_port) in enumerate(flows):
            if proto not in _PROTO:
                results[i] = (None, ICMP)
                continue
            family, src = _packed(src_ip)
            asks[i] = (_PROTO[proto], family, src, src_port, _packed(dst_ip)[1], dst_port)
        try:
            found = dict(zip(asks, netstack.socket_inodes(self._sock.fileno(), list(asks.values()),
                                                          DIAG_TIMEOUT_MS)))
        except OSError as exc:
            log.warning("process attribution: sock_diag failed (%s)", exc)
            for i in asks:
                results[i] = (None, "sock_diag failed: %s" % (exc.strerror or exc))
            return results
        for i in asks:
            if not found[i]:
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

    def _dir(self, pid):
        """An fd of ``/proc/PID``, kept between batches: it stays bound to that one
        process (reads through it fail once the process is gone, even if its pid is
        reused), and reading through it skips the path walk."""
        fd = self._dirs.get(pid)
        if fd is None:
            if len(self._dirs) >= DIRS_MAX:  # a sandbox of many processes: start again
                self._forget()
            try:
                fd = os.open("/proc/%d" % pid, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return None
            self._dirs[pid] = fd
        return fd

    def _drop(self, pid):
        """``pid`` has ended (a read through its /proc fd failed)."""
        fd = self._dirs.pop(pid, None)
        self._nspids.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def _forget(self):
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        self._nspids.clear()

    def _scan(self, pids, inodes, found):
        """Add to ``found`` the holders of ``inodes`` among ``pids`` (their fd links)."""
        pids = [pid for pid in pids if pid != self._root]  # corral's pid 1 holds no flow of the command
        order = list(inodes)
        found_all = netstack.socket_holders(order, pids, HOLDERS_MAX)
        crowded = [i for i, holders in enumerate(found_all) if len(holders) == HOLDERS_MAX]
        if crowded:  # every holder counts (a scoped allow needs all in scope): ask again, room for all
            more = netstack.socket_holders([order[i] for i in crowded], pids, max(len(pids), 1))
            for i, holders in zip(crowded, more):
                found_all[i] = holders
        for inode, holders in zip(order, found_all):
            for pid in holders:
                if pid not in found.setdefault(inode, []):
                    found[inode].append(pid)

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

    def _read_static(self, pid):
        kept = pid in self._dirs
        proc = self._dir(pid)
        if proc is None:
            return None
        try:
            nspid = self._nspids.get(pid)
            if nspid is None:  # fixed for the life of the process the fd is bound to
                status = _read_at(proc, "status", 1 << 16)
                nspid = self._nspids[pid] = int(
                    [ln for ln in status.splitlines() if ln.startswith(b"NSpid:")][0].split()[-1])
            exe = _readlink("exe", proc)
            cwd = _readlink("cwd", proc)
            raw = _read_at(proc, "cmdline", ARGV_MAX * (ARG_MAX_CHARS + 1) * 4)
        except (OSError, IndexError, ValueError):
            self._drop(pid)
            # The kept fd was bound to a process that has ended since: the pid, found
            # again in this batch's walk, belongs to another process now; read that one.
            return self._read_static(pid) if kept else None
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


def _readlink(name, proc):
    link = os.readlink(name, dir_fd=proc)
    return link[: -len(" (deleted)")] if link.endswith(" (deleted)") else link


def _read_at(proc, name, limit):
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    try:
        data = os.read(fd, limit)
        while data and len(data) < limit:  # procfs may answer a page at a time
            more = os.read(fd, limit - len(data))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)
