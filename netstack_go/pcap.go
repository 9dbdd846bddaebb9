package main

import (
	"encoding/binary"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// pcap file format (libpcap 2.4, microsecond timestamps), written by hand:
// gVisor's sniffer writes LINKTYPE_RAW (no ethernet header, so no ARP) and
// panics when a write fails.
const (
	pcapMagic        = 0xa1b2c3d4
	pcapLinkEthernet = 1
	// pcapSnapLen keeps whole frames: an MTU-65520 frame, or a GSO segment
	// the stack hands the TAP in one piece.
	pcapSnapLen = 256 << 10
)

// pcapEndpoint writes every frame that crosses the sandbox's link, both
// directions, with its ethernet header, to a pcap file.  It sits above the
// ethernet layer, where inbound frames still carry their (consumed) header
// and outbound ones already have theirs.  Writes are synchronous (one
// writev per frame under mu) so a reader following the file sees frames as
// they happen; a failed write stops the capture (counted in errors), never
// the network.
type pcapEndpoint struct {
	nested.Endpoint

	onError func(error) // records the failure as the stack's last error

	mu     sync.Mutex // guards fd, err, frames
	fd     int        // ours (a dup); -1 once closed or failed
	err    error
	frames uint64
}

var _ stack.LinkEndpoint = (*pcapEndpoint)(nil)
var _ stack.NetworkDispatcher = (*pcapEndpoint)(nil)

// newPcapEndpoint dups fd and writes the file header.
func newPcapEndpoint(lower stack.LinkEndpoint, fd int, onError func(error)) (*pcapEndpoint, error) {
	own, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup pcap fd %d: %w", fd, err)
	}
	var hdr [24]byte
	binary.LittleEndian.PutUint32(hdr[0:], pcapMagic)
	binary.LittleEndian.PutUint16(hdr[4:], 2)
	binary.LittleEndian.PutUint16(hdr[6:], 4)
	// thiszone and sigfigs stay 0: timestamps are UTC.
	binary.LittleEndian.PutUint32(hdr[16:], pcapSnapLen)
	binary.LittleEndian.PutUint32(hdr[20:], pcapLinkEthernet)
	if _, err := unix.Write(own, hdr[:]); err != nil {
		unix.Close(own)
		return nil, fmt.Errorf("write pcap header: %w", err)
	}
	p := &pcapEndpoint{fd: own, onError: onError}
	p.Endpoint.Init(lower, p)
	return p, nil
}

// DeliverNetworkPacket implements stack.NetworkDispatcher (sandbox -> stack).
func (p *pcapEndpoint) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	p.dump(pkt)
	p.Endpoint.DeliverNetworkPacket(proto, pkt)
}

// WritePackets implements stack.LinkWriter (stack -> sandbox).
func (p *pcapEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	for _, pkt := range pkts.AsSlice() {
		p.dump(pkt)
	}
	return p.Endpoint.WritePackets(pkts)
}

func (p *pcapEndpoint) dump(pkt *stack.PacketBuffer) {
	views := pkt.AsSlices()
	// A virtio-net header (vnet TAP) is not part of the frame.
	if skip := len(pkt.VirtioNetHeader().Slice()); skip > 0 {
		for skip > 0 && len(views) > 0 {
			n := min(skip, len(views[0]))
			views[0] = views[0][n:]
			skip -= n
			if len(views[0]) == 0 {
				views = views[1:]
			}
		}
	}
	size := 0
	for _, v := range views {
		size += len(v)
	}
	capLen := min(size, pcapSnapLen)
	now := time.Now()
	var rec [16]byte
	binary.LittleEndian.PutUint32(rec[0:], uint32(now.Unix()))
	binary.LittleEndian.PutUint32(rec[4:], uint32(now.Nanosecond()/1000))
	binary.LittleEndian.PutUint32(rec[8:], uint32(capLen))
	binary.LittleEndian.PutUint32(rec[12:], uint32(size))
	iov := make([][]byte, 0, len(views)+1)
	iov = append(iov, rec[:])
	left := capLen
	for _, v := range views {
		if left == 0 {
			break
		}
		v = v[:min(len(v), left)]
		iov = append(iov, v)
		left -= len(v)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fd < 0 {
		return
	}
	if err := writeAll(p.fd, iov, 16+capLen); err != nil {
		p.err = err
		unix.Close(p.fd)
		p.fd = -1
		p.onError(err)
		return
	}
	p.frames++
}

// writeAll writes iov (total bytes) completely; a regular file takes it in
// one writev unless the disk is full.
func writeAll(fd int, iov [][]byte, total int) error {
	for total > 0 {
		n, err := unix.Writev(fd, iov)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("write pcap: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("write pcap: %w", unix.EIO)
		}
		total -= n
		for n > 0 && len(iov) > 0 {
			k := min(n, len(iov[0]))
			iov[0] = iov[0][k:]
			n -= k
			if len(iov[0]) == 0 {
				iov = iov[1:]
			}
		}
	}
	return nil
}

// closeFile closes the capture (after the link stopped).
func (p *pcapEndpoint) closeFile() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fd >= 0 {
		unix.Close(p.fd)
		p.fd = -1
	}
}

// counts returns the frames written and whether a write failed.
func (p *pcapEndpoint) counts() (frames uint64, failed error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.frames, p.err
}
