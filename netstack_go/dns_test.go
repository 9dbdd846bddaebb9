package main

import (
	"net/netip"
	"testing"
	"time"
)

// A DNS flood against a supervisor that does not answer: at most
// maxDNSPending queries wait (the rest are dropped at once and counted), and
// none once the event queue is full.
func TestDNSFloodIsBoundedWhenTheSupervisorDoesNotAnswer(t *testing.T) {
	st, err := New(Config{Mode: ModePump, PolicyTimeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	src := netip.MustParseAddrPort("10.0.2.100:40000")
	dst := netip.AddrPortFrom(dnsV4, 53)
	dropped := 0
	for i := 0; i < 3*maxDNSPending; i++ {
		st.query(ProtoUDP, src, dst, []byte{1, 2}, func(ans []byte) {
			if ans == nil {
				dropped++
			}
		})
	}
	if q := st.events.Len(); q != maxDNSPending {
		t.Fatalf("queued %d DNS_QUERY events, want %d", q, maxDNSPending)
	}
	if dropped != 2*maxDNSPending || st.Stats().Drops < uint64(2*maxDNSPending) {
		t.Fatalf("dropped %d (stats %d), want %d", dropped, st.Stats().Drops, 2*maxDNSPending)
	}
	// Answers free the slots; a full event queue then refuses new work.
	for _, ev := range st.events.take(maxDNSPending, func(*Event) bool { return true }) {
		st.DNSReply(ev.ID, []byte{0})
	}
	for i := 0; i < maxQueuedEvents; i++ {
		st.events.push(Event{ID: uint64(i), Kind: EvFlowClosed})
	}
	before := dropped
	st.query(ProtoUDP, src, dst, []byte{1, 2}, func(ans []byte) {
		if ans == nil {
			dropped++
		}
	})
	if dropped != before+1 || st.events.Len() != maxQueuedEvents {
		t.Fatalf("a query with the event queue full must be dropped, queue %d", st.events.Len())
	}
}
