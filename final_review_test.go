package tiered

// Tests of the merge of group commit, the invalidation log and L1's own
// eviction: batches whose messages a subscription gap loses are replayed
// from the log, and after the heal the reader serves exactly what Redis
// holds.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/redis/go-redis/v9"
)

// stepGate holds every write script that names marker until it is let go
// (step), so that the writes that arrive meanwhile queue up and go as the
// next batch, which, naming marker too, the gate holds in turn.
type stepGate struct {
	marker  string
	reached chan struct{}
	release chan struct{}
}

func newStepGate(rdb *redis.Client, marker string) *stepGate {
	g := &stepGate{marker: marker, reached: make(chan struct{}), release: make(chan struct{})}
	rdb.AddHook(processHook{process: func(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
		if isScript(cmd) && cmdHas(cmd, g.marker) {
			g.reached <- struct{}{}
			<-g.release
		}
		return next(ctx, cmd)
	}})
	return g
}

// gapPair returns a writer a on Redis directly and a reader b (options
// bOpts) behind proxy, in one namespace, b with a position in the log.
func gapPair(t *testing.T, bOpts Options) (proxy *tcpProxy, rdbA *redis.Client, a, b *Cache[string]) {
	t.Helper()
	mr, _ := newMiniredis(t)
	return gapPairOn(t, mr.Addr(), bOpts)
}

// gapPairOn is gapPair on the Redis at addr.
func gapPairOn(t *testing.T, addr string, bOpts Options) (proxy *tcpProxy, rdbA *redis.Client, a, b *Cache[string]) {
	t.Helper()
	proxy = startProxy(t, addr)
	rdbA = redis.NewClient(&redis.Options{Addr: addr})
	rdbB := redis.NewClient(&redis.Options{Addr: proxy.Addr})
	t.Cleanup(func() { _ = rdbA.Close(); _ = rdbB.Close() })
	a = newTestCache[string](t, rdbA, Options{})
	bOpts.Namespace = a.opts.Namespace
	b = newTestCache[string](t, rdbB, bOpts)
	if err := a.Set(context.Background(), "held", "v"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)
	awaitLogPosition(t, b)
	return proxy, rdbA, a, b
}

// truth returns what Redis holds for key ("" for nothing), read by a
// fresh instance with nothing in L1.
func truth(t *testing.T, c *Cache[string], key string) string {
	t.Helper()
	v, src, err := c.GetFrom(context.Background(), key)
	switch {
	case errors.Is(err, ErrNotFound):
		return ""
	case err != nil:
		t.Fatal(err)
	case src == SourceLocal:
		t.Fatalf("the fresh instance served %s from L1", key)
	}
	return v
}

// servesWhatRedisHolds checks that b serves, for every key, what Redis
// holds, read through a fresh instance on rdb.
func servesWhatRedisHolds(t *testing.T, rdb *redis.Client, b *Cache[string], keys ...string) {
	t.Helper()
	fresh := newTestCache[string](t, rdb, Options{Namespace: b.opts.Namespace, LocalMaxBytes: 1})
	for _, k := range keys {
		want := truth(t, fresh, k)
		for range 2 { // the miss, then the hit it filled
			got, err := b.Get(context.Background(), k)
			if errors.Is(err, ErrNotFound) {
				got, err = "", nil
			}
			if err != nil || got != want {
				t.Fatalf("b.Get(%q) = %q, %v; Redis holds %q", k, got, err, want)
			}
			flushL1Buffer(b)
		}
	}
}

func TestABatchLostInAGapIsReplayedAndEveryKeyServesWhatRedisHoldsWhileUntouchedKeysStayInL1(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  Options
		keeps bool // b's L1 is big enough to keep "held" throughout
		real  bool // on a private redis-server, not miniredis
	}{
		{"roomy L1", Options{}, true, false},
		{"L1 full and evicting", Options{LocalMaxBytes: 2 << 10}, false, false},
		{"roomy L1 on redis-server", Options{}, true, true},
		{"L1 full and evicting on redis-server", Options{LocalMaxBytes: 2 << 10}, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			var proxy *tcpProxy
			var rdbA *redis.Client
			var a, b *Cache[string]
			if tc.real {
				proxy, rdbA, a, b = gapPairOn(t, startRedisServer(t).Addr, tc.opts)
			} else {
				proxy, rdbA, a, b = gapPair(t, tc.opts)
			}
			big := strings.Repeat("B", a.opts.PublishValueMaxBytes+1)
			// Three of these cut the batch into scripts. (Which of the
			// Delete and the Set of huge2 Redis runs last is not fixed:
			// the calls are concurrent, and a pipeline's scripts Redis did
			// not have are sent again after those it ran.)
			huge := strings.Repeat("H", maxBatchBytes/2)
			keys := []string{"carried", "big", "del1", "del2", "twice", "setdel", "huge1", "huge2", "huge3"}
			for _, k := range keys {
				if err := a.Set(ctx, k, "old-"+k); err != nil {
					t.Fatal(err)
				}
			}
			awaitReceived(t, b, uint64(1+len(keys)))
			for _, k := range append(keys, "held") {
				mustGet(t, b, k, map[bool]string{true: "v", false: "old-" + k}[k == "held"])
			}
			if tc.keeps {
				for _, k := range append(keys, "held") {
					mustHoldInL1(t, b, k, map[bool]string{true: "v", false: "old-" + k}[k == "held"])
				}
			}
			g := newWriteGate(rdbA, "gatekey")
			st := gapHealedBy(t, proxy, b, func() {
				errs := batchOf(t, a, g, func() error { return a.Set(ctx, "gatekey", "g") },
					func() error { return a.Set(ctx, "carried", "new-carried") },
					func() error { return a.Set(ctx, "big", big) },
					func() error { return a.Delete(ctx, "del1", "del2") },
					func() error { return a.Set(ctx, "twice", "first") },
					func() error { return a.Set(ctx, "twice", "second") },
					func() error { return a.Set(ctx, "setdel", "gone soon") },
					func() error { return a.Delete(ctx, "setdel") },
					func() error { return a.Set(ctx, "huge1", huge+"1") },
					func() error { return a.Delete(ctx, "huge2", "carried") },
					func() error { return a.Set(ctx, "huge3", huge+"3") },
					func() error { return a.Set(ctx, "huge2", huge+"2") },
				)
				for i, err := range errs {
					if err != nil {
						t.Fatalf("write %d: %v", i, err)
					}
				}
			})
			if st.GapsReplayed != 1 || st.GapsFlushed != 0 {
				t.Fatalf("%d gaps replayed, %d flushed; want 1, 0", st.GapsReplayed, st.GapsFlushed)
			}
			servesWhatRedisHolds(t, rdbA, b, append(keys, "gatekey", "held")...)
			if got, _ := b.Get(ctx, "big"); got != big {
				t.Fatalf("big: %d bytes; want %d", len(got), len(big))
			}
			if got, _ := b.Get(ctx, "huge3"); got != huge+"3" {
				t.Fatalf("huge3: %d bytes; want %d", len(got), len(huge)+1)
			}
			if tc.keeps {
				mustHoldInL1(t, b, "held", "v")
			}
		})
	}
}

// After a logged batch message moved b's position, a gap loses more
// batches: the replay starts from the batch's entry (its identity is the
// batch's origin and first version) and b ends with what Redis holds.
func TestAPositionAdvancedByALoggedBatchReplaysTheNextGap(t *testing.T) {
	ctx := context.Background()
	proxy, rdbA, a, b := gapPair(t, Options{})
	before := logPosition(b)
	g1 := newWriteGate(rdbA, "gate1")
	received := b.Stats().InvalidationsReceived
	batchOf(t, a, g1, func() error { return a.Set(ctx, "gate1", "g") },
		func() error { return a.Set(ctx, "x", "x1") },
		func() error { return a.Delete(ctx, "y", "z") },
	)
	awaitReceived(t, b, received+2)
	after := logPosition(b)
	if after.id == before.id || !streamIDLess(before.id, after.id) {
		t.Fatalf("position %q did not advance past %q through the batch", after.id, before.id)
	}
	if err := a.Set(ctx, "y", "y-old"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, received+3)
	mustGet(t, b, "x", "x1")
	mustGet(t, b, "y", "y-old")
	mustHoldInL1(t, b, "x", "x1")
	mustHoldInL1(t, b, "y", "y-old")
	flushL1Buffer(b) // in ristretto, not only in the fill buffer
	mustHoldInL1(t, b, "x", "x1")
	mustHoldInL1(t, b, "y", "y-old")
	g2 := newWriteGate(rdbA, "gate2")
	st := gapHealedBy(t, proxy, b, func() {
		batchOf(t, a, g2, func() error { return a.Set(ctx, "gate2", "g") },
			func() error { return a.Set(ctx, "x", "x2") },
			func() error { return a.Delete(ctx, "y") },
		)
	})
	if st.GapsReplayed != 1 || st.GapsFlushed != 0 {
		t.Fatalf("%d gaps replayed, %d flushed; want 1, 0", st.GapsReplayed, st.GapsFlushed)
	}
	servesWhatRedisHolds(t, rdbA, b, "x", "y", "z", "held")
	mustHoldInL1(t, b, "held", "v")
}

// More batches than a replay page during a gap: the pages end among batch
// entries, and every one is applied.
func TestMoreBatchesThanAReplayPageInAGapAreAllReplayed(t *testing.T) {
	forEachL1(t, func(t *testing.T, opts Options) {
		ctx := context.Background()
		proxy, rdbA, a, b := gapPair(t, opts)
		const nkeys = 16
		key := func(i int) string { return fmt.Sprintf("k%d", i%nkeys) }
		for i := range nkeys {
			if err := a.Set(ctx, key(i), "old"); err != nil {
				t.Fatal(err)
			}
		}
		awaitReceived(t, b, 1+nkeys)
		for i := range nkeys {
			mustGet(t, b, key(i), "old")
		}
		g := newStepGate(rdbA, "stepkey")
		batches := replayPage + replayPage/2
		st := gapHealedBy(t, proxy, b, func() {
			var wg sync.WaitGroup
			write := func(f func() error) {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if err := f(); err != nil {
						t.Error(err)
					}
				}()
			}
			write(func() error { return a.Set(ctx, "stepkey", "0") })
			<-g.reached // the first, alone
			for i := range batches {
				n := queued(a)
				write(func() error { return a.Set(ctx, "stepkey", fmt.Sprint(i)) })
				switch i % 3 {
				case 0:
					write(func() error { return a.Set(ctx, key(i), fmt.Sprint("v", i)) })
				case 1:
					write(func() error { return a.Delete(ctx, key(i), key(i+1)) })
				case 2:
					write(func() error { return a.Set(ctx, key(i), fmt.Sprint("w", i)) })
				}
				write(func() error { return a.Set(ctx, key(i+5), fmt.Sprint("u", i)) })
				waitUntil(t, invWait, "the batch to queue", func() bool { return queued(a) == n+3 })
				g.release <- struct{}{} // the batch before goes
				<-g.reached             // this one is held
			}
			g.release <- struct{}{}
			wg.Wait()
		})
		if st.GapsReplayed != 1 || st.GapsFlushed != 0 {
			t.Fatalf("%d gaps replayed, %d flushed; want 1, 0", st.GapsReplayed, st.GapsFlushed)
		}
		if st.EntriesReplayed < uint64(batches) {
			t.Fatalf("%d entries replayed; want at least %d", st.EntriesReplayed, batches)
		}
		keys := []string{"stepkey", "held"}
		for i := range nkeys {
			keys = append(keys, key(i))
		}
		servesWhatRedisHolds(t, rdbA, b, keys...)
	})
}

// A batch of an instance with the log disabled, lost in another's gap, is
// in no log (its script deleted the log): the heal must flush, and the
// old values must not be served.
func TestABatchFromAnInstanceWithoutTheLogLostInAGapMakesTheHealFlush(t *testing.T) {
	forEachL1(t, func(t *testing.T, opts Options) {
		ctx := context.Background()
		proxy, rdbA, a, b := gapPair(t, opts)
		rdbU := redis.NewClient(&redis.Options{Addr: rdbA.Options().Addr})
		t.Cleanup(func() { _ = rdbU.Close() })
		u := newTestCache[string](t, rdbU, Options{Namespace: a.opts.Namespace, InvalidationLog: -1})
		for _, k := range []string{"p", "q", "r"} {
			if err := a.Set(ctx, k, "old"); err != nil {
				t.Fatal(err)
			}
		}
		awaitReceived(t, b, 4)
		for _, k := range []string{"p", "q", "r"} {
			mustGet(t, b, k, "old")
		}
		if opts.LocalMaxBytes == 0 {
			mustHoldInL1(t, b, "p", "old")
			mustHoldInL1(t, b, "q", "old")
		}
		g := newWriteGate(rdbU, "ugate")
		st := gapHealedBy(t, proxy, b, func() {
			batchOf(t, u, g, func() error { return u.Set(ctx, "ugate", "g") },
				func() error { return u.Set(ctx, "p", "new") },
				func() error { return u.Delete(ctx, "q", "r") },
			)
			// and a logged write after it, which re-creates the log
			if err := a.Set(ctx, "s", "logged"); err != nil {
				t.Fatal(err)
			}
		})
		if st.GapsFlushed != 1 || st.GapsReplayed != 0 {
			t.Fatalf("%d gaps flushed, %d replayed; want 1, 0", st.GapsFlushed, st.GapsReplayed)
		}
		servesWhatRedisHolds(t, rdbA, b, "p", "q", "r", "s", "held")
	})
}

// forEachL1 runs test with a roomy L1 and with an L1 so small that it is
// full and evicting all the time.
func forEachL1(t *testing.T, test func(t *testing.T, opts Options)) {
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"roomy L1", Options{}},
		{"L1 full and evicting", Options{LocalMaxBytes: 2 << 10}},
	} {
		t.Run(tc.name, func(t *testing.T) { test(t, tc.opts) })
	}
}
