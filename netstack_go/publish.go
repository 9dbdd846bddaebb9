package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
)

// Publish listens on hostIP:hostPort in the supervisor's namespace and
// forwards into the sandbox's sandboxPort.  It returns the bound port.
// Published connections are flows too (FlagInbound|FlagDecided): they get a
// NEW_FLOW and a FLOW_CLOSED, but no verdict is asked.
func (st *Stack) Publish(proto int, hostIP string, hostPort, sandboxPort int) (int, error) {
	ip, err := netip.ParseAddr(hostIP)
	if err != nil {
		return 0, fmt.Errorf("publish: host address %q: %w", hostIP, err)
	}
	if hostPort < 0 || hostPort > 65535 || sandboxPort <= 0 || sandboxPort > 65535 {
		return 0, fmt.Errorf("publish: port out of range")
	}
	laddr := net.JoinHostPort(ip.String(), strconv.Itoa(hostPort))
	to := tcpip.FullAddress{NIC: nicID, Addr: tcpipAddr(sandboxV4), Port: uint16(sandboxPort)}
	switch proto {
	case ProtoTCP:
		ln, err := net.Listen("tcp", laddr)
		if err != nil {
			return 0, fmt.Errorf("publish: %w", err)
		}
		if !st.onClose(func() { ln.Close() }) {
			ln.Close()
			return 0, errShutdown
		}
		st.spawn(func() { st.acceptPublished(ln, to) })
		return ln.Addr().(*net.TCPAddr).Port, nil
	case ProtoUDP:
		pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(hostPort))))
		if err != nil {
			return 0, fmt.Errorf("publish: %w", err)
		}
		if !st.onClose(func() { pc.Close() }) {
			pc.Close()
			return 0, errShutdown
		}
		st.spawn(func() { st.servePublishedUDP(pc, to) })
		return pc.LocalAddr().(*net.UDPAddr).Port, nil
	}
	return 0, fmt.Errorf("publish: protocol %d is not TCP or UDP", proto)
}

func (st *Stack) acceptPublished(ln net.Listener, to tcpip.FullAddress) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		hc := c.(*net.TCPConn)
		if !st.spawn(func() { st.publishedTCP(hc, to) }) {
			hc.Close()
		}
	}
}

func (st *Stack) publishedTCP(hc *net.TCPConn, to tcpip.FullAddress) {
	src := hc.RemoteAddr().(*net.TCPAddr).AddrPort()
	f := st.newFlow(ProtoTCP, src, netip.AddrPortFrom(netipAddr(to.Addr), to.Port))
	f.flags |= FlagInbound
	f.openDecided(st, ReasonNone)
	sc, err := gonet.DialContextTCP(st.ctx, st.s, to, ipv4.ProtocolNumber)
	if err != nil {
		_ = hc.SetLinger(0) // the host client sees the refusal as a reset
		hc.Close()
		reason := int32(ReasonUnreachable)
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Err.Error() == (&tcpip.ErrConnectionRefused{}).String() {
			reason = ReasonRefused
		}
		f.finish(st, reason)
		return
	}
	// gonet hides the endpoint, so a reset from the host client reaches the
	// sandbox as a close; the other direction keeps full RST semantics.
	st.splice(f, func() { sc.Close() }, sc, hc, nil, nil)
}

// servePublishedUDP maps each host client address to its own connected
// endpoint into the sandbox, closed after the idle timeout.
func (st *Stack) servePublishedUDP(pc *net.UDPConn, to tcpip.FullAddress) {
	var mu sync.Mutex // guards peers
	type peer struct {
		sc *gonet.UDPConn
		f  *flow
	}
	peers := make(map[netip.AddrPort]peer)
	buf := make([]byte, 65536)
	for {
		n, from, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		mu.Lock()
		p, ok := peers[from]
		if !ok {
			sc, err := gonet.DialUDP(st.s, nil, &to, ipv4.ProtocolNumber)
			if err != nil {
				mu.Unlock()
				st.drops.Add(1)
				continue
			}
			f := st.newFlow(ProtoUDP, from, netip.AddrPortFrom(netipAddr(to.Addr), to.Port))
			f.flags |= FlagInbound
			f.openDecided(st, ReasonNone)
			p = peer{sc: sc, f: f}
			peers[from] = p
			client := from
			started := st.spawn(func() {
				reason := st.relayPublishedUDP(f, pc, sc, client)
				mu.Lock()
				delete(peers, client)
				mu.Unlock()
				f.finish(st, reason)
			})
			if !started {
				mu.Unlock()
				sc.Close()
				f.finish(st, ReasonShutdown)
				return
			}
		}
		mu.Unlock()
		if _, err := p.sc.Write(buf[:n]); err == nil {
			p.f.bytesIn.Add(uint64(n))
		}
	}
}

func (st *Stack) relayPublishedUDP(f *flow, pc *net.UDPConn, sc *gonet.UDPConn, client netip.AddrPort) int32 {
	stop := contextAfter(st, func() { sc.Close() })
	defer stop()
	defer sc.Close()
	buf := make([]byte, 65536)
	for {
		_ = sc.SetReadDeadline(time.Now().Add(st.cfg.UDPIdleTimeout))
		n, err := sc.Read(buf)
		if err != nil {
			if st.ctx.Err() != nil {
				return ReasonShutdown
			}
			if isTimeout(err) {
				return ReasonIdle
			}
			return ReasonEOF
		}
		if _, err := pc.WriteToUDPAddrPort(buf[:n], client); err == nil {
			f.bytesOut.Add(uint64(n))
		}
	}
}
