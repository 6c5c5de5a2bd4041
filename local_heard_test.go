package tiered

import (
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
