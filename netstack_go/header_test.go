package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestHeaderConstantsAreBound checks that every value the header defines for
// the event, flag, protocol, reason, mode and verdict families is bound from
// the header itself (C.CORRAL_*) in the Go sources: a constant added to
// netstack.h without its Go side, or a Go constant typed in by hand, fails
// here (capi.go's definitions make a wrong value impossible).
func TestHeaderConstantsAreBound(t *testing.T) {
	h, err := os.ReadFile(filepath.Join("..", "bindings", "netstack.h"))
	if err != nil {
		t.Fatal(err)
	}
	defs := regexp.MustCompile(`(?m)^#define (CORRAL_(?:EV|FLAG|PROTO|REASON|MODE|VERDICT|CONFIG)_[A-Z_]+) `).
		FindAllSubmatch(h, -1)
	if len(defs) < 25 {
		t.Fatalf("found only %d constants in netstack.h: has the header's layout changed?", len(defs))
	}
	files, _ := filepath.Glob("*.go")
	var src strings.Builder
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		src.Write(b)
	}
	all := src.String()
	for _, d := range defs {
		if name := string(d[1]); !strings.Contains(all, "C."+name) {
			t.Errorf("netstack.h defines %s but no Go file uses C.%s", name, name)
		}
	}
	// No Go declaration may restate a header value as a literal.
	literal := regexp.MustCompile(`(?m)^\s*(Ev|Flag|Proto|Reason)[A-Z]\w*\s*(?:int32\s*)?=\s*[0-9]`)
	if m := literal.FindString(all); m != "" {
		t.Errorf("a header constant is typed in by hand: %q; bind it as C.CORRAL_...", strings.TrimSpace(m))
	}
}
