package tiered

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// A message that carries a value and arrives after L1 heard of a newer
// write of its key (an own Delete answered before an older Set's message
// came) must not bring that value back, even while L1 holds an unservable
// fill of the key.
func TestALateMessageOlderThanAWriteHeardDoesNotBringItsValueBack(t *testing.T) {
	clk := newClock()
	defer clk.close()
	var epoch atomic.Uint64
	l, err := newLocal[string](1<<20, clk, &epoch)
	if err != nil {
		t.Fatal(err)
	}
	defer l.close()
	fill := l.begin("k")                                                                                        // a Get reads Redis, which holds v1
	l.heard("k", 20, nil)                                                                                       // the own Delete's reply (version 20)
	l.set(fill, &entry[string]{value: "v1", expires: time.Now().Add(time.Hour).UnixNano(), version: 10}, false) // the Get's fill: unservable, but held
	l.heard("k", 10, func() *entry[string] {                                                                    // v1's message, late
		return &entry[string]{value: "v1", expires: time.Now().Add(time.Hour).UnixNano(), version: 10}
	})
	if e, ok := l.get("k"); ok {
		t.Fatalf("L1 serves %q (version %d) after hearing of version 20", e.value, e.version)
	}
}

// An instance's own message never brings its value into its own L1: the
// write keeps its value itself (wrote), with the caller's ItemOptions. A
// message that arrives after that entry expired would otherwise store the
// value again for the default LocalTTL, outliving the caller's WithLocalTTL.
func TestAnOwnMessageArrivingAfterTheWritesEntryExpiredDoesNotStoreItAgain(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{LocalTTL: time.Hour})
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	msgs := subscribeRaw(t, rdb, c)
	if err := c.Set(ctx, "k", "v", WithLocalTTL(time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	own := nextMessage(t, msgs)
	waitUntil(t, invWait, "the write's entry to expire", func() bool {
		_, fromL1, _ := getWithSource(c, "k")
		return !fromL1
	})
	c.invalidated(own) // as if it came late
	flushL1Buffer(c)
	if v, fromL1, err := getWithSource(c, "k"); err != nil || v != "v" || fromL1 {
		t.Fatalf("Get(k) = %q, %v (from L1: %v) after the late own message; want v from Redis", v, err, fromL1)
	}
}
