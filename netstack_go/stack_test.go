package main

import (
	"bytes"
	"io"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/log"
)

func TestVerdictTarget(t *testing.T) {
	dst := netip.MustParseAddrPort("10.0.2.2:8080")
	cases := []struct {
		v    Verdict
		want string
	}{
		{Verdict{Allow: true}, "10.0.2.2:8080"},
		{Verdict{Allow: true, DialAddr: netip.MustParseAddr("127.0.0.1")}, "127.0.0.1:8080"},
		{Verdict{Allow: true, DialPort: 80}, "10.0.2.2:80"},
	}
	for _, c := range cases {
		if got := c.v.target(dst).String(); got != c.want {
			t.Errorf("%+v: got %s want %s", c.v, got, c.want)
		}
	}
}

func TestEventQueueKeepsOrderAndStopsAtPayloadLimit(t *testing.T) {
	kicks := 0
	q := eventQueue{notify: func() { kicks++ }}
	q.push(Event{ID: 1})
	q.push(Event{ID: 2, Payload: make([]byte, 10)})
	q.push(Event{ID: 3})
	if kicks != 1 {
		t.Fatalf("want one wake-up for the empty->non-empty transition, got %d", kicks)
	}
	room := 5
	got := q.take(10, func(ev *Event) bool { room -= len(ev.Payload); return room >= 0 })
	if len(got) != 1 || got[0].ID != 1 || q.Len() != 2 {
		t.Fatalf("take stopped wrongly: %+v, %d left", got, q.Len())
	}
	got = q.take(10, func(*Event) bool { return true })
	if len(got) != 2 || got[0].ID != 2 || got[1].ID != 3 || q.Len() != 0 {
		t.Fatalf("order lost: %+v", got)
	}
}

func TestPumpStackLifecycle(t *testing.T) {
	st, err := New(Config{Mode: ModePump, PolicyTimeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	f := st.newFlow(ProtoTCP, netip.MustParseAddrPort("10.0.2.100:40000"), netip.MustParseAddrPort("198.51.100.1:80"))
	if _, err := st.decide(f); err != errPolicyTimeout {
		t.Fatalf("no verdict must be a policy timeout, got %v", err)
	}
	f.finish(st, reasonFor(errPolicyTimeout))
	f.finish(st, ReasonEOF) // a second close is ignored
	evs := st.events.take(10, func(*Event) bool { return true })
	if len(evs) != 2 || evs[0].Kind != EvNewFlow || evs[1].Kind != EvFlowClosed || evs[1].Reason != ReasonPolicyTimeout {
		t.Fatalf("want NEW_FLOW then one FLOW_CLOSED(policy-timeout), got %+v", evs)
	}
	if s := st.Stats(); s.FlowsOpen != 0 || s.Pending != 0 {
		t.Fatalf("leaked: %+v", s)
	}
	st.Close()
	st.Close()
}

func TestEventQueueReportsOnlyAnEventThatDoesNotFit(t *testing.T) {
	q := eventQueue{notify: func() {}}
	if got, stuck := q.takeFitting(4, func(*Event) bool { return false }); len(got) != 0 || stuck {
		t.Fatalf("empty queue: got %d events, stuck=%v", len(got), stuck)
	}
	q.push(Event{ID: 1, Payload: make([]byte, 100)})
	if got, stuck := q.takeFitting(4, func(ev *Event) bool { return len(ev.Payload) < 10 }); len(got) != 0 || !stuck {
		t.Fatalf("oversized payload: got %d events, stuck=%v", len(got), stuck)
	}
	if got, stuck := q.takeFitting(4, func(*Event) bool { return true }); len(got) != 1 || stuck {
		t.Fatalf("fitting payload: got %d events, stuck=%v", len(got), stuck)
	}
}

func TestShutdownQueuesTheClosesBeforeClose(t *testing.T) {
	st, err := New(Config{Mode: ModePump, PolicyTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	f := st.newFlow(ProtoUDP, netip.MustParseAddrPort("10.0.2.100:40000"), netip.MustParseAddrPort("198.51.100.1:53"))
	if !st.spawn(func() {
		_, err := st.decide(f)
		f.bytesOut.Add(3)
		f.finish(st, reasonFor(err))
	}) {
		t.Fatal("spawn refused on an open stack")
	}
	for st.Stats().Pending == 0 {
		time.Sleep(time.Millisecond)
	}
	st.Shutdown()
	evs := st.events.take(10, func(*Event) bool { return true })
	if len(evs) != 2 || evs[1].Kind != EvFlowClosed || evs[1].Reason != ReasonShutdown || evs[1].BytesOut != 3 {
		t.Fatalf("want NEW_FLOW then FLOW_CLOSED(shutdown, 3 bytes out) before Close, got %+v", evs)
	}
	if st.spawn(func() {}) {
		t.Fatal("a shut-down stack must not start goroutines")
	}
	st.Close()
	st.Close()
}

func TestGvisorLogIsCountedNotWritten(t *testing.T) {
	before := gvisorLogLines.Load()
	log.Warningf("a warning from gVisor")
	log.BasicRateLimitedLogger(time.Minute).Infof("Martian packet dropped")
	if got := gvisorLogLines.Load() - before; got != 2 {
		t.Fatalf("want 2 counted log lines, got %d", got)
	}
	if _, ok := log.Log().Emitter.(countingEmitter); !ok {
		t.Fatalf("gVisor logs to %T, not to the counter", log.Log().Emitter)
	}
}

func TestObservedFirstBytesAreReportedOnceAndBounded(t *testing.T) {
	st, err := New(Config{Mode: ModePump, PeekTimeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	src, dst := netip.MustParseAddrPort("10.0.2.100:40000"), netip.MustParseAddrPort("198.51.100.1:80")
	fb := st.observeFirst(st.newFlow(ProtoTCP, src, dst))
	big := make([]byte, peekMax+100)
	fb.report(big)
	big[0] = 'x' // the event holds its own copy
	fb.report([]byte("later"))
	var nilFB *firstBytes
	nilFB.report([]byte("not observed")) // no-op
	evs := st.events.take(10, func(*Event) bool { return true })
	if len(evs) != 1 || evs[0].Kind != EvFlowData || len(evs[0].Payload) != peekMax || evs[0].Payload[0] != 0 {
		t.Fatalf("want one FLOW_DATA of peekMax bytes, got %+v", evs)
	}

	// A client that sends nothing: an empty FLOW_DATA after PeekTimeout.
	st.cfg.PeekTimeout = time.Millisecond
	st.observeFirst(st.newFlow(ProtoTCP, src, dst))
	deadline := time.Now().Add(5 * time.Second)
	for st.events.Len() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	evs = st.events.take(10, func(*Event) bool { return true })
	if len(evs) != 1 || evs[0].Kind != EvFlowData || len(evs[0].Payload) != 0 {
		t.Fatalf("want one empty FLOW_DATA after the timeout, got %+v", evs)
	}
}

// chunkReader returns its chunks one per Read (as a socket would).
type chunkReader struct{ chunks [][]byte }

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.chunks[0])
	r.chunks[0] = r.chunks[0][n:]
	if len(r.chunks[0]) == 0 {
		r.chunks = r.chunks[1:]
	}
	return n, nil
}

func TestCopyHalfMovesBulkThroughBigBuffersAndGivesThemBack(t *testing.T) {
	var want []byte
	var chunks [][]byte
	for i, size := range []int{100, bigCopyBuf * 3, 10, bigCopyBuf, 5} {
		c := bytes.Repeat([]byte{byte('a' + i)}, size)
		chunks = append(chunks, c)
		want = append(want, c...)
	}
	var out bytes.Buffer
	var count atomic.Uint64
	if err := copyHalf(&out, &chunkReader{chunks: chunks}, &count, nil); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), want) || count.Load() != uint64(len(want)) {
		t.Fatalf("copied %d bytes (counted %d), want %d intact", out.Len(), count.Load(), len(want))
	}
	if n := bigOut.Load(); n != 0 {
		t.Fatalf("%d big buffers still out after the copy", n)
	}

	// With every big buffer taken, a bulk copy still works on a small one.
	bigOut.Store(maxBigBufs)
	defer bigOut.Store(0)
	out.Reset()
	if err := copyHalf(&out, &chunkReader{chunks: [][]byte{want}}, &count, nil); err != nil || !bytes.Equal(out.Bytes(), want) {
		t.Fatalf("copy at the cap: %v, %d bytes", err, out.Len())
	}
	if n := bigOut.Load(); n != maxBigBufs {
		t.Fatalf("the cap was exceeded or released wrongly: %d", n)
	}
}
