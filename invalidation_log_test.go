package tiered

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"
)

// gapHealedBy drops b's subscription (through proxy), runs during while it
// is held down, lets it back and waits until it healed; it returns b's
// Stats then.
func gapHealedBy(t *testing.T, proxy *tcpProxy, b *Cache[string], during func()) Stats {
	t.Helper()
	gaps := b.Stats().SubscriptionGaps
	proxy.StallSubscribers()
	if n := proxy.KillSubscribers(); n != 1 {
		t.Fatalf("killed %d subscriber connections; want 1", n)
	}
	waitUntil(t, invWait, "b to notice the drop", func() bool { return b.Stats().SubscriptionGaps > gaps })
	during()
	proxy.Resume()
	waitUntil(t, invWait, "b's subscription to heal", b.sub.healthy)
	return b.Stats()
}

// logPosition returns c's position in its namespace's log.
func logPosition[V any](c *Cache[V]) logPos {
	c.sub.mu.Lock()
	defer c.sub.mu.Unlock()
	if cm := c.sub.channels[c.remote.channel]; cm != nil {
		return cm.pos
	}
	return logPos{}
}

// awaitLogPosition waits until c has read its position in the log (in the
// background, once its subscription is confirmed and healthy).
func awaitLogPosition[V any](t testing.TB, c *Cache[V]) {
	t.Helper()
	waitUntil(t, invWait, "a position in the invalidation log", func() bool { return logPosition(c).id != "" })
}

// primed returns a writer a and a reader b (behind proxy) of one namespace,
// b holding "held" in L1 and a position in the log.
func primed(t *testing.T) (proxy *tcpProxy, rdbA *redis.Client, a, b *Cache[string]) {
	t.Helper()
	ctx := context.Background()
	proxy, rdbA, rdbB := proxiedClients(t)
	a = newTestCache[string](t, rdbA, Options{})
	b = newTestCache[string](t, rdbB, Options{Namespace: a.opts.Namespace})
	if err := b.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Set(ctx, "held", "v"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)
	awaitLogPosition(t, b)
	mustGet(t, b, "held", "v")
	mustHoldInL1(t, b, "held", "v")
	return proxy, rdbA, a, b
}

func TestAGapWithNothingLostKeepsL1(t *testing.T) {
	proxy, _, _, b := primed(t)
	st := gapHealedBy(t, proxy, b, func() {})
	if st.GapsReplayed != 1 || st.GapsFlushed != 0 {
		t.Errorf("%d gaps replayed, %d flushed; want 1, 0", st.GapsReplayed, st.GapsFlushed)
	}
	mustHoldInL1(t, b, "held", "v")
}

// A write that was not logged (an instance with the log disabled, or of an
// older version) could have lost company in a gap, which no replay would
// find: having seen one, the next gap flushes.
func TestAnUnloggedWriteMakesTheNextGapFlush(t *testing.T) {
	proxy, rdbA, a, b := primed(t)
	unlogged := newTestCache[string](t, rdbA, Options{Namespace: a.opts.Namespace, InvalidationLog: -1})
	if err := unlogged.Set(context.Background(), "other", "v"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 2)
	st := gapHealedBy(t, proxy, b, func() {})
	if st.GapsReplayed != 0 || st.GapsFlushed != 1 {
		t.Errorf("%d gaps replayed, %d flushed; want 0, 1", st.GapsReplayed, st.GapsFlushed)
	}
	if _, src, _ := b.GetFrom(context.Background(), "held"); src == SourceLocal {
		t.Error("an entry filled before the gap is served after a flush heal")
	}
}

// Redis answering again after failing flushes L1 (values loaded meanwhile
// must go); during a gap, that makes the heal a flush rather than a
// restore of the epoch before the gap.
func TestAFlushDuringAGapMakesItsHealFlush(t *testing.T) {
	proxy, _, _, b := primed(t)
	st := gapHealedBy(t, proxy, b, func() { b.sub.flush("test") })
	if st.GapsReplayed != 0 || st.GapsFlushed != 1 {
		t.Errorf("%d gaps replayed, %d flushed; want 0, 1", st.GapsReplayed, st.GapsFlushed)
	}
	if _, src, _ := b.GetFrom(context.Background(), "held"); src == SourceLocal {
		t.Error("an entry filled before the gap is served after a heal that had to flush")
	}
}

// Epochs never repeat but for a replay's restore: an entry stored under
// one gap's odd epoch (an outage fill) is not servable in the next gap.
func TestOddEpochsNeverRepeat(t *testing.T) {
	proxy, _, _, b := primed(t)
	seen := map[uint64]bool{}
	for range 3 {
		var odd uint64
		gapHealedBy(t, proxy, b, func() { odd = b.sub.epoch.Load() })
		if odd&1 != 1 || seen[odd] {
			t.Fatalf("gap epoch %d: odd and new expected (seen %v)", odd, seen)
		}
		seen[odd] = true
	}
}

// Writes coalesced into one batch script during a gap are logged like
// single writes: the replay applies every key of the batch, carried values
// included, and L1 keeps what the batch did not touch.
func TestABatchWrittenDuringAGapIsReplayed(t *testing.T) {
	ctx := context.Background()
	proxy, rdbA, a, b := primed(t)
	gate := newWriteGate(rdbA, ":gate")
	for _, k := range []string{"small", "big", "gone"} {
		if err := a.Set(ctx, k, "old"); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, invWait, "b to hold "+k, func() bool {
			_, _ = b.Get(ctx, k)
			_, fromL1, _ := getWithSource(b, k)
			return fromL1
		})
	}
	big := strings.Repeat("x", b.opts.PublishValueMaxBytes+1)
	batches := a.Stats().WriteBatches
	st := gapHealedBy(t, proxy, b, func() {
		errs := batchOf(t, a, gate, func() error { return a.Set(ctx, "gate", "x") },
			func() error { return a.Set(ctx, "small", "new") },
			func() error { return a.Set(ctx, "big", big) },
			func() error { return a.Delete(ctx, "gone") })
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if a.Stats().WriteBatches == batches {
			t.Fatal("the writes were not coalesced into a batch")
		}
	})
	if st.GapsReplayed != 1 || st.GapsFlushed != 0 {
		t.Fatalf("%d gaps replayed, %d flushed; want 1, 0", st.GapsReplayed, st.GapsFlushed)
	}
	mustGet(t, b, "small", "new")
	mustGet(t, b, "big", big)
	if _, err := b.Get(ctx, "gone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(gone) after a replayed Delete: %v; want ErrNotFound", err)
	}
	mustHoldInL1(t, b, "held", "v")
}
