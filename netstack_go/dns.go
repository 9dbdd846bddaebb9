package main

import (
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// The stack only carries DNS messages: Python decides and answers.

// dnsReplyTTL bounds how long a query waits for dns_reply.  Resolvers retry
// after ~5 s, so a later answer is useless; expiring frees the slot.
func (st *Stack) dnsReplyTTL() time.Duration {
	return max(2*st.cfg.PolicyTimeout, 10*time.Second)
}

func isDNSAddr(a netip.Addr) bool { return a == dnsV4 || a == dnsV6 }

// maxDNSPending bounds the queries waiting for dns_reply.  Python refuses
// beyond its own, lower --max-dns-pending at once; this is the backstop for a
// supervisor that does not keep up: a query beyond it (or while the event
// queue is full) is dropped unanswered, counted in stats.drops, and the
// client's resolver retries later.
const maxDNSPending = 1024

// query queues a DNS_QUERY event; reply is called exactly once: with the
// answer, or empty when Python drops the query, it expires or it is beyond
// maxDNSPending.
func (st *Stack) query(transport int32, src, dst netip.AddrPort, msg []byte, reply func([]byte)) {
	id := st.nextID.Add(1)
	st.mu.Lock()
	if st.closed || len(st.dnsWait) >= maxDNSPending || st.events.full() {
		closed := st.closed
		st.mu.Unlock()
		if !closed {
			st.refuse()
		}
		reply(nil)
		return
	}
	st.dnsWait[id] = reply
	st.mu.Unlock()
	time.AfterFunc(st.dnsReplyTTL(), func() {
		st.mu.Lock()
		_, ok := st.dnsWait[id]
		delete(st.dnsWait, id)
		st.mu.Unlock()
		if ok {
			reply(nil)
		}
	})
	st.dnsQueries.Add(1)
	st.events.push(Event{ID: id, Kind: EvDNSQuery, Proto: transport, Src: src, Dst: dst, Payload: msg})
}

// DNSReply answers query id; false if it is unknown or expired.
func (st *Stack) DNSReply(id uint64, msg []byte) bool {
	st.mu.Lock()
	reply, ok := st.dnsWait[id]
	delete(st.dnsWait, id)
	st.mu.Unlock()
	if ok {
		reply(msg)
	}
	return ok
}

// startDNS binds UDP port 53 on the DNS addresses.
func (st *Stack) startDNS() error {
	for _, a := range []netip.Addr{dnsV4, dnsV6} {
		laddr := tcpip.FullAddress{NIC: nicID, Addr: tcpipAddr(a), Port: 53}
		c, err := gonet.DialUDP(st.s, &laddr, nil, protoOf(a))
		if err != nil {
			return err
		}
		st.onClose(func() { c.Close() })
		dst := netip.AddrPortFrom(a, 53)
		if !st.spawn(func() { st.serveDNSUDP(c, dst) }) {
			c.Close()
		}
	}
	return nil
}

func (st *Stack) serveDNSUDP(c *gonet.UDPConn, dst netip.AddrPort) {
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return // closed
		}
		ua, ok := from.(*net.UDPAddr)
		if !ok {
			continue
		}
		src := ua.AddrPort()
		msg := append([]byte(nil), buf[:n]...)
		st.query(ProtoUDP, src, dst, msg, func(ans []byte) {
			if len(ans) > 0 {
				_, _ = c.WriteTo(ans, ua)
			}
		})
	}
}

// maxDNSConns bounds the DNS-over-TCP connections served at once (a stub
// resolver opens one or two; each costs a goroutine and a TCP endpoint, and
// 12,000 idle ones took the supervisor to 250 MB).  More are reset (the
// client sees ECONNREFUSED), counted in stats.drops.
const maxDNSConns = 256

// serveDNSTCP serves one TCP connection to port 53: RFC 7766 framing, each
// message a query, answers written back (in any order) under a lock.
func (st *Stack) serveDNSTCP(r *tcp.ForwarderRequest, src, dst netip.AddrPort) {
	if st.dnsConns.Add(1) > maxDNSConns {
		st.dnsConns.Add(-1)
		st.refuse()
		r.Complete(true)
		return
	}
	defer st.dnsConns.Add(-1)
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		r.Complete(true)
		return
	}
	r.Complete(false)
	c := gonet.NewTCPConn(&wq, ep)
	stop := contextAfter(st, func() { c.Close() })
	defer stop()
	defer c.Close()
	var wmu sync.Mutex
	var outstanding sync.WaitGroup
	// After the client's FIN, answer what it asked before closing.
	defer outstanding.Wait()
	var lenBuf [2]byte
	for {
		// An idle resolver connection is closed after the reply TTL.
		_ = c.SetReadDeadline(time.Now().Add(st.dnsReplyTTL()))
		if _, err := io.ReadFull(c, lenBuf[:]); err != nil {
			return
		}
		msg := make([]byte, binary.BigEndian.Uint16(lenBuf[:]))
		if _, err := io.ReadFull(c, msg); err != nil {
			return
		}
		outstanding.Add(1)
		st.query(ProtoTCP, src, dst, msg, func(ans []byte) {
			defer outstanding.Done()
			if len(ans) == 0 || len(ans) > 0xffff {
				return
			}
			out := make([]byte, 2+len(ans))
			binary.BigEndian.PutUint16(out, uint16(len(ans)))
			copy(out[2:], ans)
			wmu.Lock()
			_, _ = c.Write(out)
			wmu.Unlock()
		})
	}
}
