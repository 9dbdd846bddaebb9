// Package main is corral's netstack, built with -buildmode=c-shared.
// capi.go is the only file that imports "C"; every exported function follows
// the status-code contract of bindings/netstack.h.  Handles are small ints
// in a registry; no Go pointer ever crosses to C.
package main

// #cgo CFLAGS: -I${SRCDIR}/../bindings
// #include <stdlib.h>
// #include "netstack.h"
import "C"

import (
	"errors"
	"net/netip"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The constants shared with Python are the header's own values (cgo
// untyped constants), so they cannot drift apart; header_test.go checks that
// every constant the header defines for events and verdicts is bound here.
const (
	EvNewFlow    = C.CORRAL_EV_NEW_FLOW
	EvFlowClosed = C.CORRAL_EV_FLOW_CLOSED
	EvDNSQuery   = C.CORRAL_EV_DNS_QUERY
	EvFlowData   = C.CORRAL_EV_FLOW_DATA

	FlagDecided = C.CORRAL_FLAG_DECIDED
	FlagInbound = C.CORRAL_FLAG_INBOUND
	FlagLast    = C.CORRAL_FLAG_LAST

	ProtoICMP = C.CORRAL_PROTO_ICMP
	ProtoTCP  = C.CORRAL_PROTO_TCP
	ProtoUDP  = C.CORRAL_PROTO_UDP

	ReasonNone          = C.CORRAL_REASON_NONE
	ReasonEOF           = C.CORRAL_REASON_EOF
	ReasonReset         = C.CORRAL_REASON_RESET
	ReasonDenied        = C.CORRAL_REASON_DENIED
	ReasonRefused       = C.CORRAL_REASON_REFUSED
	ReasonUnreachable   = C.CORRAL_REASON_UNREACHABLE
	ReasonPolicyTimeout = C.CORRAL_REASON_POLICY_TIMEOUT
	ReasonIdle          = C.CORRAL_REASON_IDLE
	ReasonOverload      = C.CORRAL_REASON_OVERLOAD
	ReasonShutdown      = C.CORRAL_REASON_SHUTDOWN
	ReasonError         = C.CORRAL_REASON_ERROR
	ReasonDialTimeout   = C.CORRAL_REASON_DIAL_TIMEOUT

	ModeDirect Mode = C.CORRAL_MODE_DIRECT
	ModePump   Mode = C.CORRAL_MODE_PUMP
)

var errNoSpace = errors.New("buffer too small")

var registry struct {
	mu       sync.Mutex // guards the following fields
	next     C.int
	stacks   map[C.int]*Stack
	newError string // last corral_stack_new failure
}

func lookup(h C.int) *Stack {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	return registry.stacks[h]
}

//export corral_abi_version
func corral_abi_version() C.int { return C.CORRAL_NET_ABI_VERSION }

//export corral_stack_new
func corral_stack_new(cfg *C.corral_config) C.int {
	fail := func(err error) C.int {
		registry.mu.Lock()
		registry.newError = err.Error()
		registry.mu.Unlock()
		return C.CORRAL_EINVAL
	}
	if cfg == nil {
		return fail(errors.New("config is NULL"))
	}
	c := Config{
		Mode:           Mode(cfg.mode),
		TapFD:          int(cfg.tap_fd),
		MTU:            uint32(cfg.mtu),
		PolicyTimeout:  time.Duration(cfg.policy_timeout_ms) * time.Millisecond,
		MaxPending:     int(cfg.max_pending),
		UDPIdleTimeout: time.Duration(cfg.udp_idle_timeout_ms) * time.Millisecond,
		DialTimeout:    time.Duration(cfg.dial_timeout_ms) * time.Millisecond,
		PeekTimeout:    time.Duration(cfg.peek_timeout_ms) * time.Millisecond,
		Pcap:           cfg.flags&C.CORRAL_CONFIG_PCAP != 0,
		PcapFD:         int(cfg.pcap_fd),
	}
	if cfg.flags&^C.CORRAL_CONFIG_PCAP != 0 {
		return fail(errors.New("unknown bits in config flags"))
	}
	if c.Pcap && c.PcapFD < 0 {
		return fail(errors.New("CORRAL_CONFIG_PCAP needs pcap_fd"))
	}
	if c.Mode != ModeDirect && c.Mode != ModePump {
		return fail(errors.New("mode must be CORRAL_MODE_DIRECT or CORRAL_MODE_PUMP"))
	}
	if c.Mode == ModeDirect && c.TapFD < 0 {
		return fail(errors.New("direct mode needs the TAP fd"))
	}
	if c.MTU != 0 && (c.MTU < 1280 || c.MTU > 65520) {
		return fail(errors.New("mtu must be between 1280 and 65520"))
	}
	st, err := New(c)
	if err != nil {
		registry.mu.Lock()
		registry.newError = err.Error()
		registry.mu.Unlock()
		return C.CORRAL_EINTERNAL
	}
	registry.mu.Lock()
	defer registry.mu.Unlock()
	if registry.stacks == nil {
		registry.stacks = make(map[C.int]*Stack)
	}
	registry.next++
	registry.stacks[registry.next] = st
	return registry.next
}

//export corral_stack_close
func corral_stack_close(h C.int) C.int {
	registry.mu.Lock()
	st := registry.stacks[h]
	delete(registry.stacks, h)
	registry.mu.Unlock()
	if st != nil {
		st.Close()
	}
	return C.CORRAL_OK
}

//export corral_stack_shutdown
func corral_stack_shutdown(h C.int) C.int {
	st := lookup(h)
	if st == nil {
		return C.CORRAL_EBADHANDLE
	}
	st.Shutdown()
	return C.CORRAL_OK
}

//export corral_stack_eventfd
func corral_stack_eventfd(h C.int) C.int {
	st := lookup(h)
	if st == nil {
		return C.CORRAL_EBADHANDLE
	}
	return C.int(st.efd)
}

func putAddr(family *C.uint8_t, ip *[16]C.uint8_t, a netip.Addr) {
	if a.Is4() {
		*family = 4
		b := a.As4()
		for i := range 4 {
			ip[i] = C.uint8_t(b[i])
		}
		return
	}
	*family = 6
	b := a.As16()
	for i := range 16 {
		ip[i] = C.uint8_t(b[i])
	}
}

//export corral_stack_poll_events
func corral_stack_poll_events(h C.int, evs *C.corral_event, n C.int, payload *C.uint8_t, payloadCap C.uint32_t) C.int {
	st := lookup(h)
	if st == nil {
		return C.CORRAL_EBADHANDLE
	}
	if n < 0 || (n > 0 && evs == nil) || (payloadCap > 0 && payload == nil) {
		return C.CORRAL_EINVAL
	}
	used := 0
	evsOut := unsafe.Slice(evs, int(n))
	var pay []byte
	if payloadCap > 0 {
		pay = unsafe.Slice((*byte)(unsafe.Pointer(payload)), int(payloadCap))
	}
	got, stuck := st.events.takeFitting(int(n), func(ev *Event) bool {
		if used+len(ev.Payload) > len(pay) {
			return false
		}
		used += len(ev.Payload)
		return true
	})
	if len(got) == 0 && stuck {
		return C.CORRAL_ENOSPC // the next payload does not fit an empty buffer
	}
	off := 0
	for i := range got {
		ev := &got[i]
		o := &evsOut[i]
		*o = C.corral_event{}
		o.id = C.uint64_t(ev.ID)
		o.kind = C.int32_t(ev.Kind)
		o.proto = C.int32_t(ev.Proto)
		o.flags = C.uint32_t(ev.Flags)
		o.reason = C.int32_t(ev.Reason)
		putAddr(&o.family, (*[16]C.uint8_t)(unsafe.Pointer(&o.src_ip)), ev.Src.Addr())
		putAddr(&o.family, (*[16]C.uint8_t)(unsafe.Pointer(&o.dst_ip)), ev.Dst.Addr())
		o.src_port = C.uint16_t(ev.Src.Port())
		o.dst_port = C.uint16_t(ev.Dst.Port())
		o.bytes_out = C.uint64_t(ev.BytesOut)
		o.bytes_in = C.uint64_t(ev.BytesIn)
		o.duration_ns = C.uint64_t(ev.Duration.Nanoseconds())
		o.payload_off = C.uint32_t(off)
		o.payload_len = C.uint32_t(len(ev.Payload))
		copy(pay[off:], ev.Payload)
		off += len(ev.Payload)
	}
	return C.int(len(got))
}

//export corral_stack_set_verdicts
func corral_stack_set_verdicts(h C.int, v *C.corral_verdict, n C.int) C.int {
	st := lookup(h)
	if st == nil {
		return C.CORRAL_EBADHANDLE
	}
	if n < 0 || (n > 0 && v == nil) {
		return C.CORRAL_EINVAL
	}
	matched := 0
	for _, cv := range unsafe.Slice(v, int(n)) {
		var verdict Verdict
		switch cv.action {
		case C.CORRAL_VERDICT_ALLOW:
			verdict.Allow = true
		case C.CORRAL_VERDICT_PEEK:
			verdict.Allow, verdict.Peek = true, true
		case C.CORRAL_VERDICT_OBSERVE:
			verdict.Allow, verdict.Observe = true, true
		case C.CORRAL_VERDICT_DENY:
		default:
			st.setError(errors.New("verdict action must be ALLOW, DENY, PEEK or OBSERVE"))
			return C.CORRAL_EINVAL
		}
		if verdict.Allow && cv.dial_family != 0 {
			ip := C.GoBytes(unsafe.Pointer(&cv.dial_ip[0]), 16)
			var a netip.Addr
			switch cv.dial_family {
			case 4:
				a = netip.AddrFrom4([4]byte(ip[:4]))
			case 6:
				a = netip.AddrFrom16([16]byte(ip))
			default:
				st.setError(errors.New("verdict dial_family must be 0, 4 or 6"))
				return C.CORRAL_EINVAL
			}
			verdict.DialAddr = a
		}
		if verdict.Allow {
			verdict.DialPort = uint16(cv.dial_port)
		}
		if st.SetVerdict(uint64(cv.id), verdict) {
			matched++
		}
	}
	return C.int(matched)
}

//export corral_stack_dns_reply
func corral_stack_dns_reply(h C.int, qid C.uint64_t, buf *C.uint8_t, n C.uint32_t) C.int {
	st := lookup(h)
	if st == nil {
		return C.CORRAL_EBADHANDLE
	}
	if n > 0xffff || (n > 0 && buf == nil) {
		return C.CORRAL_EINVAL
	}
	var msg []byte
	if n > 0 {
		msg = C.GoBytes(unsafe.Pointer(buf), C.int(n))
	}
	if !st.DNSReply(uint64(qid), msg) {
		return C.CORRAL_EUNKNOWN
	}
	return C.CORRAL_OK
}

//export corral_stack_inject
func corral_stack_inject(h C.int, buf *C.uint8_t, lens *C.uint32_t, n C.int) C.int {
	st := lookup(h)
	if st == nil {
		return C.CORRAL_EBADHANDLE
	}
	if st.pump == nil {
		return C.CORRAL_ENOTSUP
	}
	if n < 0 || (n > 0 && (buf == nil || lens == nil)) {
		return C.CORRAL_EINVAL
	}
	ls := unsafe.Slice(lens, int(n))
	total := 0
	for _, l := range ls {
		total += int(l)
	}
	data := unsafe.Slice((*byte)(unsafe.Pointer(buf)), total)
	off := 0
	for _, l := range ls {
		// Inject copies the frame: C memory is not kept past this call.
		st.pump.Inject(data[off : off+int(l)])
		off += int(l)
	}
	return n
}

//export corral_stack_read_frames
func corral_stack_read_frames(h C.int, buf *C.uint8_t, bufCap C.uint32_t, lens *C.uint32_t, n C.int) C.int {
	st := lookup(h)
	if st == nil {
		return C.CORRAL_EBADHANDLE
	}
	if st.pump == nil {
		return C.CORRAL_ENOTSUP
	}
	if n < 0 || (n > 0 && (buf == nil || lens == nil)) {
		return C.CORRAL_EINVAL
	}
	out := unsafe.Slice((*byte)(unsafe.Pointer(buf)), int(bufCap))
	ls := unsafe.Slice((*uint32)(unsafe.Pointer(lens)), int(n))
	got, err := st.pump.ReadFrames(out, ls)
	if err != nil {
		return C.CORRAL_ENOSPC
	}
	return C.int(got)
}

//export corral_stack_publish
func corral_stack_publish(h C.int, proto C.int, hostIP *C.char, hostPort, sandboxPort C.int) C.int {
	st := lookup(h)
	if st == nil {
		return C.CORRAL_EBADHANDLE
	}
	if hostIP == nil {
		return C.CORRAL_EINVAL
	}
	port, err := st.Publish(int(proto), C.GoString(hostIP), int(hostPort), int(sandboxPort))
	if err != nil {
		st.setError(err)
		return C.CORRAL_EINVAL
	}
	return C.int(port)
}

//export corral_stack_stats
func corral_stack_stats(h C.int, out *C.corral_stats) C.int {
	st := lookup(h)
	if st == nil {
		return C.CORRAL_EBADHANDLE
	}
	if out == nil {
		return C.CORRAL_EINVAL
	}
	s := st.Stats()
	*out = C.corral_stats{
		flows_total:   C.uint64_t(s.FlowsTotal),
		flows_open:    C.uint64_t(s.FlowsOpen),
		pending:       C.uint64_t(s.Pending),
		dns_queries:   C.uint64_t(s.DNSQueries),
		frames_in:     C.uint64_t(s.FramesIn),
		frames_out:    C.uint64_t(s.FramesOut),
		drops:         C.uint64_t(s.Drops),
		events_queued: C.uint64_t(s.EventsQueued),
		goroutines:    C.uint64_t(s.Goroutines),
		pcap_frames:   C.uint64_t(s.PcapFrames),
		pcap_errors:   C.uint64_t(s.PcapErrors),
		log_lines:     C.uint64_t(s.LogLines),
		refused:       C.uint64_t(s.Refused),
	}
	return C.CORRAL_OK
}

//export corral_socket_inodes
func corral_socket_inodes(diagFD C.int, flows *C.corral_flow_addr, n C.int, inodes *C.uint32_t,
	timeoutMS C.int, errOut *C.int32_t) C.int {
	if n < 0 || (n > 0 && (flows == nil || inodes == nil)) || errOut == nil || timeoutMS < 0 {
		return C.CORRAL_EINVAL
	}
	in := unsafe.Slice(flows, int(n))
	addrs := make([]flowAddr, n)
	for i := range in {
		f := &in[i]
		if (f.proto != ProtoTCP && f.proto != ProtoUDP) || (f.family != 4 && f.family != 6) {
			return C.CORRAL_EINVAL
		}
		a := &addrs[i]
		a.proto, a.v6 = uint8(f.proto), f.family == 6
		a.sport, a.dport = uint16(f.src_port), uint16(f.dst_port)
		a.src = *(*[16]byte)(unsafe.Pointer(&f.src))
		a.dst = *(*[16]byte)(unsafe.Pointer(&f.dst))
	}
	found, err := socketInodes(int(diagFD), addrs, time.Duration(timeoutMS)*time.Millisecond)
	if err != nil {
		var errno unix.Errno
		if !errors.As(err, &errno) {
			errno = unix.EIO
		}
		*errOut = C.int32_t(errno)
		return C.CORRAL_EINTERNAL
	}
	out := unsafe.Slice(inodes, int(n))
	for i, inode := range found {
		out[i] = C.uint32_t(inode)
	}
	return C.CORRAL_OK
}

//export corral_socket_holders
func corral_socket_holders(inodes *C.uint32_t, n C.int, pids *C.int32_t, nPids C.int,
	holders *C.int32_t, maxHolders C.int, counts *C.int32_t) C.int {
	if n < 0 || nPids < 0 || maxHolders <= 0 || (n > 0 && (inodes == nil || holders == nil || counts == nil)) ||
		(nPids > 0 && pids == nil) {
		return C.CORRAL_EINVAL
	}
	want := make([]uint32, n)
	for i, v := range unsafe.Slice(inodes, int(n)) {
		want[i] = uint32(v)
	}
	procs := make([]int32, nPids)
	for i, v := range unsafe.Slice(pids, int(nPids)) {
		procs[i] = int32(v)
	}
	found := socketHolders(want, procs, int(maxHolders))
	outHolders := unsafe.Slice(holders, int(n)*int(maxHolders))
	outCounts := unsafe.Slice(counts, int(n))
	for i, h := range found {
		outCounts[i] = C.int32_t(len(h))
		for j, pid := range h {
			outHolders[i*int(maxHolders)+j] = C.int32_t(pid)
		}
	}
	return C.CORRAL_OK
}

//export corral_last_error
func corral_last_error(h C.int, buf *C.char, bufCap C.int) C.int {
	var text string
	if h == 0 {
		registry.mu.Lock()
		text = registry.newError
		registry.mu.Unlock()
	} else if st := lookup(h); st != nil {
		text = st.LastError()
	} else {
		return C.CORRAL_EBADHANDLE
	}
	if buf != nil && bufCap > 0 {
		out := unsafe.Slice((*byte)(unsafe.Pointer(buf)), int(bufCap))
		n := copy(out[:bufCap-1], text)
		out[n] = 0
	}
	return C.int(len(text))
}

func main() {}
