package main

// Which process inside the sandbox holds a flow's socket (issue 13), the two
// loops of it that cost: asking the sandbox's kernel for each flow's socket
// inode (NETLINK_SOCK_DIAG, inet_diag) and reading the sandbox processes'
// /proc/PID/fd links to find who holds those inodes.  Python
// (supervisor/net/owner.py) decides which processes to read and what the answers
// mean; these loops run here because a Python readlink costs several times
// the system call (a batch of new flows paid ~1 ms before).

import (
	"encoding/binary"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	sockDiagByFamily = 20 // SOCK_DIAG_BY_FAMILY
	nlmsgHdrLen      = 16
	inetDiagReqLen   = 56 // struct inet_diag_req_v2
	inetDiagInodeAt  = nlmsgHdrLen + 4 + 48 + 16
	diagBatch        = 64 // requests per datagram: their answers fit the read buffer
	noCookie         = 0xFFFFFFFF
)

// flowAddr is one flow's addresses as the sandbox's kernel sees them.
type flowAddr struct {
	proto        uint8 // ProtoTCP or ProtoUDP
	v6           bool
	src, dst     [16]byte // IPv4 in the first 4 bytes
	sport, dport uint16
}

// diagBufs holds sock_diag read buffers between calls: a batch of new flows
// reads into one instead of allocating 64 KiB (garbage the Go heap would keep).
var diagBufs = sync.Pool{New: func() any { b := make([]byte, 1<<16); return &b }}

var diagSeq atomic.Uint32 // answers to an earlier, timed-out call never match a new one

// socketInodes asks the sandbox's kernel, over diagFD (a NETLINK_SOCK_DIAG
// socket opened in the sandbox's network namespace), for the socket inode of
// each flow: 0 when no socket has those addresses.  A v4 flow not found is
// asked again as the v4-mapped address of an AF_INET6 socket (a dual-stack
// socket).  Only the kernel's answers (sender port id 0) are read.
func socketInodes(diagFD int, flows []flowAddr, timeout time.Duration) ([]uint32, error) {
	inodes := make([]uint32, len(flows))
	deadline := time.Now().Add(timeout)
	all := make([]int, len(flows))
	for i := range flows {
		all[i] = i
	}
	if err := askInodes(diagFD, flows, all, false, inodes, deadline); err != nil {
		return nil, err
	}
	var again []int
	for i, f := range flows {
		if inodes[i] == 0 && !f.v6 {
			again = append(again, i)
		}
	}
	if err := askInodes(diagFD, flows, again, true, inodes, deadline); err != nil {
		return nil, err
	}
	return inodes, nil
}

func askInodes(fd int, flows []flowAddr, which []int, mapped bool, inodes []uint32, deadline time.Time) error {
	bufp := diagBufs.Get().(*[]byte)
	defer diagBufs.Put(bufp)
	buf := *bufp
	for at := 0; at < len(which); at += diagBatch {
		chunk := which[at:min(at+diagBatch, len(which))]
		wanted := make(map[uint32]int, len(chunk))
		req := make([]byte, 0, len(chunk)*(nlmsgHdrLen+inetDiagReqLen))
		for _, i := range chunk {
			seq := diagSeq.Add(1)
			wanted[seq] = i
			req = appendDiagRequest(req, &flows[i], mapped, seq)
		}
		if _, err := unix.Write(fd, req); err != nil {
			return err
		}
		for len(wanted) > 0 {
			left := time.Until(deadline)
			if left <= 0 {
				return unix.ETIMEDOUT
			}
			n, from, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
				if _, err := unix.Poll(pfd, int(left/time.Millisecond)+1); err != nil && !errors.Is(err, unix.EINTR) {
					return err
				}
				continue
			}
			if err != nil {
				return err
			}
			if nl, ok := from.(*unix.SockaddrNetlink); !ok || nl.Pid != 0 {
				continue // not from the kernel: ignore
			}
			if err := readDiagAnswers(buf[:n], wanted, inodes); err != nil {
				return err
			}
		}
	}
	return nil
}

func appendDiagRequest(b []byte, f *flowAddr, mapped bool, seq uint32) []byte {
	ne := binary.NativeEndian
	family, src, dst := uint8(unix.AF_INET), f.src, f.dst
	if f.v6 {
		family = unix.AF_INET6
	} else if mapped {
		family = unix.AF_INET6
		src, dst = v4Mapped(f.src), v4Mapped(f.dst)
	}
	sport, dport := f.sport, f.dport
	if f.proto == ProtoUDP { // udp_dump_one swaps source and destination ("for historical reasons")
		src, dst, sport, dport = dst, src, dport, sport
	}
	b = ne.AppendUint32(b, nlmsgHdrLen+inetDiagReqLen)
	b = ne.AppendUint16(b, sockDiagByFamily)
	b = ne.AppendUint16(b, unix.NLM_F_REQUEST)
	b = ne.AppendUint32(b, seq)
	b = ne.AppendUint32(b, 0)
	b = append(b, family, f.proto, 0, 0)
	b = ne.AppendUint32(b, 0xFFFFFFFF) // every state
	b = binary.BigEndian.AppendUint16(b, sport)
	b = binary.BigEndian.AppendUint16(b, dport)
	b = append(b, src[:]...)
	b = append(b, dst[:]...)
	b = ne.AppendUint32(b, 0) // any interface
	b = ne.AppendUint32(b, noCookie)
	return ne.AppendUint32(b, noCookie)
}

func v4Mapped(a [16]byte) [16]byte {
	var m [16]byte
	m[10], m[11] = 0xff, 0xff
	copy(m[12:], a[:4])
	return m
}

// readDiagAnswers files each answer of one datagram under its request; an
// answer to no pending request (an older call's) is skipped.
func readDiagAnswers(data []byte, wanted map[uint32]int, inodes []uint32) error {
	ne := binary.NativeEndian
	for off := 0; off+nlmsgHdrLen <= len(data); {
		length := int(ne.Uint32(data[off:]))
		if length < nlmsgHdrLen || off+length > len(data) {
			return nil
		}
		kind := ne.Uint16(data[off+4:])
		seq := ne.Uint32(data[off+8:])
		if i, ok := wanted[seq]; ok {
			delete(wanted, seq)
			switch {
			case kind == unix.NLMSG_ERROR && length >= nlmsgHdrLen+4:
				code := -int32(ne.Uint32(data[off+nlmsgHdrLen:]))
				if code != 0 && unix.Errno(code) != unix.ENOENT {
					return unix.Errno(code)
				}
			case kind == sockDiagByFamily && length >= inetDiagInodeAt+4:
				inodes[i] = ne.Uint32(data[off+inetDiagInodeAt:])
			}
		}
		off += (length + 3) &^ 3
	}
	return nil
}

// socketHolders reads the fd links of each pid (host pids of the sandbox's
// processes) and returns, for each inode, the pids holding it, in the order of
// pids, at most maxHolders.  A process whose /proc entry cannot be read (it
// ended) is skipped.  A process stops being read once it holds every inode
// asked: the rest of its fds cannot add a holder.  Nothing is allocated per fd
// (a process may hold thousands): the names are passed to readlinkat straight
// from the getdents buffer, which is reused from call to call.
func socketHolders(inodes []uint32, pids []int32, maxHolders int) [][]int32 {
	out := make([][]int32, len(inodes))
	targets := make(map[string][]int, len(inodes))
	for i, inode := range inodes {
		if inode != 0 {
			key := "socket:[" + strconv.FormatUint(uint64(inode), 10) + "]"
			targets[key] = append(targets[key], i)
		}
	}
	if len(targets) == 0 {
		return out
	}
	bufp := direntBufs.Get().(*[]byte)
	defer direntBufs.Put(bufp)
	names := *bufp
	var link [64]byte
	for _, pid := range pids {
		dir, err := unix.Open("/proc/"+strconv.Itoa(int(pid))+"/fd", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue
		}
		left := len(targets)
		seen := make(map[string]bool, len(targets)) // a socket held twice (dup) counts once
		for left > 0 {
			n, err := unix.Getdents(dir, names)
			if err != nil || n <= 0 {
				break
			}
			for off := 0; off < n && left > 0; {
				reclen := int(binary.NativeEndian.Uint16(names[off+16:]))
				name := names[off+19 : off+reclen] // NUL-terminated, padded
				off += reclen
				if name[0] == '.' {
					continue // "." and ".."
				}
				k := readlinkat(dir, &name[0], link[:])
				if k <= 0 || k >= len(link) {
					continue // gone since the listing, or not a socket (sockets fit)
				}
				flows, ok := targets[string(link[:k])] // no allocation for a lookup
				if !ok || seen[string(link[:k])] {
					continue
				}
				seen[string(link[:k])] = true
				for _, i := range flows {
					if len(out[i]) < maxHolders {
						out[i] = append(out[i], pid)
					}
				}
				left--
			}
		}
		unix.Close(dir)
	}
	return out
}

// direntBufs holds getdents buffers between calls.
var direntBufs = sync.Pool{New: func() any { b := make([]byte, 1<<14); return &b }}

// readlinkat with a NUL-terminated name already in memory (unix.Readlinkat copies
// its string argument for each call): the link's length, or -1.
func readlinkat(dir int, name *byte, buf []byte) int {
	n, _, errno := unix.Syscall6(unix.SYS_READLINKAT, uintptr(dir), uintptr(unsafe.Pointer(name)),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), 0, 0)
	if errno != 0 {
		return -1
	}
	return int(n)
}
