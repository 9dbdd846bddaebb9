package main

// Fuzz targets for the input the stack takes from the untrusted sandbox.
//
//	go test -run '^Fuzz' .                                    # seed corpus only (CI)
//	go test -run '^$' -fuzz '^FuzzInjectFrame$' -fuzztime 5m . # on demand
//	go test -run '^$' -fuzz '^FuzzDNSOverTCP$' -fuzztime 5m .
//
// Seeds live in testdata/fuzz/<Target>/ (go's corpus format); new crashers found
// by -fuzz are written there too and then replay in every `go test`.
//
// Network safety: the stacks here never receive a verdict, so every flow ends
// as a policy timeout and nothing is ever dialled; DNS queries are answered by
// echoing them back, never forwarded.

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net/netip"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

var clientMAC = tcpip.LinkAddress("\x02\x00\x0a\x00\x02\x64")

// fuzzStack is one pump-mode stack shared by every input of a fuzz run (a new
// stack per input would measure start-up, not parsing).  Its events are drained
// and DNS queries echoed back by a background goroutine.
type fuzzStack struct {
	st     *Stack
	client *stack.Stack // a second gVisor stack playing the sandbox (DNS target)
	ch     *channel.Endpoint
}

var (
	fuzzOnce sync.Once
	fuzzSt   *fuzzStack
	fuzzErr  error
)

func sharedFuzzStack(t testing.TB) *fuzzStack {
	fuzzOnce.Do(func() { fuzzSt, fuzzErr = newFuzzStack() })
	if fuzzErr != nil {
		t.Fatal(fuzzErr)
	}
	return fuzzSt
}

func newFuzzStack() (*fuzzStack, error) {
	st, err := New(Config{Mode: ModePump, PolicyTimeout: 20 * time.Millisecond, MTU: 1500})
	if err != nil {
		return nil, err
	}
	ch := channel.New(256, 1500+header.EthernetMinimumSize, clientMAC)
	client := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	if e := client.CreateNIC(1, ethernet.New(ch)); e != nil {
		return nil, tcpipErr(e)
	}
	if e := client.AddProtocolAddress(1, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpipAddr(sandboxV4).WithPrefix(),
	}, stack.AddressProperties{}); e != nil {
		return nil, tcpipErr(e)
	}
	client.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: 1}})
	fs := &fuzzStack{st: st, client: client, ch: ch}
	go fs.sandboxToStack()
	go fs.stackToSandbox()
	go fs.answer()
	return fs, nil
}

type tcpipError struct{ e tcpip.Error }

func (e tcpipError) Error() string { return e.e.String() }

func tcpipErr(e tcpip.Error) error { return tcpipError{e} }

// sandboxToStack moves the client stack's frames into the corral stack.
func (fs *fuzzStack) sandboxToStack() {
	for {
		pkt := fs.ch.ReadContext(context.Background())
		if pkt == nil {
			return
		}
		fs.st.pump.Inject(pkt.ToView().AsSlice())
		pkt.DecRef()
	}
}

// stackToSandbox moves the corral stack's frames to the client stack.
func (fs *fuzzStack) stackToSandbox() {
	buf := make([]byte, 1<<20)
	lens := make([]uint32, 64)
	for {
		n, err := fs.st.pump.ReadFrames(buf, lens)
		if err != nil {
			return
		}
		if n == 0 {
			time.Sleep(200 * time.Microsecond)
			continue
		}
		off := 0
		for _, l := range lens[:n] {
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
				Payload: buffer.MakeWithData(append([]byte(nil), buf[off:off+int(l)]...)),
			})
			fs.ch.InjectInbound(0, pkt)
			pkt.DecRef()
			off += int(l)
		}
	}
}

// answer drains events; a DNS query is answered with its own bytes.
func (fs *fuzzStack) answer() {
	for {
		evs := fs.st.events.take(256, func(*Event) bool { return true })
		if len(evs) == 0 {
			time.Sleep(200 * time.Microsecond)
			continue
		}
		for _, ev := range evs {
			if ev.Kind == EvDNSQuery {
				fs.st.DNSReply(ev.ID, ev.Payload)
			}
		}
	}
}

// checkHealthy fails if the stack stopped serving: flows and pending verdicts
// must drain back to zero once the policy timeouts have passed.
func checkHealthy(t *testing.T, st *Stack) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s := st.Stats()
		if s.Pending == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("verdicts still pending long after the policy timeout: %+v", s)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func ethFrame(etherType uint16, payload []byte) []byte {
	f := make([]byte, header.EthernetMinimumSize, header.EthernetMinimumSize+len(payload))
	copy(f[0:6], stackMAC)
	copy(f[6:12], clientMAC)
	binary.BigEndian.PutUint16(f[12:14], etherType)
	return append(f, payload...)
}

func ipv4Packet(proto uint8, src, dst netip.Addr, l4 []byte) []byte {
	p := make([]byte, header.IPv4MinimumSize+len(l4))
	ip := header.IPv4(p)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(len(p)), TTL: 64, Protocol: proto,
		SrcAddr: tcpipAddr(src), DstAddr: tcpipAddr(dst),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	copy(p[header.IPv4MinimumSize:], l4)
	return p
}

func tcpSyn(srcPort, dstPort uint16) []byte {
	b := make([]byte, header.TCPMinimumSize)
	header.TCP(b).Encode(&header.TCPFields{
		SrcPort: srcPort, DstPort: dstPort, SeqNum: 1, DataOffset: header.TCPMinimumSize,
		Flags: header.TCPFlagSyn, WindowSize: 65535,
	})
	return b
}

func udpDatagram(srcPort, dstPort uint16, payload []byte) []byte {
	b := make([]byte, header.UDPMinimumSize+len(payload))
	header.UDP(b).Encode(&header.UDPFields{SrcPort: srcPort, DstPort: dstPort, Length: uint16(len(b))})
	copy(b[header.UDPMinimumSize:], payload)
	return b
}

// FuzzInjectFrame: any frame the sandbox writes into its TAP (here: injected
// into a pump-mode stack) must never panic the stack or wedge it.
func FuzzInjectFrame(f *testing.F) {
	world := netip.MustParseAddr("198.51.100.7")
	f.Add([]byte{})
	f.Add(ethFrame(0x0800, nil))
	f.Add(ethFrame(0x0800, ipv4Packet(6, sandboxV4, world, tcpSyn(40000, 80))))
	f.Add(ethFrame(0x0800, ipv4Packet(17, sandboxV4, dnsV4, udpDatagram(40001, 53, []byte("\x12\x34\x01\x00\x00\x01")))))
	f.Add(ethFrame(0x0800, ipv4Packet(17, sandboxV4, world, udpDatagram(40002, 7, []byte("hi")))))
	f.Add(ethFrame(0x0800, ipv4Packet(1, sandboxV4, world, []byte{8, 0, 0xf7, 0xff, 0, 0, 0, 0})))
	f.Add(ethFrame(0x0806, bytes.Repeat([]byte{0}, 28)))
	f.Add(ethFrame(0x86dd, bytes.Repeat([]byte{0x60}, 40)))
	fs := sharedFuzzStack(f)
	f.Fuzz(func(t *testing.T, frame []byte) {
		fs.st.pump.Inject(frame)
		// Mutations of the IP layer under a fixed, valid ethernet header reach
		// deeper than mutations of the whole frame.
		fs.st.pump.Inject(ethFrame(0x0800, frame))
		fs.st.pump.Inject(ethFrame(0x86dd, frame))
		checkHealthy(t, fs.st)
	})
}

// FuzzDNSOverTCP: the RFC 7766 framing in serveDNSTCP reads a length prefix and
// a message from the sandbox.  Any byte stream must end the connection cleanly,
// and every complete non-empty message must get exactly one framed answer.
func FuzzDNSOverTCP(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0})
	f.Add([]byte{0, 0})
	f.Add([]byte{0, 2, 0xab, 0xcd})
	f.Add([]byte{0, 2, 0xab, 0xcd, 0, 3, 1, 2, 3})
	f.Add([]byte{0xff, 0xff, 1, 2, 3})
	f.Add([]byte{0, 12, 0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0})
	fs := sharedFuzzStack(f)
	f.Fuzz(func(t *testing.T, stream []byte) {
		want := 0
		for rest := stream; len(rest) >= 2; {
			n := int(binary.BigEndian.Uint16(rest))
			if len(rest) < 2+n {
				break
			}
			if n > 0 {
				want++
			}
			rest = rest[2+n:]
		}
		c, err := gonet.DialTCP(fs.client, tcpip.FullAddress{
			NIC: 1, Addr: tcpipAddr(dnsV4), Port: 53,
		}, ipv4.ProtocolNumber)
		if err != nil {
			t.Fatalf("dial the stack's DNS over TCP: %v", err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(stream); err != nil {
			t.Fatalf("write: %v", err)
		}
		if err := c.CloseWrite(); err != nil {
			t.Fatalf("close write: %v", err)
		}
		got := 0
		var lenBuf [2]byte
		for {
			if _, err := io.ReadFull(c, lenBuf[:]); err != nil {
				if err != io.EOF {
					t.Fatalf("after %d answers: %v (the stack must close cleanly)", got, err)
				}
				break
			}
			msg := make([]byte, binary.BigEndian.Uint16(lenBuf[:]))
			if _, err := io.ReadFull(c, msg); err != nil {
				t.Fatalf("truncated answer: %v", err)
			}
			got++
		}
		if got != want {
			t.Fatalf("%d complete queries, %d answers", want, got)
		}
	})
}
