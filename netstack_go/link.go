package main

import (
	"fmt"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// maxQueuedFrames bounds the pump's outbound queue, like a NIC's tx ring:
// when Python falls behind, frames are dropped (and counted) and TCP backs
// off, instead of memory growing without bound.
const maxQueuedFrames = 4096

// newLink returns the L2 endpoint for cfg.Mode.
func (st *Stack) newLink() (stack.LinkEndpoint, error) {
	switch st.cfg.Mode {
	case ModeDirect:
		fd, err := unix.FcntlInt(uintptr(st.cfg.TapFD), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("dup TAP fd %d: %w", st.cfg.TapFD, err)
		}
		st.tapFD = fd
		// The reader parks in Go's netpoller (tap.go): non-blocking fd.
		if err := unix.SetNonblock(fd, true); err != nil {
			return nil, fmt.Errorf("TAP fd non-blocking: %w", err)
		}
		vnet, err := tapHasVnetHdr(fd)
		if err != nil {
			return nil, err
		}
		if !vnet {
			// gVisor's fdbased reader stops for good at the first frame
			// addressed to another MAC (its readv dispatcher returns
			// "stop"), which a sandboxed program with CAP_NET_RAW could
			// send; our own reader (tap.go) drops such frames and goes on.
			return nil, fmt.Errorf("TAP fd %d has no virtio-net header: the direct path needs a "+
				"TAP opened with IFF_VNET_HDR (corral creates it so)", st.cfg.TapFD)
		}
		// Checksum offload both ways (tap.go).  Measured in the world,
		// iperf3 through the direct path, 5 interleaved rounds, medians
		// [min-max] Gbit/s: up 7.44 [6.20-8.28] vs 6.41 [6.35-9.12] with
		// fdbased on a plain TAP, down 7.01 [6.55-7.33] vs 6.21
		// [5.15-6.54]; the Go profile of a download loses its 5% in
		// checksum.calculateChecksum, and the sandbox kernel its
		// csum_partial on send and verification on receive.
		ep, err := newVnetTapEndpoint(fd, st.cfg.MTU)
		if err != nil {
			return nil, err
		}
		st.vnetTap = ep
		return ethernet.New(ep), nil
	case ModePump:
		st.pump = newPumpEndpoint(st.cfg.MTU, st)
		return ethernet.New(st.pump), nil
	}
	return nil, fmt.Errorf("unknown link mode %d", st.cfg.Mode)
}

// linkEndpoint sits between the stack and the real link and counts frames.
type linkEndpoint struct {
	nested.Endpoint
	framesIn  atomic.Uint64
	framesOut atomic.Uint64
}

var _ stack.LinkEndpoint = (*linkEndpoint)(nil)
var _ stack.NetworkDispatcher = (*linkEndpoint)(nil)

func newLinkEndpoint(inner stack.LinkEndpoint, _ *Stack) *linkEndpoint {
	l := &linkEndpoint{}
	l.Endpoint.Init(inner, l)
	return l
}

// DeliverNetworkPacket implements stack.NetworkDispatcher.
func (l *linkEndpoint) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	l.framesIn.Add(1)
	l.Endpoint.DeliverNetworkPacket(proto, pkt)
}

// WritePackets implements stack.LinkWriter.
func (l *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n, err := l.Endpoint.WritePackets(pkts)
	l.framesOut.Add(uint64(n))
	return n, err
}

// pumpEndpoint is the link of pump mode: frames in come from Inject, frames
// out wait in a queue for ReadFrames.  It carries whole ethernet frames
// (ethernet.Endpoint above it adds and strips the header).
type pumpEndpoint struct {
	*channel.Endpoint
	st *Stack

	mu     sync.Mutex // guards q, closed
	q      []*stack.PacketBuffer
	closed bool
}

var _ stack.LinkEndpoint = (*pumpEndpoint)(nil)

func newPumpEndpoint(mtu uint32, st *Stack) *pumpEndpoint {
	// The channel endpoint provides attach/MTU/address bookkeeping; its own
	// queue is unused because WritePackets is overridden.  Its MTU counts
	// the ethernet header, which ethernet.Endpoint subtracts again.
	ch := channel.New(1, mtu+14, "")
	return &pumpEndpoint{Endpoint: ch, st: st}
}

// WritePackets implements stack.LinkWriter: queue a reference to each frame;
// ReadFrames copies it out once, straight into the caller's buffer (an
// intermediate copy per frame cost a 64 KiB allocation and GC work).
func (p *pumpEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	all := pkts.AsSlice()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return 0, &tcpip.ErrClosedForSend{}
	}
	wasEmpty := len(p.q) == 0
	n := min(len(all), maxQueuedFrames-len(p.q))
	for _, pkt := range all[:n] {
		p.q = append(p.q, pkt.IncRef())
	}
	p.mu.Unlock()
	if dropped := len(all) - n; dropped > 0 {
		p.st.drops.Add(uint64(dropped))
	}
	if wasEmpty && n > 0 {
		p.st.kick()
	}
	if n == 0 && len(all) > 0 {
		return 0, &tcpip.ErrNoBufferSpace{}
	}
	return n, nil
}

// Inject delivers one inbound ethernet frame to the stack.  The frame is
// copied (once, into a pooled chunk): the caller may reuse it at return.
func (p *pumpEndpoint) Inject(frame []byte) {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		Payload: buffer.MakeWithData(frame),
	})
	p.Endpoint.InjectInbound(0, pkt)
	pkt.DecRef()
}

// ReadFrames moves queued frames into buf (packed) and lens, up to max.
func (p *pumpEndpoint) ReadFrames(buf []byte, lens []uint32) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	off, n := 0, 0
	for n < len(lens) && n < len(p.q) {
		pkt := p.q[n]
		size := pkt.Size()
		if off+size > len(buf) {
			if n == 0 {
				return 0, errNoSpace
			}
			break
		}
		at := off
		for _, s := range pkt.AsSlices() {
			at += copy(buf[at:], s)
		}
		pkt.DecRef()
		lens[n] = uint32(size)
		off += size
		n++
	}
	clear(p.q[:n])
	p.q = p.q[n:]
	if len(p.q) == 0 {
		p.q = nil
	}
	return n, nil
}

// Close implements stack.LinkEndpoint.
func (p *pumpEndpoint) Close() {
	p.mu.Lock()
	p.closed = true
	for _, pkt := range p.q {
		pkt.DecRef()
	}
	p.q = nil
	p.mu.Unlock()
	p.Endpoint.Close()
}
