package main

import (
	"runtime/debug"
	"time"
)

// The Go runtime keeps freed heap for reuse and returns it to the OS only
// slowly (the background scavenger).  After a burst of flows — 10,000
// concurrent connections took the supervisor from 39 MB to 408 MB, and it
// stayed there (benchmarks/soak.py) — the supervisor should go back to its
// idle size.  So once the number of open flows has fallen well below its
// recent peak, and stays there for a check interval, hand the memory back.
const (
	memoryCheckEvery = 2 * time.Second
	// A peak below this many flows is too small to be worth a full GC.
	memoryPeakFloor = 256
)

// returnMemory runs until the stack closes.
func (st *Stack) returnMemory() {
	ticker := time.NewTicker(memoryCheckEvery)
	defer ticker.Stop()
	var peak int64
	for {
		select {
		case <-st.ctx.Done():
			return
		case <-ticker.C:
		}
		open := st.flowsOpen.Load()
		if open > peak {
			peak = open
			continue
		}
		if peak >= memoryPeakFloor && open <= peak/8 {
			debug.FreeOSMemory()
			peak = open
		}
	}
}
