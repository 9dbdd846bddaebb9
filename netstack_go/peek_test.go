package main

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"
)

// peekHarness runs peekAndAsk on one end of a pipe (the client writes on the
// other) and plays the supervisor: it answers each FLOW_DATA with answer.
type peekHarness struct {
	t      *testing.T
	st     *Stack
	f      *flow
	client net.Conn
	up     bytes.Buffer
	done   chan int32
}

func newPeekHarness(t *testing.T, peekTimeout time.Duration) *peekHarness {
	st, err := New(Config{Mode: ModePump, PeekTimeout: peekTimeout, PolicyTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	client, server := net.Pipe()
	t.Cleanup(func() { client.Close(); server.Close() })
	h := &peekHarness{t: t, st: st, client: client, done: make(chan int32, 1),
		f: st.newFlow(ProtoTCP, netip.MustParseAddrPort("10.0.2.100:40000"),
			netip.MustParseAddrPort("198.51.100.10:443"))}
	go func() { h.done <- st.peekAndAsk(h.f, server, &h.up) }()
	return h
}

// next waits for the next FLOW_DATA.
func (h *peekHarness) next() Event {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if evs := h.st.events.take(1, func(*Event) bool { return true }); len(evs) == 1 {
			if evs[0].Kind != EvFlowData || evs[0].ID != h.f.id {
				h.t.Fatalf("want FLOW_DATA of flow %d, got %+v", h.f.id, evs[0])
			}
			return evs[0]
		}
		time.Sleep(time.Millisecond)
	}
	h.t.Fatal("no FLOW_DATA within 5 s")
	return Event{}
}

func (h *peekHarness) answer(v Verdict) {
	deadline := time.Now().Add(5 * time.Second)
	for !h.st.SetVerdict(h.f.id, v) {
		if time.Now().After(deadline) {
			h.t.Fatal("peekAndAsk is not waiting for a verdict")
		}
		time.Sleep(time.Millisecond)
	}
}

func (h *peekHarness) result() int32 {
	select {
	case r := <-h.done:
		return r
	case <-time.After(5 * time.Second):
		h.t.Fatal("peekAndAsk did not return")
		return -1
	}
}

var more = Verdict{Allow: true, Peek: true}

func TestPeekReadsOnUntilTheSupervisorHasEnoughThenWritesEverythingUpstream(t *testing.T) {
	h := newPeekHarness(t, time.Second)
	go func() {
		h.client.Write([]byte("\x16\x03\x01"))
		h.client.Write([]byte("rest of the hello"))
	}()
	if ev := h.next(); string(ev.Payload) != "\x16\x03\x01" || ev.Flags&FlagLast != 0 {
		t.Fatalf("first read: %+v", ev)
	}
	if h.up.Len() != 0 {
		t.Fatal("bytes went upstream before the verdict")
	}
	h.answer(more)
	if ev := h.next(); string(ev.Payload) != "rest of the hello" {
		t.Fatalf("second read: %q", ev.Payload)
	}
	h.answer(Verdict{Allow: true})
	if r := h.result(); r != ReasonNone {
		t.Fatalf("allowed: reason %d", r)
	}
	if got := h.up.String(); got != "\x16\x03\x01rest of the hello" {
		t.Fatalf("upstream got %q", got)
	}
}

func TestPeekBoundFromTheFirstByteEndsWithLastAndMoreIsThenADeny(t *testing.T) {
	h := newPeekHarness(t, 50*time.Millisecond)
	time.Sleep(100 * time.Millisecond) // no bound before the first byte
	go h.client.Write([]byte("GET / HT"))
	if ev := h.next(); string(ev.Payload) != "GET / HT" || ev.Flags&FlagLast != 0 {
		t.Fatalf("a wait before the first byte must not end the read: %+v", ev)
	}
	h.answer(more)
	ev := h.next() // the client stalls: the bound runs out
	if len(ev.Payload) != 0 || ev.Flags&FlagLast == 0 || ev.Reason != ReasonNone {
		t.Fatalf("want an empty last FLOW_DATA, got %+v", ev)
	}
	h.answer(more)
	if r := h.result(); r != ReasonDenied {
		t.Fatalf("more after the last must be a deny, got %d", r)
	}
	if h.up.Len() != 0 {
		t.Fatal("a denied flow sent bytes upstream")
	}
}

func TestPeekClientCloseIsLastWithEOF(t *testing.T) {
	h := newPeekHarness(t, time.Second)
	go func() { h.client.Write([]byte("\x16")); h.client.Close() }()
	h.next()
	h.answer(more)
	ev := h.next()
	if ev.Flags&FlagLast == 0 || ev.Reason != ReasonEOF {
		t.Fatalf("want last with reason EOF, got %+v", ev)
	}
	h.answer(Verdict{})
	if r := h.result(); r != ReasonDenied {
		t.Fatalf("deny: reason %d", r)
	}
}
