package tiered

import (
	"testing"
	"time"
)

// A clock nobody reads pauses, so that idle caches cost no CPU; the first
// read after the pause gets the current time and sets it ticking again.
func TestAnIdleClockPausesAndTheNextReadWakesIt(t *testing.T) {
	c := newClock()
	defer c.close()
	waitUntil(t, invWait, "the clock to pause", func() bool { return c.state.Load() == clockPaused })
	before := time.Now().UnixNano()
	if now := c.now(); now < before {
		t.Fatalf("the first read after a pause returned %d, older than %d", now, before)
	}
	woke := c.nanos.Load()
	waitUntil(t, invWait, "the clock to tick again", func() bool {
		_ = c.now() // keep it awake
		return c.nanos.Load() > woke
	})
}

// All caches share one clock, which stops with the last of them.
func TestCachesShareOneClock(t *testing.T) {
	refs := func() int {
		sharedClock.Lock()
		defer sharedClock.Unlock()
		return sharedClock.refs
	}
	before := refs()
	_, rdb := newMiniredis(t)
	a, err := New[string](Options{Redis: rdb, Namespace: uniqueNamespace(t)})
	if err != nil {
		t.Fatal(err)
	}
	b, err := New[string](Options{Redis: rdb, Namespace: uniqueNamespace(t)})
	if err != nil {
		t.Fatal(err)
	}
	if a.clock != b.clock || refs() != before+2 {
		t.Errorf("two caches: same clock %v, references %d (want %d)", a.clock == b.clock, refs(), before+2)
	}
	_ = a.Close()
	_ = b.Close()
	if refs() != before {
		t.Errorf("after Close the shared clock has %d references; want %d", refs(), before)
	}
	if before == 0 && sharedClock.c != nil {
		t.Error("the last Close did not stop the shared clock")
	}
}
