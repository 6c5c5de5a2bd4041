package tiered

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"
)

// inRistretto reports whether ristretto itself (not the fill buffer) holds
// an entry for key, once it has applied every Set handed to it.
func inRistretto[V any](c *Cache[V], key string) bool {
	c.local.store.Wait()
	_, ok := c.local.store.Get(c.local.hash(key))
	return ok
}

func TestAFillIsServedFromL1BeforeRistrettoHasIt(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c, _ := newCoreCacheClock[string](t, rdb, Options{}, time.Now())
	if _, err := c.GetOrLoad(ctx, "k", coreLoadString("v")); err != nil {
		t.Fatal(err)
	}
	if inRistretto(c, "k") {
		t.Fatal("the fill went to ristretto at once; want it buffered")
	}
	hits := c.Stats().LocalHits
	got, err := c.GetOrLoad(ctx, "k", coreMustNotLoad[string](t))
	coreWant(t, "GetOrLoad of a buffered fill", got, err, "v")
	if c.Stats().LocalHits != hits+1 {
		t.Error("a buffered fill was not an L1 hit")
	}
}

func TestFillsReachRistrettoOnTheFirstCallAfterFillDelay(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	start := time.Now()
	c, clk := newCoreCacheClock[string](t, rdb, Options{}, start)
	if _, err := c.GetOrLoad(ctx, "k", coreLoadString("v")); err != nil {
		t.Fatal(err)
	}
	clk.set(start.Add(time.Duration(fillDelay) - time.Nanosecond))
	_, _ = c.Get(ctx, "other") // a miss looks into the buffer, which is not due yet
	if inRistretto(c, "k") {
		t.Fatal("the fill reached ristretto before fillDelay")
	}
	clk.set(start.Add(time.Duration(fillDelay)))
	_, _ = c.Get(ctx, "other")
	if !inRistretto(c, "k") {
		t.Fatal("the fill did not reach ristretto on the first call after fillDelay")
	}
	// It stays served after the next batch replaces the one it was in.
	if _, err := c.GetOrLoad(ctx, "k2", coreLoadString("v2")); err != nil {
		t.Fatal(err)
	}
	clk.set(start.Add(2 * time.Duration(fillDelay)))
	_, _ = c.Get(ctx, "other")
	got, err := c.GetOrLoad(ctx, "k", coreMustNotLoad[string](t))
	coreWant(t, "GetOrLoad after two hand-overs", got, err, "v")
}

// The clock's goroutine, awake every millisecond anyway, hands over due
// fills: no caller has to come by for them to reach ristretto.
func TestTheClockHandsDueFillsToRistretto(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	if _, err := c.GetOrLoad(ctx, "k", coreLoadString("v")); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "the fill to reach ristretto", func() bool { return inRistretto(c, "k") })
}

func TestAFullBatchOfFillsReachesRistrettoAtOnce(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c, _ := newCoreCacheClock[string](t, rdb, Options{}, time.Now())
	for i := range fillBatch - 1 {
		if _, err := c.GetOrLoad(ctx, "k"+strconv.Itoa(i), coreLoadString("v")); err != nil {
			t.Fatal(err)
		}
	}
	if inRistretto(c, "k0") {
		t.Fatalf("fills reached ristretto before %d of them gathered", fillBatch)
	}
	if _, err := c.GetOrLoad(ctx, "last", coreLoadString("v")); err != nil {
		t.Fatal(err)
	}
	for i := range fillBatch - 1 {
		if k := "k" + strconv.Itoa(i); !inRistretto(c, k) {
			t.Fatalf("%s is not in ristretto after a full batch", k)
		}
	}
}

func TestPendingFillsCostAtMostASixteenthOfLocalMaxBytes(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	const maxBytes = 64 << 10
	c, _ := newCoreCacheClock[string](t, rdb, Options{LocalMaxBytes: maxBytes}, time.Now())
	value := strings.Repeat("x", 1000)
	for i := range 20 {
		if _, err := c.GetOrLoad(ctx, "k"+strconv.Itoa(i), coreLoadString(value)); err != nil {
			t.Fatal(err)
		}
		c.local.fills.mu.Lock()
		pending := c.local.fills.bytes
		c.local.fills.mu.Unlock()
		if pending >= maxBytes/16 {
			t.Fatalf("after %d fills %d bytes wait for ristretto; want under %d", i+1, pending, maxBytes/16)
		}
	}
	if !inRistretto(c, "k0") {
		t.Error("the first fills never reached ristretto")
	}
}

func TestAFillPendingAtDeleteIsNeitherServedNorHandedOver(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c, clk := newCoreCacheClock[string](t, rdb, Options{}, time.Now())
	if _, err := c.GetOrLoad(ctx, "k", coreLoadString("v")); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after Delete: %v, want ErrNotFound", err)
	}
	// Nor does the dropped fill reach ristretto later.
	clk.set(time.Now().Add(time.Hour))
	_, _ = c.Get(ctx, "other")
	if inRistretto(c, "k") {
		t.Error("a fill made before Delete reached ristretto after it")
	}
}

func TestAFillInvalidatedWhilePendingIsNotHandedToRistretto(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	c, clk := newCoreCacheClock[string](t, rdb, Options{}, time.Now())
	w := newCoreCache[string](t, coreOtherClient(t, mr), Options{Namespace: c.opts.Namespace})
	if _, err := c.GetOrLoad(ctx, "k", coreLoadString("old")); err != nil {
		t.Fatal(err)
	}
	if err := w.Set(ctx, "k", "new"); err != nil {
		t.Fatal(err)
	}
	coreWaitInvalidations(t, c, 1)
	// Past the fill's delay, not past the value's expiry in Redis (read as
	// expired, it would be a miss: see fetchStale).
	clk.set(time.Now().Add(time.Minute))
	got, err := c.Get(ctx, "k") // hands the batch over, then reads Redis
	coreWant(t, "Get after another instance's Set", got, err, "new")
	c.local.store.Wait()
	if e, ok := c.local.store.Get(c.local.hash("k")); ok && e.value == "old" {
		t.Error("the invalidated fill was handed to ristretto")
	}
}
