package main

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
)

// icmpKind names the destination-unreachable errors we synthesise; each maps
// to the v4 and v6 code that makes the sandbox's kernel report the matching
// errno (EHOSTUNREACH, ECONNREFUSED, EACCES).
type icmpKind int

const (
	icmpHostUnreachable icmpKind = iota
	icmpPortUnreachable
	icmpProhibited
)

func (k icmpKind) codes() (v4, v6 uint8) {
	switch k {
	case icmpPortUnreachable:
		return uint8(header.ICMPv4PortUnreachable), uint8(header.ICMPv6PortUnreachable)
	case icmpProhibited:
		return uint8(header.ICMPv4HostProhibited), uint8(header.ICMPv6Prohibited)
	}
	return uint8(header.ICMPv4HostUnreachable), uint8(header.ICMPv6AddressUnreachable)
}

// sendUnreachable sends a destination-unreachable error about quote (the
// offending packet's IP header + 8 bytes) back to its sender, from the
// address it was sent to.
func (st *Stack) sendUnreachable(quote []byte, kind icmpKind) {
	if len(quote) < header.IPv4MinimumSize {
		return
	}
	c4, c6 := kind.codes()
	switch header.IPVersion(quote) {
	case header.IPv4Version:
		ip := header.IPv4(quote)
		msg := make([]byte, header.ICMPv4MinimumSize+len(quote))
		h := header.ICMPv4(msg)
		h.SetType(header.ICMPv4DstUnreachable)
		h.SetCode(header.ICMPv4Code(c4))
		copy(msg[header.ICMPv4MinimumSize:], quote)
		h.SetChecksum(^checksum.Checksum(msg, 0))
		st.sendIP(netipAddr(ip.DestinationAddress()), netipAddr(ip.SourceAddress()), header.ICMPv4ProtocolNumber, msg)
	case header.IPv6Version:
		if len(quote) < header.IPv6MinimumSize {
			return
		}
		ip := header.IPv6(quote)
		msg := make([]byte, header.ICMPv6MinimumSize+len(quote))
		h := header.ICMPv6(msg)
		h.SetType(header.ICMPv6DstUnreachable)
		h.SetCode(header.ICMPv6Code(c6))
		copy(msg[header.ICMPv6MinimumSize:], quote)
		st.sendIP(netipAddr(ip.DestinationAddress()), netipAddr(ip.SourceAddress()), header.ICMPv6ProtocolNumber, msg)
	}
}

// sendIP sends one transport payload from -> to through the NIC (the
// stack adds the IP header and resolves the link address).  ICMPv6
// checksums depend on the addresses and are filled in here.
func (st *Stack) sendIP(from, to netip.Addr, proto tcpip.TransportProtocolNumber, msg []byte) {
	netProto := protoOf(to)
	r, err := st.s.FindRoute(nicID, tcpipAddr(from), tcpipAddr(to), netProto, false)
	if err != nil {
		st.drops.Add(1)
		return
	}
	defer r.Release()
	if proto == header.ICMPv6ProtocolNumber {
		h := header.ICMPv6(msg)
		h.SetChecksum(0)
		h.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: h, Src: tcpipAddr(from), Dst: tcpipAddr(to),
		}))
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: int(r.MaxHeaderLength()),
		Payload:            buffer.MakeWithData(msg),
	})
	defer pkt.DecRef()
	if err := r.WritePacket(stack.NetworkHeaderParams{Protocol: proto, TTL: 64}, pkt); err != nil {
		st.drops.Add(1)
	}
}

// echoKey names one ping "flow": sandbox address, destination, echo id.
type echoKey struct {
	src, dst netip.Addr
	ident    uint16
}

func (st *Stack) installICMP() {
	st.s.SetTransportProtocolHandler(icmp.ProtocolNumber4, st.handleEcho)
	st.s.SetTransportProtocolHandler(icmp.ProtocolNumber6, st.handleEcho)
}

// handleEcho takes echo requests to foreign addresses (returning true stops
// gVisor from answering them itself); echo to the stack's own addresses and
// all other ICMP stay with gVisor.
func (st *Stack) handleEcho(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	th := pkt.TransportHeader().Slice()
	if len(th) < 8 {
		return false
	}
	v6 := pkt.NetworkProtocolNumber == ipv6.ProtocolNumber
	if (!v6 && header.ICMPv4(th).Type() != header.ICMPv4Echo) ||
		(v6 && header.ICMPv6(th).Type() != header.ICMPv6EchoRequest) {
		return false
	}
	dst := netipAddr(id.LocalAddress)
	if isOwnAddr(dst) {
		return false
	}
	key := echoKey{src: netipAddr(id.RemoteAddress), dst: dst, ident: binary.BigEndian.Uint16(th[4:6])}
	// Echo payload (after the 8-byte header) plus sequence number.
	echo := append([]byte(nil), th...)
	echo = append(echo, pkt.Data().AsRange().ToSlice()...)

	t := &st.icmpFlows
	t.mu.Lock()
	defer t.mu.Unlock()
	if p, ok := t.m[key]; ok {
		if p.sock >= 0 {
			st.sendEcho(p, echo)
		} else if len(p.backlog) < maxUDPBacklog {
			p.backlog = append(p.backlog, echo)
		}
		return true
	}
	if len(t.m) >= maxUDPFlows || st.events.full() { // as for UDP: see maxUDPFlows
		st.refuse()
		return true
	}
	if !st.enter() {
		return true
	}
	p := &udpPending{backlog: [][]byte{echo}, quote: quoteHeaders(pkt), sock: -1}
	t.m[key] = p
	go func() {
		defer st.wg.Done()
		st.runEcho(key, p)
	}()
	return true
}

func isOwnAddr(a netip.Addr) bool {
	return a == gatewayV4 || a == dnsV4 || a == gatewayV6 || a == dnsV6 || a.IsLinkLocalUnicast() || a.IsMulticast()
}

// sendEcho sends one echo request through the flow's ping socket (the
// kernel rewrites the id and checksum).  Called with the table lock held.
func (st *Stack) sendEcho(p *udpPending, echo []byte) {
	if _, err := unix.Write(p.sock, echo); err == nil {
		p.flow.bytesOut.Add(uint64(len(echo)))
	}
}

// openPing opens an unprivileged ICMP socket (net.ipv4.ping_group_range)
// connected to dst.
func openPing(dst netip.Addr) (int, error) {
	var fd int
	var err error
	if dst.Is4() {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		if err == nil {
			err = unix.Connect(fd, &unix.SockaddrInet4{Addr: dst.As4()})
		}
	} else {
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
		if err == nil {
			err = unix.Connect(fd, &unix.SockaddrInet6{Addr: dst.As16()})
		}
	}
	if err != nil {
		if fd > 0 {
			unix.Close(fd)
		}
		return -1, err
	}
	return fd, nil
}

func (st *Stack) runEcho(key echoKey, p *udpPending) {
	f := st.newFlow(ProtoICMP, netip.AddrPortFrom(key.src, key.ident), netip.AddrPortFrom(key.dst, 0))
	p.flow = f
	t := &st.icmpFlows
	forget := func() {
		t.mu.Lock()
		delete(t.m, key)
		t.mu.Unlock()
	}
	v, err := st.decide(f)
	if err != nil {
		forget()
		st.sendUnreachable(p.quote, icmpProhibited)
		f.finish(st, reasonFor(err))
		return
	}
	target := v.target(netip.AddrPortFrom(key.dst, 0)).Addr()
	sock, err := openPing(target)
	if err != nil {
		forget()
		st.setError(err)
		st.sendUnreachable(p.quote, icmpHostUnreachable)
		f.finish(st, ReasonUnreachable)
		return
	}
	t.mu.Lock()
	p.sock = sock
	for _, e := range p.backlog {
		st.sendEcho(p, e)
	}
	p.backlog = nil
	t.mu.Unlock()

	reason := st.relayEcho(key, p)
	t.mu.Lock()
	delete(t.m, key)
	unix.Close(p.sock)
	p.sock = -1
	t.mu.Unlock()
	f.finish(st, reason)
}

// relayEcho forwards replies from the ping socket to the sandbox, restoring
// the sandbox's echo id, until the flow is idle or the stack closes.
func (st *Stack) relayEcho(key echoKey, p *udpPending) int32 {
	buf := make([]byte, 65536)
	last := time.Now()
	for {
		if st.ctx.Err() != nil {
			return ReasonShutdown
		}
		fds := []unix.PollFd{{Fd: int32(p.sock), Events: unix.POLLIN}}
		// Poll in short slices so that Close is never held up for long.
		n, err := unix.Poll(fds, 200)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return ReasonError
		}
		if n <= 0 {
			if time.Since(last) >= st.cfg.UDPIdleTimeout {
				return ReasonIdle
			}
			continue
		}
		m, _, err := unix.Recvfrom(p.sock, buf, unix.MSG_DONTWAIT)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			return ReasonUnreachable
		}
		if m < 8 {
			continue
		}
		last = time.Now()
		reply := append([]byte(nil), buf[:m]...)
		binary.BigEndian.PutUint16(reply[4:6], key.ident)
		proto := header.ICMPv6ProtocolNumber
		if key.dst.Is4() {
			proto = header.ICMPv4ProtocolNumber
			reply[2], reply[3] = 0, 0
			binary.BigEndian.PutUint16(reply[2:4], ^checksum.Checksum(reply, 0))
		}
		p.flow.bytesIn.Add(uint64(m))
		st.sendIP(key.dst, key.src, proto, reply)
	}
}
