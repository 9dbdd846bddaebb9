package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/qdisc/fifo"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// Mode selects who moves frames between the TAP device and the stack
// (values in capi.go): ModeDirect, Go reads and writes the TAP fd (tap.go;
// IFF_VNET_HDR required); ModePump, the caller injects inbound frames and
// reads outbound ones.
type Mode int

// The sandbox side of the link (DESIGN §4).  The stack owns the gateway and
// the DNS address; everything else is reached through promiscuous mode.
var (
	gatewayV4 = netip.MustParseAddr("10.0.2.2")
	dnsV4     = netip.MustParseAddr("10.0.2.3")
	sandboxV4 = netip.MustParseAddr("10.0.2.100")
	gatewayV6 = netip.MustParseAddr("fd00::2")
	dnsV6     = netip.MustParseAddr("fd00::3")
	sandboxV6 = netip.MustParseAddr("fd00::100")
	// A locally administered unicast MAC for the stack's end of the link.
	stackMAC = tcpip.LinkAddress("\x02\x00\x0a\x00\x02\x02")
)

const nicID tcpip.NICID = 1

// Config is what corral_stack_new receives, with defaults applied.
type Config struct {
	Mode           Mode
	TapFD          int
	MTU            uint32
	PolicyTimeout  time.Duration
	MaxPending     int
	UDPIdleTimeout time.Duration
	DialTimeout    time.Duration
	PeekTimeout    time.Duration
	// Pcap: write every frame of the link to PcapFD (dup'd; the caller
	// keeps and closes its own fd).
	Pcap   bool
	PcapFD int
}

func (c *Config) setDefaults() {
	if c.MTU == 0 {
		// 65520 is the largest MTU a TAP accepts that keeps an ethernet frame
		// under 64 KiB; big frames amortise the per-frame cost (one read, one
		// dispatch, one ACK) that dominates a userspace stack.  iperf3 through
		// the direct path at MTU 1500 ran several times slower than at 65520.
		c.MTU = 65520
	}
	if c.PolicyTimeout == 0 {
		c.PolicyTimeout = 2 * time.Second
	}
	if c.MaxPending == 0 {
		c.MaxPending = 256
	}
	if c.UDPIdleTimeout == 0 {
		c.UDPIdleTimeout = 60 * time.Second
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = 10 * time.Second
	}
	if c.PeekTimeout == 0 {
		// Long enough for a client on the same host to send its ClientHello
		// or request right after connect() returns (well under 10 ms in
		// practice), short enough that a client which waits for the server
		// to speak first (on a port the supervisor does not know as
		// server-first) is not held up noticeably.
		c.PeekTimeout = 300 * time.Millisecond
	}
}

// Stack is one sandbox's userspace network.
type Stack struct {
	cfg     Config
	s       *stack.Stack
	link    *linkEndpoint
	pump    *pumpEndpoint    // nil in direct mode
	vnetTap *vnetTapEndpoint // direct mode on a TAP with IFF_VNET_HDR, else nil
	pcap    *pcapEndpoint    // Config.Pcap, else nil
	tapFD   int              // our dup of the TAP fd in direct mode, else -1
	efd     int
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	shutdownOnce sync.Once // Shutdown
	closeOnce    sync.Once // the rest of Close

	events eventQueue
	nextID atomic.Uint64

	mu        sync.Mutex // guards the following fields
	closed    bool
	verdicts  map[uint64]chan Verdict
	dnsWait   map[uint64]func([]byte)
	closers   []func()
	lastError string

	flowsTotal atomic.Uint64
	flowsOpen  atomic.Int64
	pending    atomic.Int64
	dnsQueries atomic.Uint64
	drops      atomic.Uint64
	refused    atomic.Uint64 // new work refused by a bound (also in drops): see refuse
	dnsConns   atomic.Int64  // DNS-over-TCP connections being served (dns.go)

	synMu   sync.Mutex // guards synHdrs
	synHdrs map[stack.TransportEndpointID][]byte

	profile    *os.File // CPU profile being written, see profileEnv
	goroutines *os.File // where shutdown dumps the goroutines, see goroutinesEnv

	udpFlows  flowTable // pending UDP flows by 4-tuple
	icmpFlows flowTable // ping flows by echoKey
}

// New builds the stack, its link and its forwarders.
func New(cfg Config) (_ *Stack, err error) {
	cfg.setDefaults()
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	st := &Stack{
		cfg:      cfg,
		tapFD:    -1,
		efd:      efd,
		ctx:      ctx,
		cancel:   cancel,
		verdicts: make(map[uint64]chan Verdict),
		dnsWait:  make(map[uint64]func([]byte)),
		synHdrs:  make(map[stack.TransportEndpointID][]byte),
	}
	st.events.notify = st.kick
	st.startProfile()
	st.icmpFlows.init()
	defer func() {
		if err != nil {
			st.Close()
		}
	}()

	st.s = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	if err := st.tune(); err != nil {
		return nil, err
	}
	inner, err := st.newLink()
	if err != nil {
		return nil, err
	}
	if cfg.Pcap {
		if st.pcap, err = newPcapEndpoint(inner, cfg.PcapFD, st.setError); err != nil {
			return nil, err
		}
		inner = st.pcap
	}
	st.link = newLinkEndpoint(inner, st)
	nicOpts := stack.NICOptions{Name: "corral0"}
	if cfg.Mode == ModeDirect {
		// One writer goroutine owns the TAP writes (each of which runs the
		// sandbox kernel's receive path inline) so that TCP processing
		// goes on meanwhile, as the pump's queue does.  Measured, iperf3
		// download, 4 interleaved rounds, medians [min-max]: 12.42
		// [11.80-13.19] vs 10.00 [9.42-10.50] Gbit/s writing inline;
		// upload, connection rate and 1-byte RR within noise (two
		// dispatchers: no better).  Like pump's maxQueuedFrames, a full
		// queue drops and TCP backs off.
		nicOpts.QDisc = fifo.New(st.link, 1, maxQueuedFrames)
	}
	if e := st.s.CreateNICWithOptions(nicID, st.link, nicOpts); e != nil {
		return nil, fmt.Errorf("create NIC: %s", e)
	}
	// Promiscuous: accept packets for any destination, so that every flow of
	// the sandbox terminates here.  Spoofing: answer from those destinations.
	if e := st.s.SetPromiscuousMode(nicID, true); e != nil {
		return nil, fmt.Errorf("promiscuous mode: %s", e)
	}
	if e := st.s.SetSpoofing(nicID, true); e != nil {
		return nil, fmt.Errorf("spoofing: %s", e)
	}
	for _, p := range []netip.Prefix{
		netip.PrefixFrom(gatewayV4, 24), netip.PrefixFrom(dnsV4, 24),
		netip.PrefixFrom(gatewayV6, 64), netip.PrefixFrom(dnsV6, 64),
	} {
		if err := st.addAddress(p); err != nil {
			return nil, err
		}
	}
	// A link-local address lets the stack answer NDP from fe80:: sources.
	ll := header.LinkLocalAddr(stackMAC)
	if e := st.s.AddProtocolAddress(nicID, tcpip.ProtocolAddress{
		Protocol: ipv6.ProtocolNumber, AddressWithPrefix: ll.WithPrefix(),
	}, stack.AddressProperties{}); e != nil {
		return nil, fmt.Errorf("add %s: %s", ll, e)
	}
	st.s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})

	st.installTCP()
	st.installUDP()
	st.installICMP()
	if err := st.startDNS(); err != nil {
		return nil, err
	}
	st.spawn(st.returnMemory)
	return st, nil
}

func (st *Stack) addAddress(p netip.Prefix) error {
	proto := ipv4.ProtocolNumber
	if p.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	pa := tcpip.ProtocolAddress{
		Protocol: proto,
		AddressWithPrefix: tcpip.AddressWithPrefix{
			Address: tcpip.AddrFromSlice(p.Addr().AsSlice()), PrefixLen: p.Bits(),
		},
	}
	if e := st.s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); e != nil {
		return fmt.Errorf("add %s: %s", p, e)
	}
	return nil
}

// tune sets the stack options; each one says why.
func (st *Stack) tune() error {
	set := func(name string, proto tcpip.TransportProtocolNumber, opt tcpip.SettableTransportProtocolOption) error {
		if e := st.s.SetTransportProtocolOption(proto, opt); e != nil {
			return fmt.Errorf("set %s: %s", name, e)
		}
		return nil
	}
	// SACK: loss on the TAP is rare, but when the sandbox's receive queue
	// overflows SACK avoids resending whole windows (go-back-N).
	sack := tcpip.TCPSACKEnabled(true)
	if err := set("SACK", tcp.ProtocolNumber, &sack); err != nil {
		return err
	}
	// Buffers: a 1 MiB default lets one 64 KiB-MTU flow keep ~16 segments in
	// flight; the 8 MiB ceiling is what receive-buffer auto-tuning (below)
	// grows into for bulk transfers.  Small minimum keeps idle flows cheap.
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	if err := set("receive buffer", tcp.ProtocolNumber, &rcv); err != nil {
		return err
	}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	if err := set("send buffer", tcp.ProtocolNumber, &snd); err != nil {
		return err
	}
	// Auto-tuning: grow windows with the measured bandwidth-delay product
	// instead of pinning every flow at the maximum (RSS with 1000 flows).
	mod := tcpip.TCPModerateReceiveBufferOption(true)
	if err := set("moderate receive buffer", tcp.ProtocolNumber, &mod); err != nil {
		return err
	}
	// No Nagle-style delay on the stack side: the sandbox's own kernel
	// already coalesces, delaying again only adds latency to request/response.
	delay := tcpip.TCPDelayEnabled(false)
	if err := set("delay", tcp.ProtocolNumber, &delay); err != nil {
		return err
	}
	return nil
}

// profileEnv names a file for a Go CPU profile of the stack's life (the
// performance work: `go tool pprof libcorralnet.so FILE`).  Unset: nothing.
const profileEnv = "CORRAL_NETSTACK_CPUPROFILE"

func (st *Stack) startProfile() {
	if path := os.Getenv(goroutinesEnv); path != "" {
		st.goroutines, _ = createDebugFile(path)
	}
	path := os.Getenv(profileEnv)
	if path == "" {
		return
	}
	f, err := createDebugFile(path)
	if err != nil {
		return
	}
	if pprof.StartCPUProfile(f) != nil {
		f.Close()
		return
	}
	st.profile = f
}

// createDebugFile creates a new file and renames it to path, before the sandbox
// runs: the file is often in the sandbox's writable cwd, so it is never opened
// by name (a symlink, hard link or FIFO planted there is replaced, not followed).
func createDebugFile(path string) (*os.File, error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".corral-*")
	if err != nil {
		return nil, err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		os.Remove(f.Name())
		f.Close()
		return nil, err
	}
	return f, nil
}

// goroutinesEnv names a file that receives every goroutine's stack when the
// stack shuts down (leak hunting: which goroutines outlived their flows).
const goroutinesEnv = "CORRAL_NETSTACK_GOROUTINES"

func (st *Stack) dumpGoroutines() {
	if st.goroutines == nil {
		return
	}
	_ = pprof.Lookup("goroutine").WriteTo(st.goroutines, 1)
	st.goroutines.Close()
	st.goroutines = nil
}

func (st *Stack) stopProfile() {
	if st.profile != nil {
		pprof.StopCPUProfile()
		st.profile.Close()
		st.profile = nil
	}
}

// kick signals the eventfd: events or frames are waiting.
func (st *Stack) kick() {
	var one = [8]byte{1}
	// EAGAIN means the counter is saturated: the reader is already due.
	_, _ = unix.Write(st.efd, one[:])
}

func (st *Stack) setError(err error) {
	st.mu.Lock()
	st.lastError = err.Error()
	st.mu.Unlock()
}

// LastError returns the text of the last error recorded on st.
func (st *Stack) LastError() string {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.lastError
}

// go starts fn as a goroutine of st, unless st is closing.
func (st *Stack) spawn(fn func()) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return false
	}
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		fn()
	}()
	return true
}

// contextAfter runs fn when st closes; the returned func cancels that.
func contextAfter(st *Stack, fn func()) func() bool {
	return context.AfterFunc(st.ctx, fn)
}

// onClose registers fn to run at Close (listeners, sockets).
func (st *Stack) onClose(fn func()) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return false
	}
	st.closers = append(st.closers, fn)
	return true
}

// Shutdown ends every flow, stops the link and waits for the flows'
// goroutines: each open flow has queued its FLOW_CLOSED (reason shutdown,
// with its byte counts) when it returns.  The events stay readable until
// Close.  Idempotent; Close calls it.
func (st *Stack) Shutdown() {
	st.shutdownOnce.Do(st.shutdown)
}

func (st *Stack) shutdown() {
	st.dumpGoroutines()
	st.mu.Lock()
	st.closed = true
	closers := st.closers
	st.closers = nil
	st.mu.Unlock()

	st.cancel()
	st.stopProfile()
	if st.vnetTap != nil {
		st.vnetTap.stop()
	}
	for _, fn := range closers {
		fn()
	}
	if st.pump != nil {
		st.pump.Close()
	}
	if st.s != nil {
		st.s.Close()
	}
	st.wg.Wait()
}

// Close shuts down (if not yet done), then frees the stack, its fds and
// its eventfd.  It is idempotent.
func (st *Stack) Close() {
	st.Shutdown()
	st.closeOnce.Do(func() {
		if st.s != nil {
			// Removes the NIC, which stops and waits for the TAP reader.
			st.s.Wait()
		}
		if st.tapFD >= 0 {
			unix.Close(st.tapFD)
			st.tapFD = -1
		}
		if st.pcap != nil {
			st.pcap.closeFile()
		}
		unix.Close(st.efd)
	})
}

// Verdict is Python's answer to a NEW_FLOW or a FLOW_DATA.
type Verdict struct {
	Allow bool
	// Peek (with Allow) defers the decision of a TCP flow to its first
	// bytes: see handleTCP.  UDP and ICMP flows take it as a plain allow.
	// As the answer to a FLOW_DATA it asks for more bytes (peekAndAsk).
	Peek bool
	// Observe (with Allow) lets a TCP flow through at once and reports its
	// first bytes (FLOW_DATA) without waiting: see splice.
	Observe  bool
	DialAddr netip.Addr // invalid: dial the original address
	DialPort uint16     // 0: dial the original port
}

// target is where an allowed flow to dst is dialed.
func (v Verdict) target(dst netip.AddrPort) netip.AddrPort {
	a, p := dst.Addr(), dst.Port()
	if v.DialAddr.IsValid() {
		a = v.DialAddr
	}
	if v.DialPort != 0 {
		p = v.DialPort
	}
	return netip.AddrPortFrom(a, p)
}

// errPolicy values say why a flow was not allowed.
var (
	errDenied        = errors.New("denied")
	errPolicyTimeout = errors.New("policy timeout")
	errOverload      = errors.New("too many pending decisions")
	errShutdown      = errors.New("stack closed")
)

// decide registers flow f, queues its NEW_FLOW event and waits for the
// verdict, bounded by the policy timeout.  On a non-nil error the flow is
// decided as denied; the caller reports the close.
func (st *Stack) decide(f *flow) (Verdict, error) {
	v, err := st.ask(f, func() { f.open(st) })
	if !f.opened.Load() {
		// Refused before NEW_FLOW was queued: tell Python it is decided.
		f.openDecided(st, reasonFor(err))
	}
	return v, err
}

// ask registers f as waiting for a verdict, runs queue (which queues the
// event Python answers: NEW_FLOW or FLOW_DATA) and waits for the verdict,
// bounded by the policy timeout.  A verdict that is not an allow is
// errDenied; with too many decisions in flight queue is not run.
func (st *Stack) ask(f *flow, queue func()) (Verdict, error) {
	if st.pending.Add(1) > int64(st.cfg.MaxPending) {
		st.pending.Add(-1)
		return Verdict{}, errOverload
	}
	defer st.pending.Add(-1)
	ch := make(chan Verdict, 1)
	st.mu.Lock()
	if st.closed {
		st.mu.Unlock()
		return Verdict{}, errShutdown
	}
	st.verdicts[f.id] = ch
	st.mu.Unlock()
	defer func() {
		st.mu.Lock()
		delete(st.verdicts, f.id)
		st.mu.Unlock()
	}()
	queue()

	t := time.NewTimer(st.cfg.PolicyTimeout)
	defer t.Stop()
	select {
	case v := <-ch:
		if !v.Allow {
			return v, errDenied
		}
		return v, nil
	case <-t.C:
		return Verdict{}, errPolicyTimeout
	case <-st.ctx.Done():
		return Verdict{}, errShutdown
	}
}

// SetVerdict delivers v for flow id; false if no decision is pending.
func (st *Stack) SetVerdict(id uint64, v Verdict) bool {
	st.mu.Lock()
	ch, ok := st.verdicts[id]
	if ok {
		delete(st.verdicts, id)
	}
	st.mu.Unlock()
	if ok {
		ch <- v // buffered, never blocks
	}
	return ok
}

func reasonFor(err error) int32 {
	switch {
	case errors.Is(err, errDenied):
		return ReasonDenied
	case errors.Is(err, errPolicyTimeout):
		return ReasonPolicyTimeout
	case errors.Is(err, errOverload):
		return ReasonOverload
	case errors.Is(err, errShutdown):
		return ReasonShutdown
	}
	return ReasonError
}

// Stats is the counter snapshot of corral_stack_stats.
type Stats struct {
	FlowsTotal, FlowsOpen, Pending, DNSQueries uint64
	FramesIn, FramesOut, Drops, EventsQueued   uint64
	Goroutines                                 uint64
	PcapFrames, PcapErrors                     uint64
	LogLines                                   uint64
	Refused                                    uint64
}

// refuse counts new work (a flow, a DNS query or connection) that a bound had no room
// for: the event queue, the UDP/ICMP flow tables, pending DNS, DNS-over-TCP connections.
// Python turns a rise of Stats.Refused into one limit event per episode.
func (st *Stack) refuse() {
	st.drops.Add(1)
	st.refused.Add(1)
}

// Stats returns the current counters.
func (st *Stack) Stats() Stats {
	s := st.s.Stats()
	drops := st.drops.Load() + s.NICs.TxPacketsDroppedNoBufferSpace.Value() +
		s.NICs.MalformedL4RcvdPackets.Value() + s.DroppedPackets.Value()
	out := Stats{
		FlowsTotal:   st.flowsTotal.Load(),
		FlowsOpen:    uint64(max(st.flowsOpen.Load(), 0)),
		Pending:      uint64(max(st.pending.Load(), 0)),
		DNSQueries:   st.dnsQueries.Load(),
		FramesIn:     st.link.framesIn.Load(),
		FramesOut:    st.link.framesOut.Load(),
		Drops:        drops,
		Refused:      st.refused.Load(),
		EventsQueued: uint64(st.events.Len()),
		Goroutines:   uint64(runtime.NumGoroutine()),
		LogLines:     gvisorLogLines.Load(),
	}
	if st.pcap != nil {
		frames, failed := st.pcap.counts()
		out.PcapFrames = frames
		if failed != nil {
			out.PcapErrors = 1
		}
	}
	return out
}

// tcpipAddr converts a netip address (unmapping v4-in-v6).
func tcpipAddr(a netip.Addr) tcpip.Address {
	return tcpip.AddrFromSlice(a.Unmap().AsSlice())
}

func netipAddr(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip.Unmap()
}

func protoOf(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}
