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
	"gvisor.dev/gvisor/pkg/tcpip/link/fdbased"
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
		// fdbased polls the fd; it must not block the dispatcher thread.
		if err := unix.SetNonblock(fd, true); err != nil {
			return nil, fmt.Errorf("TAP fd non-blocking: %w", err)
		}
		ep, err := fdbased.New(&fdbased.Options{
			FDs:            []int{fd},
			MTU:            st.cfg.MTU,
			EthernetHeader: true,
			Address:        stackMAC,
			// The sandbox kernel fills in every checksum before a frame
			// reaches a TAP without offloads, so verifying them again is
			// wasted work.  TX checksums stay on: without a vnet header the
			// sandbox kernel would drop frames whose checksum we skipped.
			RXChecksumOffload: true,
			// A TAP is not a socket: readv, one frame per call.  GSO is
			// left off: at MTU 65520 each frame already carries 64 KiB, so
			// vnet-header segmentation would save little, and it needs the
			// TAP opened with IFF_VNET_HDR by the sandbox side.
			PacketDispatchMode: fdbased.Readv,
			IsPacketSocket:     []bool{false},
			PreConfigured:      true,
		})
		if err != nil {
			return nil, fmt.Errorf("TAP endpoint: %w", err)
		}
		return ep, nil
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
	q      [][]byte
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

// WritePackets implements stack.LinkWriter: copy each frame into the queue.
func (p *pumpEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	frames := make([][]byte, 0, pkts.Len())
	for _, pkt := range pkts.AsSlice() {
		n := pkt.Size()
		b := make([]byte, 0, n)
		for _, s := range pkt.AsSlices() {
			b = append(b, s...)
		}
		frames = append(frames, b)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return 0, &tcpip.ErrClosedForSend{}
	}
	wasEmpty := len(p.q) == 0
	room := maxQueuedFrames - len(p.q)
	dropped := 0
	if len(frames) > room {
		dropped = len(frames) - room
		frames = frames[:room]
	}
	p.q = append(p.q, frames...)
	p.mu.Unlock()
	if dropped > 0 {
		p.st.drops.Add(uint64(dropped))
	}
	if wasEmpty && len(frames) > 0 {
		p.st.kick()
	}
	if len(frames) == 0 && dropped > 0 {
		return 0, &tcpip.ErrNoBufferSpace{}
	}
	return len(frames), nil
}

// Inject delivers one inbound ethernet frame (copied) to the stack.
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
		f := p.q[n]
		if off+len(f) > len(buf) {
			if n == 0 {
				return 0, errNoSpace
			}
			break
		}
		copy(buf[off:], f)
		lens[n] = uint32(len(f))
		off += len(f)
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
	p.q = nil
	p.mu.Unlock()
	p.Endpoint.Close()
}
