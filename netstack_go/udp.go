package main

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// maxUDPBacklog bounds the datagrams a flow buffers while its verdict is
// pending (a resolver's retries, a QUIC handshake burst); more are dropped.
const maxUDPBacklog = 64

// maxUDPFlows bounds the UDP flows open at once, pending or relaying: each
// holds a goroutine and, once allowed, a host socket and two more goroutines
// with 64 KiB buffers.  A datagram that would open one more (or that arrives
// while the event queue is full, see maxQueuedEvents) is dropped before it
// becomes a flow, counted in stats.drops: a flood of new 4-tuples slows down
// instead of growing the supervisor.  Established flows are not affected.
const maxUDPFlows = 4096

// udpPending is a UDP flow waiting for its verdict.
type udpPending struct {
	backlog [][]byte            // payloads before last, in order
	last    *stack.PacketBuffer // newest datagram: becomes the endpoint's first
	quote   []byte              // first datagram's headers, for ICMP errors
	sock    int                 // ICMP: ping socket once allowed, else -1
	flow    *flow               // ICMP: set by runEcho
}

// flowTable is a mutex-guarded map of pending UDP/ICMP flows.
type flowTable struct {
	mu   sync.Mutex // guards m
	m    map[any]*udpPending
	open atomic.Int64 // UDP: flows between their first datagram and their end
}

func (t *flowTable) init() { t.m = make(map[any]*udpPending) }

func (st *Stack) installUDP() {
	st.udpFlows.init()
	st.s.SetTransportProtocolHandler(udp.ProtocolNumber, st.handleUDP)
}

// handleUDP runs on the dispatcher for datagrams no endpoint claimed: the
// first of a new 4-tuple, or more while its verdict is pending.
func (st *Stack) handleUDP(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	t := &st.udpFlows
	t.mu.Lock()
	defer t.mu.Unlock()
	if p, ok := t.m[id]; ok {
		if len(p.backlog) >= maxUDPBacklog {
			st.drops.Add(1)
			return true
		}
		p.backlog = append(p.backlog, p.last.Data().AsRange().ToSlice())
		p.last.DecRef()
		p.last = pkt.Clone()
		return true
	}
	if t.open.Load() >= maxUDPFlows || st.events.full() {
		st.refuse()
		return true
	}
	p := &udpPending{last: pkt.Clone(), quote: quoteHeaders(pkt), sock: -1}
	if !st.enter() {
		p.last.DecRef()
		return true
	}
	t.m[id] = p
	t.open.Add(1)
	go func() {
		defer st.wg.Done()
		defer t.open.Add(-1)
		st.runUDP(id, p)
	}()
	return true
}

// quoteHeaders returns the IP header and 8 transport bytes of pkt, which an
// ICMP error quotes so that the sandbox kernel finds the socket.
func quoteHeaders(pkt *stack.PacketBuffer) []byte {
	nh := pkt.NetworkHeader().Slice()
	th := pkt.TransportHeader().Slice()
	if len(th) > 8 {
		th = th[:8]
	}
	q := make([]byte, 0, len(nh)+len(th))
	return append(append(q, nh...), th...)
}

// drop forgets a pending flow, releasing its buffered datagrams.
func (t *flowTable) drop(id any) *udpPending {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.m[id]
	delete(t.m, id)
	if p != nil && p.last != nil {
		p.last.DecRef()
		p.last = nil
	}
	return p
}

func (st *Stack) runUDP(id stack.TransportEndpointID, p *udpPending) {
	src, dst := endpointAddrs(id)
	f := st.newFlow(ProtoUDP, src, dst)
	v, err := st.decide(f)
	if err != nil {
		st.udpFlows.drop(id)
		st.sendUnreachable(p.quote, icmpPortUnreachable)
		f.finish(st, reasonFor(err))
		return
	}
	target := v.target(dst)
	hc, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(target))
	if err != nil {
		st.udpFlows.drop(id)
		st.sendUnreachable(p.quote, icmpHostUnreachable)
		f.finish(st, ReasonUnreachable)
		return
	}
	// Register the endpoint under the table lock, so that no datagram falls
	// between the backlog and the endpoint.
	var wq waiter.Queue
	t := &st.udpFlows
	t.mu.Lock()
	delete(t.m, id)
	backlog := p.backlog
	ep, terr := udp.NewForwarderRequest(st.s, id, p.last).CreateEndpoint(&wq)
	p.last.DecRef()
	p.last = nil
	t.mu.Unlock()
	if terr != nil {
		hc.Close()
		st.setError(errors.New(terr.String()))
		f.finish(st, ReasonError)
		return
	}
	for _, b := range backlog {
		if _, err := hc.Write(b); err == nil {
			f.bytesOut.Add(uint64(len(b)))
		}
	}
	sb := gonet.NewUDPConn(&wq, ep)
	f.finish(st, st.relayUDP(f, sb, hc, p.quote))
}

// relayUDP copies datagrams both ways until idle, refused or shutdown.
func (st *Stack) relayUDP(f *flow, sb *gonet.UDPConn, hc *net.UDPConn, quote []byte) int32 {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var once sync.Once
	var reason atomic.Int32
	stopAll := func(r int32) {
		once.Do(func() {
			reason.Store(r)
			sb.Close()
			hc.Close()
		})
	}
	stop := contextAfter(st, func() { stopAll(ReasonShutdown) })
	defer stop()
	idle := st.cfg.UDPIdleTimeout

	pump := func(dst interface{ Write([]byte) (int, error) }, src interface {
		Read([]byte) (int, error)
		SetReadDeadline(time.Time) error
	}, count *atomic.Uint64, fromWorld bool) {
		buf := make([]byte, 65536)
		for {
			_ = src.SetReadDeadline(time.Now().Add(idle))
			n, err := src.Read(buf)
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) || isTimeout(err) {
					if time.Since(time.Unix(0, last.Load())) >= idle {
						stopAll(ReasonIdle)
						return
					}
					continue
				}
				if fromWorld && errors.Is(err, syscall.ECONNREFUSED) {
					st.sendUnreachable(quote, icmpPortUnreachable)
					stopAll(ReasonRefused)
					return
				}
				stopAll(ReasonEOF)
				return
			}
			last.Store(time.Now().UnixNano())
			if _, err := dst.Write(buf[:n]); err == nil {
				count.Add(uint64(n))
			}
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		pump(sb, hc, &f.bytesIn, true)
	}()
	pump(hc, sb, &f.bytesOut, false)
	<-done
	return reason.Load()
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
