package tiered

import (
	"errors"
	"slices"
	"testing"
)

// A master's breaker remembers the keys L1 kept while it was open and hands
// exactly those to its recovery; past maxKept, the recovery drops all of L1.
func TestBreakerRecoveryDropsWhatWasKeptWhileOpen(t *testing.T) {
	var kept []string
	var all bool
	recovered := 0
	b := &breaker{track: true, onRecover: func(k []string, a bool) { kept, all = k, a; recovered++ }}
	if until := b.outage("before"); until != 0 {
		t.Fatalf("outage on a closed breaker = %d, want 0 (the value must not be kept)", until)
	}
	b.record(errors.New("connection refused"))
	if until := b.outage("a"); until != b.openUntil.Load() || until == 0 {
		t.Fatalf("outage on an open breaker = %d, want its openUntil %d", until, b.openUntil.Load())
	}
	b.outage("b")
	b.outage("a")
	b.record(nil)
	slices.Sort(kept)
	if recovered != 1 || all || !slices.Equal(kept, []string{"a", "b"}) {
		t.Fatalf("recovery got kept %v, all %v (%d calls); want [a b], false, 1", kept, all, recovered)
	}
	b.record(nil)
	if recovered != 1 {
		t.Fatal("a success on a closed breaker recovered again")
	}

	b.record(errors.New("connection refused"))
	for i := range maxKept + 1 {
		b.outage(string(rune('a'+i%26)) + string(rune(i)))
	}
	b.record(nil)
	if !all {
		t.Errorf("recovery after %d kept keys: all = false, want true", maxKept+1)
	}

	// The cache's breaker tracks no keys: its recovery drops all of L1.
	c := &breaker{onRecover: func(k []string, a bool) { kept, all = k, a }}
	c.record(errors.New("connection refused"))
	c.outage("a")
	c.record(nil)
	if !all || len(kept) != 0 {
		t.Errorf("the cache's breaker recovered with kept %v, all %v; want none, true", kept, all)
	}
}
