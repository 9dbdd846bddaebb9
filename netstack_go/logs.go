package main

import (
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/log"
)

// gVisor logs through its pkg/log, to stderr by default ("Martian packet
// dropped..." when the sandbox sends from a loopback address).  The library
// must not write to the supervisor's stderr (DESIGN §5: Go does not log), so
// every line is counted instead (stats.log_lines) and dropped.
var gvisorLogLines atomic.Uint64

type countingEmitter struct{}

func (countingEmitter) Emit(int, log.Level, time.Time, string, ...any) {
	gvisorLogLines.Add(1)
}

func init() {
	// Replace the emitter of the existing logger too, not only the global
	// target: package-level rate-limited loggers (ipv4's martian logger)
	// captured that *BasicLogger when their packages were initialised,
	// before this init runs.  Nothing logs concurrently during init.
	log.Log().Emitter = countingEmitter{}
	log.SetTarget(countingEmitter{})
}
