package main

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Event is one record for Python.
type Event struct {
	ID       uint64
	Kind     int32
	Proto    int32
	Flags    uint32
	Reason   int32
	Src, Dst netip.AddrPort
	BytesOut uint64
	BytesIn  uint64
	Duration time.Duration
	Payload  []byte
}

// maxQueuedEvents bounds the queue for new work: while this many events wait
// for Python, a new DNS query or UDP flow is dropped and a new TCP connection
// reset before it has an event (the client retries: the sandbox is slowed,
// not the supervisor flooded; counted in stats.drops).  push itself never drops: the events of work
// already under way (a flow's close, a verdict's request) are bounded by
// that work (MaxPending, maxDNSPending, the open flows).
const maxQueuedEvents = 1 << 14

// eventQueue holds events until Python takes them; see maxQueuedEvents.
type eventQueue struct {
	notify func()
	mu     sync.Mutex // guards q
	q      []Event
}

func (q *eventQueue) push(ev Event) {
	q.mu.Lock()
	wasEmpty := len(q.q) == 0
	q.q = append(q.q, ev)
	q.mu.Unlock()
	if wasEmpty {
		// The reader drains to empty after reading the eventfd, so only the
		// empty -> non-empty transition needs a wake-up.
		q.notify()
	}
}

// take removes up to n events for which fits returns true, in order.
func (q *eventQueue) take(n int, fits func(*Event) bool) []Event {
	out, _ := q.takeFitting(n, fits)
	return out
}

// takeFitting is take that also reports whether it stopped at an event that
// did not fit (decided under the same lock: an event pushed meanwhile must
// not look like one that cannot fit).
func (q *eventQueue) takeFitting(n int, fits func(*Event) bool) ([]Event, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	i := 0
	for i < n && i < len(q.q) && fits(&q.q[i]) {
		i++
	}
	stuck := i < n && i < len(q.q)
	out := make([]Event, i)
	copy(out, q.q[:i])
	clear(q.q[:i])
	q.q = q.q[i:]
	if len(q.q) == 0 {
		q.q = nil // let the backing array go after a burst
	}
	return out, stuck
}

// full reports whether new work should wait: maxQueuedEvents are queued.
func (q *eventQueue) full() bool {
	return q.Len() >= maxQueuedEvents
}

func (q *eventQueue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.q)
}

// flow is one sandbox connection (TCP), 4-tuple (UDP) or echo id (ICMP).
type flow struct {
	id       uint64
	proto    int32
	flags    uint32
	src, dst netip.AddrPort
	start    time.Time
	bytesOut atomic.Uint64 // sandbox -> world
	bytesIn  atomic.Uint64 // world -> sandbox
	opened   atomic.Bool
	closed   atomic.Bool
}

func (st *Stack) newFlow(proto int32, src, dst netip.AddrPort) *flow {
	return &flow{id: st.nextID.Add(1), proto: proto, src: src, dst: dst, start: time.Now()}
}

func (f *flow) event(kind int32) Event {
	return Event{ID: f.id, Kind: kind, Proto: f.proto, Flags: f.flags, Src: f.src, Dst: f.dst}
}

// open queues NEW_FLOW, asking for a verdict.
func (f *flow) open(st *Stack) {
	f.opened.Store(true)
	st.flowsTotal.Add(1)
	st.flowsOpen.Add(1)
	st.events.push(f.event(EvNewFlow))
}

// openDecided queues a NEW_FLOW that needs no verdict (reason says why).
func (f *flow) openDecided(st *Stack, reason int32) {
	f.flags |= FlagDecided
	ev := f.event(EvNewFlow)
	ev.Reason = reason
	f.opened.Store(true)
	st.flowsTotal.Add(1)
	st.flowsOpen.Add(1)
	st.events.push(ev)
}

// data queues FLOW_DATA: the client's first bytes of a peeked TCP flow,
// asking for the final verdict.
func (f *flow) data(st *Stack, first []byte) {
	ev := f.event(EvFlowData)
	ev.Payload = first
	st.events.push(ev)
}

// finish queues the one FLOW_CLOSED of f; later calls do nothing.
func (f *flow) finish(st *Stack, reason int32) {
	if !f.opened.Load() || !f.closed.CompareAndSwap(false, true) {
		return
	}
	ev := f.event(EvFlowClosed)
	ev.Reason = reason
	ev.BytesOut = f.bytesOut.Load()
	ev.BytesIn = f.bytesIn.Load()
	ev.Duration = time.Since(f.start)
	st.flowsOpen.Add(-1)
	st.events.push(ev)
}
