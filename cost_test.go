package tiered

import (
	"context"
	"fmt"
	"math"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// liveHeap returns the bytes of live heap after a full collection.
func liveHeap() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// fillL1 fills c's L1 with v under key as a read of Redis would (keep),
// without Redis holding anything in this process' heap.
func fillL1[V any](t *testing.T, c *Cache[V], key string, v V) {
	t.Helper()
	_, d, err := c.codec.roundTrip(v)
	if err != nil {
		t.Fatal(err)
	}
	c.keep(key, c.local.begin(key), d, false, 0, time.Hour, math.MaxInt64, 0, false)
}

// settleL1 hands every pending fill to ristretto and lets go of the batch
// handed over last, as the clock does within two ticks.
func settleL1[V any](c *Cache[V]) {
	far := c.clock.now() + 10*fillDelay
	if batch := c.local.fills.take(far); batch != nil {
		c.local.hand(batch)
	}
	c.local.store.Wait()
	c.local.fills.take(far + fillDelay)
}

type costRow struct {
	ID    int64             `json:"id"`
	Name  string            `json:"name"`
	Email string            `json:"email"`
	Tags  []string          `json:"tags"`
	Nums  []int             `json:"nums"`
	Attrs map[string]string `json:"attrs"`
}

// heapShape fills an L1 with values of one shape and returns the growth
// of the live heap, the number of entries L1 kept and what one is charged.
type heapShape struct {
	name string
	fill func(t *testing.T, maxBytes int64, n int) (grown int64, kept int, charged int64)
}

func shapeOf[V any](name string, value func(i int) V) heapShape {
	return heapShape{name: name, fill: func(t *testing.T, maxBytes int64, n int) (int64, int, int64) {
		_, rdb := newMiniredis(t)
		c := newCoreCache[V](t, rdb, Options{LocalMaxBytes: maxBytes})
		before := liveHeap()
		for i := range n {
			fillL1(t, c, "k"+strconv.Itoa(i), value(i))
		}
		settleL1(c)
		grown := liveHeap() - before
		kept := 0
		for i := range n {
			if _, ok := c.local.store.Get(c.local.hash("k" + strconv.Itoa(i))); ok {
				kept++
			}
		}
		runtime.KeepAlive(c)
		_, d, _ := c.codec.roundTrip(value(0))
		charged, _ := entryCost(d, nil)
		return grown, kept, charged
	}}
}

func heapShapes() []heapShape {
	return []heapShape{
		shapeOf("string-200", func(i int) string { return fmt.Sprintf("%0200d", i) }),
		shapeOf("string-20", func(i int) string { return fmt.Sprintf("%020d", i) }),
		shapeOf("[]byte-1000", func(i int) []byte { return []byte(fmt.Sprintf("%01000d", i)) }),
		shapeOf("[]int-1000", func(i int) []int {
			v := make([]int, 1000)
			for j := range v {
				v[j] = (i + j) % 100
			}
			return v
		}),
		shapeOf("*struct", func(i int) *costRow {
			return &costRow{ID: int64(i), Name: "User Number " + strconv.Itoa(i),
				Email: "user." + strconv.Itoa(i) + "@example.com", Tags: []string{"beta", "newsletter", "mobile"},
				Nums: []int{i, i + 1, i + 2, i + 3}}
		}),
		shapeOf("struct", func(i int) costRow {
			return costRow{ID: int64(i), Name: "User Number " + strconv.Itoa(i), Tags: []string{"a", "b"}}
		}),
		shapeOf("map[string]string-20", func(i int) map[string]string {
			m := make(map[string]string, 20)
			for j := range 20 {
				m["field-"+strconv.Itoa(j)] = "value-" + strconv.Itoa(i+j)
			}
			return m
		}),
		shapeOf("map[string]any-10", func(i int) map[string]any {
			return map[string]any{"id": i, "name": "n" + strconv.Itoa(i), "ok": true, "tags": []any{"x", "y"},
				"a": 1.5, "b": "bb", "c": nil, "d": map[string]any{"e": 1}, "f": "ff", "g": 2}
		}),
	}
}

// LocalMaxBytes is a bound on memory, not on encoded bytes: after more
// fills than L1 can hold, the live heap grew by at most 1.125 ×
// LocalMaxBytes + 2 MiB, whatever the values' shape. (Before entries were
// charged their decoded size, 20,000 []int of 1,000 small numbers grew it
// by 3.9 × LocalMaxBytes.)
func TestLocalMaxBytesBoundsTheLiveHeap(t *testing.T) {
	const maxBytes = 8 << 20
	for _, s := range heapShapes() {
		t.Run(s.name, func(t *testing.T) {
			grown, kept, charged := s.fill(t, maxBytes, 40000)
			t.Logf("%s: live heap grew %.2f MiB (%.3f × LocalMaxBytes), %d entries kept, %d bytes each, charged %d",
				s.name, float64(grown)/(1<<20), float64(grown)/maxBytes, kept, grown/int64(max(kept, 1)), charged)
			if limit := int64(1.125*maxBytes) + 2<<20; grown > limit {
				t.Errorf("live heap grew %d bytes, over 1.125 × LocalMaxBytes + 2 MiB = %d", grown, limit)
			}
			if kept == 0 {
				t.Error("L1 kept nothing")
			}
		})
	}
}

// A fill ristretto rejects is not kept alive by the fill buffer once it
// was handed over: with 6 MiB values in an 8 MiB L1, the heap grows by
// one value, not two (the batch handed over last used to keep it).
func TestARejectedFillDoesNotOutliveItsHandOver(t *testing.T) {
	const maxBytes = 8 << 20
	_, rdb := newMiniredis(t)
	c := newCoreCache[[]byte](t, rdb, Options{LocalMaxBytes: maxBytes})
	before := liveHeap()
	fillL1(t, c, "hot", []byte(strings.Repeat("x", 6<<20)))
	settleL1(c)
	for range 10000 { // a hit moves it to the policy's main queue, the newcomer's is the small one
		if _, ok := c.local.get("hot"); !ok {
			t.Fatal("the first value is not in L1")
		}
	}
	c.local.store.Wait()
	fillL1(t, c, "cold", []byte(strings.Repeat("y", 6<<20)))
	settleL1(c)
	if _, held := c.local.fills.lookup(c.local.hash("cold")); held {
		t.Error("the fill buffer still holds the second value after its hand-over")
	}
	grown := liveHeap() - before
	// The policy evicts the second value: it was not hit in the small queue.
	t.Logf("live heap grew %.2f MiB; L1 kept the second value: %v", float64(grown)/(1<<20), inRistretto(c, "cold"))
	if limit := int64(1.125*maxBytes) + 2<<20; grown > limit {
		t.Errorf("live heap grew %d bytes, over 1.125 × LocalMaxBytes + 2 MiB = %d", grown, limit)
	}
	runtime.KeepAlive(c)
}

func TestOptionsCostReplacesTheEstimate(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{LocalMaxBytes: 4 << 20,
		Cost: func(v any) int64 { return int64(len(v.(string))) << 20 }})
	if err := c.Set(ctx, "small", "x"); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.local.get("small"); !ok {
		t.Error("a value Cost charges 1 MiB is not in a 4 MiB L1")
	}
	if err := c.Set(ctx, "big", "xxxx"); err != nil {
		t.Fatal(err)
	}
	if s := c.Stats(); s.LocalTooLarge != 1 {
		t.Errorf("LocalTooLarge = %d after a value Cost charges 4 MiB in a 4 MiB L1, want 1", s.LocalTooLarge)
	}
}

func TestACostThatPanicsFallsBackToTheEstimate(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{Cost: func(any) int64 { panic("boom") }})
	if err := c.Set(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	got, err := c.Get(ctx, "k")
	coreWant(t, "Get", got, err, "v")
	if _, ok := c.local.get("k"); !ok {
		t.Error("the value is not in L1")
	}
}

type costNode struct {
	Next  *costNode
	Label string
}

// The estimate visits a pointer once and follows at most costPointers:
// cycles and long chains cost a bounded walk.
func TestTheEstimateIsBoundedOnCyclesAndLongChains(t *testing.T) {
	ring := &costNode{Label: "a"}
	ring.Next = &costNode{Next: ring, Label: "b"}
	if n, _ := entryCost(ring, nil); n <= 0 || n > 4096 {
		t.Errorf("a two-node ring costs %d, want a small positive number", n)
	}
	var chain *costNode
	for range 100000 {
		chain = &costNode{Next: chain, Label: "node"}
	}
	n, _ := entryCost(chain, nil)
	t.Logf("a chain of 100,000 nodes is charged %d bytes (the walk follows %d pointers)", n, costPointers)
	if n < costPointers*32 || n > costPointers*64 {
		t.Errorf("cost %d, want what %d nodes of 16 + 16 bytes hold", n, costPointers)
	}
}

// The estimate, for shapes whose size is known: a string or []byte is its
// bytes rounded to Go's size class, a []int its backing array, plus the
// entry's fixed part.
func TestTheEstimateOfKnownShapes(t *testing.T) {
	for name, c := range map[string]struct{ got, want int64 }{
		"string of 200":  {costOf("x" + strings.Repeat("y", 199)), 208},
		"[]byte of 1000": {costOf(make([]byte, 1000)), 1024},
		"[]int of 1000":  {costOf(make([]int, 1000)), 8192},
		"empty string":   {costOf(""), 0},
		"int":            {costOf(42), 0},
	} {
		if c.got != c.want {
			t.Errorf("%s: estimated %d bytes beyond the entry, want %d", name, c.got, c.want)
		}
	}
}

// costOf returns what entryCost charges for v beyond the entry's fixed part.
func costOf[V any](v V) int64 {
	n, _ := entryCost(v, nil)
	var zero V
	base, _ := entryCost(zero, nil)
	return n - base
}

// An empty Cache holds at most 5% of its LocalMaxBytes (ristretto's
// counters and buffers, the generation tables) from the default 64 MiB up,
// and below that 5% plus a fixed floor of 512 KiB: ristretto's Set buffer
// alone is 256 KiB, whatever the budget.
func TestAnEmptyCacheHoldsAtMostFivePercentOfItsBudget(t *testing.T) {
	_, rdb := newMiniredis(t)
	// A connection of the client's pool (which the subscriber's reads of
	// the invalidation log use) is the client's, not the Cache's.
	pipe := rdb.Pipeline()
	pipe.Info(context.Background(), "server")
	pipe.XRevRangeN(context.Background(), "tiered:log:warm", "+", "-", 1)
	_, _ = pipe.Exec(context.Background())
	for _, maxBytes := range []int64{1 << 20, 8 << 20, 64 << 20, 256 << 20} {
		// The least of three tries: what other tests' goroutines still
		// allocate meanwhile (closing caches, a busy machine) is counted in
		// one try or another, what the Cache holds in every one.
		held := int64(math.MaxInt64)
		for range 3 {
			before := liveHeap()
			c := newCoreCache[string](t, rdb, Options{LocalMaxBytes: maxBytes})
			held = min(held, liveHeap()-before)
			runtime.KeepAlive(c)
			_ = c.Close()
		}
		t.Logf("LocalMaxBytes %4d MiB: an empty Cache holds %.2f MiB (%.1f%%)",
			maxBytes>>20, float64(held)/(1<<20), 100*float64(held)/float64(maxBytes))
		limit := maxBytes / 20
		if maxBytes < defaultLocalMaxBytes {
			limit += 512 << 10
		}
		if held > limit {
			t.Errorf("LocalMaxBytes %d: an empty Cache holds %d bytes, want at most %d", maxBytes, held, limit)
		}
	}
}
