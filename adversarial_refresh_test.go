package tiered_test

// Adversarial review of refresh-ahead (Options.RefreshAfter) and
// stale-if-error (Options.StaleIfError): black-box tests through the public
// API. Values are planted in Redis as raw envelopes (the layout of
// envelope.go) with a version far in the past, so that the first GetOrLoad
// is past its refresh point whatever the draw: no test waits for a value to
// age.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/tieredcache/tiered"
)

// rawEnvelope returns an envelope of format 2 (18-byte header) or 3
// (26-byte header, refresh lease zero) of kind 0 (a value) holding payload
// (the string codec stores strings as they are).
func rawEnvelope(format byte, version uint64, expires time.Time, payload string) []byte {
	header := 26
	if format == 2 {
		header = 18
	}
	b := make([]byte, header, header+len(payload))
	b[0], b[1] = format, 0
	binary.BigEndian.PutUint64(b[2:], version)
	binary.BigEndian.PutUint64(b[10:], uint64(expires.UnixMilli()))
	return append(b, payload...)
}

// oldVersion is the version of a value written an hour ago (Redis' clock
// in µs then): past the refresh point of every RefreshAfter used here.
func oldVersion() uint64 { return uint64(time.Now().Add(-time.Hour).UnixMicro()) }

// plant stores a raw envelope under ns:key for ttl.
func plant(t testing.TB, rdb redis.Cmdable, ns, key string, env []byte, ttl time.Duration) {
	t.Helper()
	if err := rdb.Set(context.Background(), ns+":"+key, env, ttl).Err(); err != nil {
		t.Fatalf("SET %s:%s: %v", ns, key, err)
	}
}

// rawValue returns what Redis holds under ns:key, and whether it holds it.
func rawValue(t testing.TB, rdb redis.Cmdable, ns, key string) ([]byte, bool) {
	t.Helper()
	b, err := rdb.Get(context.Background(), ns+":"+key).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, false
	}
	if err != nil {
		t.Fatalf("GET %s:%s: %v", ns, key, err)
	}
	return b, true
}

// newCache returns a Cache that need not keep anything in L1 (advCache
// awaits an L1 hit), once its subscription is confirmed.
func newCache(t testing.TB, rdb redis.UniversalClient, ns string, o tiered.Options) *tiered.Cache[string] {
	t.Helper()
	o.Redis, o.Namespace = rdb, ns
	c, err := tiered.New[string](o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.WaitReady(ctx); err != nil {
		t.Fatalf("WaitReady: %v", err)
	}
	return c
}

// awaitStats waits until cond holds for c's Stats.
func awaitStats(t testing.TB, c *tiered.Cache[string], what string, cond func(tiered.Stats) bool) {
	t.Helper()
	awaitCond(t, 10*time.Second, what, func() bool { return cond(c.Stats()) })
}

// TestAdversarialRefreshAHungRefreshIsNotRetriedBeforeRefreshAfterTenth:
// the refresh's loader hangs, ignoring its context (a stuck database
// call). At LoadTimeout the refresh has failed; the issue allows the next
// attempt on this instance no earlier than RefreshAfter/10 later. Reads
// go to Redis each time (L1 holds nothing: LocalMaxBytes 1), so every
// GetOrLoad is a refresh decision.
func TestAdversarialRefreshAHungRefreshIsNotRetriedBeforeRefreshAfterTenth(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMini(t)
	ns := advNamespace(t)
	const loadTimeout = 20 * time.Millisecond
	c := newCache(t, rdb, ns, tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 2 * time.Hour,
		LoadTimeout: loadTimeout, LocalMaxBytes: 1})
	plant(t, rdb, ns, "k", rawEnvelope(3, oldVersion(), time.Now().Add(time.Hour), "v1"), time.Hour)

	g := newGatedLoader(t, constant("refreshed"))
	g.block = func(int32) bool { return true } // every call hangs until the test ends
	start := time.Now()
	if v, err := c.GetOrLoad(ctx, "k", g.load); err != nil || v != "v1" {
		t.Fatalf("GetOrLoad = %s; want v1 at once", describe(v, err))
	}
	g.awaitStart(t)
	// Read for 25 × LoadTimeout, far below RefreshAfter/10 (6 min).
	for time.Since(start) < 25*loadTimeout {
		if v, err := c.GetOrLoad(ctx, "k", g.load); err != nil || v != "v1" {
			t.Fatalf("GetOrLoad during the hung refresh = %s; want v1", describe(v, err))
		}
		time.Sleep(time.Millisecond) // pacing the reads, not synchronising
	}
	if n := g.calls.Load(); n != 1 {
		t.Errorf("the refresh loader was called %d times within %v of a refresh that hung past LoadTimeout (%v); want 1: no retry before RefreshAfter/10 (%v)",
			n, 25*loadTimeout, loadTimeout, time.Hour/10)
	}
}

// TestAdversarialRefreshAFailedRefreshIsNotRetriedBeforeRefreshAfterTenth:
// the same for a loader that returns an error, or panics: the value stays,
// and reads that go to Redis start no second refresh.
func TestAdversarialRefreshAFailedRefreshIsNotRetriedBeforeRefreshAfterTenth(t *testing.T) {
	for _, tc := range []struct {
		name string
		fail func() (string, error)
	}{
		{"error", func() (string, error) { return "", errors.New("database down") }},
		{"panic", func() (string, error) { panic("loader bug") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			_, rdb := newMini(t)
			ns := advNamespace(t)
			c := newCache(t, rdb, ns, tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 2 * time.Hour, LocalMaxBytes: 1})
			plant(t, rdb, ns, "k", rawEnvelope(3, oldVersion(), time.Now().Add(time.Hour), "v1"), time.Hour)
			var calls atomic.Int32
			load := func(context.Context, string) (string, error) { calls.Add(1); return tc.fail() }
			if v, err := c.GetOrLoad(ctx, "k", load); err != nil || v != "v1" {
				t.Fatalf("GetOrLoad = %s; want v1", describe(v, err))
			}
			awaitStats(t, c, "the refresh to fail", func(s tiered.Stats) bool { return s.RefreshesFailed == 1 })
			for i := 0; i < 50; i++ {
				if v, err := c.GetOrLoad(ctx, "k", load); err != nil || v != "v1" {
					t.Fatalf("GetOrLoad after the failed refresh = %s; want v1 (the value stays)", describe(v, err))
				}
			}
			if n := calls.Load(); n != 1 {
				t.Errorf("loader called %d times; want 1 (no retry before RefreshAfter/10)", n)
			}
			if b, ok := rawValue(t, rdb, ns, "k"); !ok || string(b[26:]) != "v1" || binary.BigEndian.Uint64(b[18:26]) != 0 {
				t.Errorf("redis holds %q (present %v); want v1 with its refresh lease released", b, ok)
			}
		})
	}
}

// TestAdversarialRefreshAFormat2ValuePastItsExpiryIsReplacedOnce: during a
// rolling upgrade, an old instance wrote a format 2 value; this instance's
// clock runs ahead of the writer's, so it reads the value as expired while
// Redis still keeps it. A GetOrLoad loads it; the load must replace it in
// Redis (and L1), not be fenced off forever: else every GetOrLoad of the
// key loads from the database until Redis expires the old value.
func TestAdversarialRefreshAFormat2ValuePastItsExpiryIsReplacedOnce(t *testing.T) {
	for _, leases := range []bool{true, false} {
		t.Run(fmt.Sprintf("leases=%v", leases), func(t *testing.T) {
			ctx := context.Background()
			_, rdb := newMini(t)
			ns := advNamespace(t)
			o := tiered.Options{RemoteTTL: time.Hour}
			if !leases {
				o.LoadLease = -1
			}
			c := newCache(t, rdb, ns, o)
			plant(t, rdb, ns, "k", rawEnvelope(2, uint64(time.Now().Add(-time.Minute).UnixMicro()),
				time.Now().Add(-time.Second), "old"), time.Hour)
			var calls atomic.Int32
			load := func(context.Context, string) (string, error) { calls.Add(1); return "loaded", nil }
			for i := 0; i < 5; i++ {
				if v, err := c.GetOrLoad(ctx, "k", load); err != nil || v != "loaded" {
					t.Fatalf("GetOrLoad #%d = %s; want the loaded value", i+1, describe(v, err))
				}
			}
			if n := calls.Load(); n != 1 {
				t.Errorf("loader called %d times for 5 GetOrLoad calls of an expired format 2 value; want 1 (the load replaces it)", n)
			}
			if b, ok := rawValue(t, rdb, ns, "k"); !ok || b[0] != 3 || string(b[26:]) != "loaded" {
				t.Errorf("redis holds %q (present %v); want the loaded value, format 3", b, ok)
			}
		})
	}
}

// TestAdversarialRefreshFormat2ValuesAreServedAndLeftIntact: a fresh format
// 2 value (an old instance's) is served by GetOrLoad and Get, from Redis
// and L1, with RefreshAfter past: no refresh rewrites or corrupts it in
// place (its bytes are what the old instance wrote).
func TestAdversarialRefreshFormat2ValuesAreServedAndLeftIntact(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMini(t)
	ns := advNamespace(t)
	c := newCache(t, rdb, ns, tiered.Options{RefreshAfter: time.Minute, RemoteTTL: time.Hour, StaleIfError: time.Hour})
	env := rawEnvelope(2, oldVersion(), time.Now().Add(time.Hour), "old-format")
	plant(t, rdb, ns, "k", env, time.Hour)
	var calls atomic.Int32
	load := func(context.Context, string) (string, error) { calls.Add(1); return "loaded", nil }
	for i := 0; i < 3; i++ {
		if v, err := c.GetOrLoad(ctx, "k", load); err != nil || v != "old-format" {
			t.Fatalf("GetOrLoad = %s; want the format 2 value", describe(v, err))
		}
		if v, err := c.Get(ctx, "k"); err != nil || v != "old-format" {
			t.Fatalf("Get = %s; want the format 2 value", describe(v, err))
		}
	}
	if b, _ := rawValue(t, rdb, ns, "k"); string(b) != string(env) {
		t.Errorf("redis holds %q; want the old instance's bytes %q untouched", b, env)
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("loader called %d times; a format 2 value is never refreshed in place", n)
	}
}

// TestAdversarialRefreshAnOldInstancesLeaseIsHonoured: an old instance
// (format 2 lease, 16-byte token) loads the key. A new instance must not
// load nor overwrite the lease; it waits, and takes the value the old
// instance's write-back (a format 2 value) stores.
func TestAdversarialRefreshAnOldInstancesLeaseIsHonoured(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMini(t)
	ns := advNamespace(t)
	c := newCache(t, rdb, ns, tiered.Options{RefreshAfter: time.Hour, StaleIfError: time.Hour})
	lease := make([]byte, 18, 34)
	lease[0], lease[1] = 2, 2
	binary.BigEndian.PutUint64(lease[2:], uint64(time.Now().UnixMicro()))
	binary.BigEndian.PutUint64(lease[10:], uint64(time.Now().Add(time.Minute).UnixMilli()))
	lease = append(lease, "0123456789abcdef"...)
	plant(t, rdb, ns, "k", lease, time.Minute)

	var calls atomic.Int32
	load := func(context.Context, string) (string, error) { calls.Add(1); return "new", nil }
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if v, err := c.GetOrLoad(short, "k", load); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("GetOrLoad while an old instance holds the lease = %s; want to wait (deadline)", describe(v, err))
	}
	if calls.Load() != 0 {
		t.Errorf("the new instance loaded a key an old instance holds the lease of")
	}
	if b, _ := rawValue(t, rdb, ns, "k"); b[0] != 2 || string(b[18:]) != "0123456789abcdef" {
		t.Errorf("redis holds %q; want the old instance's lease (marked waited or not)", b)
	}
	// The old instance's write-back: a format 2 value (its fill script
	// checks the token and stores the value).
	plant(t, rdb, ns, "k", rawEnvelope(2, uint64(time.Now().UnixMicro()), time.Now().Add(time.Hour), "from-old"), time.Hour)
	if v, err := c.GetOrLoad(ctx, "k", load); err != nil || v != "from-old" {
		t.Errorf("GetOrLoad after the old instance's write-back = %s; want its value", describe(v, err))
	}
}

// refreshFleet plants an old value v1 of "k" and returns n instances on
// rdb, each holding v1 in L1.
func refreshFleet(t *testing.T, rdb redis.UniversalClient, ns string, n int, o tiered.Options) []*tiered.Cache[string] {
	t.Helper()
	ctx := context.Background()
	cs := make([]*tiered.Cache[string], n)
	for i := range cs {
		cs[i] = advCache(t, rdb, ns, o)
	}
	plant(t, rdb, ns, "k", rawEnvelope(3, oldVersion(), time.Now().Add(time.Hour), "v1"), time.Hour)
	for i, c := range cs {
		if v, err := c.Get(ctx, "k"); err != nil || v != "v1" { // Get: no refresh
			t.Fatalf("instance %d: Get = %s; want v1", i, describe(v, err))
		}
	}
	return cs
}

// TestAdversarialRefreshASetOrDeleteDuringTheRefreshWinsEverywhere: A's
// refresh of v1 is held in its loader; B and C serve v1 (their refresh
// attempts find the lease taken). B writes (Set or Delete); then A's
// loader returns and its write-back comes after the write. Redis and every
// instance's L1 must end with B's write.
func TestAdversarialRefreshASetOrDeleteDuringTheRefreshWinsEverywhere(t *testing.T) {
	for _, op := range []string{"Set", "Delete"} {
		t.Run(op, func(t *testing.T) {
			ctx := context.Background()
			_, rdb := newMini(t)
			ns := advNamespace(t)
			o := tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 2 * time.Hour, StaleIfError: time.Hour}
			cs := refreshFleet(t, rdb, ns, 3, o)
			a, b, c := cs[0], cs[1], cs[2]
			g := newGatedLoader(t, constant("refreshed"))
			if v, err := a.GetOrLoad(ctx, "k", g.load); err != nil || v != "v1" {
				t.Fatalf("A: GetOrLoad = %s; want v1 at once", describe(v, err))
			}
			g.awaitStart(t)
			for _, x := range []*tiered.Cache[string]{b, c} {
				if v, err := x.GetOrLoad(ctx, "k", g.load); err != nil || v != "v1" {
					t.Fatalf("GetOrLoad during A's refresh = %s; want v1", describe(v, err))
				}
			}
			received, receivedA := c.Stats().InvalidationsReceived, a.Stats().InvalidationsReceived
			if op == "Set" {
				if err := b.Set(ctx, "k", "written"); err != nil {
					t.Fatal(err)
				}
			} else if err := b.Delete(ctx, "k"); err != nil {
				t.Fatal(err)
			}
			awaitStats(t, c, "C to receive B's write", func(s tiered.Stats) bool { return s.InvalidationsReceived > received })
			awaitStats(t, a, "A to receive B's write", func(s tiered.Stats) bool { return s.InvalidationsReceived > receivedA })
			g.release()
			awaitStats(t, a, "A's write-back to be fenced off", func(s tiered.Stats) bool { return s.FenceRejections == 1 })
			if n := g.calls.Load(); n != 1 {
				t.Errorf("loader called %d times; want 1 refresh for the fleet", n)
			}
			want := "written"
			if op == "Delete" {
				want = ""
			}
			if b, ok := rawValue(t, rdb, ns, "k"); string(b[min(len(b), 26):]) != want || ok != (op == "Set") {
				t.Errorf("redis holds %q (present %v); want %q", b, ok, want)
			}
			for i, x := range cs {
				v, err := x.Get(ctx, "k")
				if op == "Set" && (err != nil || v != "written") || op == "Delete" && !errors.Is(err, tiered.ErrNotFound) {
					t.Errorf("instance %d after %s and A's late write-back: Get = %s; want %q", i, op, describe(v, err), want)
				}
			}
		})
	}
}

// TestAdversarialRefreshARefreshRacesADeleteAndALeaseLoad: A's refresh of v1
// is held; B deletes the key; C misses it and loads it under a lease (held
// too). A's write-back comes first, then C's. The key must end with C's
// value everywhere: A's refresh must not land on C's lease or on the empty
// key, nor keep its value in A's L1.
func TestAdversarialRefreshARefreshRacesADeleteAndALeaseLoad(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMini(t)
	ns := advNamespace(t)
	o := tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 2 * time.Hour, StaleIfError: time.Hour}
	cs := refreshFleet(t, rdb, ns, 3, o)
	a, b, c := cs[0], cs[1], cs[2]
	ga := newGatedLoader(t, constant("refreshed-by-A"))
	if v, err := a.GetOrLoad(ctx, "k", ga.load); err != nil || v != "v1" {
		t.Fatalf("A: GetOrLoad = %s; want v1", describe(v, err))
	}
	ga.awaitStart(t)
	if err := b.Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	awaitStats(t, c, "C to drop k", func(s tiered.Stats) bool { return s.KeysInvalidated > 0 })
	gc := newGatedLoader(t, constant("loaded-by-C"))
	rc := goLoad(ctx, c, "k", gc.load)
	gc.awaitStart(t)
	awaitLeased(t, rdb, ns, "k", false)
	ga.release()
	awaitStats(t, a, "A's write-back to be fenced off", func(s tiered.Stats) bool { return s.FenceRejections == 1 })
	if k, _ := rawKind(t, rdb, ns, "k"); k != 2 && k != 3 {
		t.Fatalf("after A's write-back redis holds kind %d; want C's lease", k)
	}
	gc.release()
	if r := awaitResult(t, rc, 10*time.Second, "C's load"); r.err != nil || r.v != "loaded-by-C" {
		t.Fatalf("C: GetOrLoad = %s; want its load", describe(r.v, r.err))
	}
	if p, _ := rawPayload(t, rdb, ns, "k"); p != "loaded-by-C" {
		t.Errorf("redis holds %q; want C's value", p)
	}
	for i, x := range cs {
		if v, err := x.GetOrLoad(ctx, "k", ga.load); err != nil || v != "loaded-by-C" {
			t.Errorf("instance %d: GetOrLoad = %s; want C's value", i, describe(v, err))
		}
	}
}

// TestAdversarialRefreshOncePerFleetAtTheSameInstant (real Redis): three
// instances, twenty goroutines each, all reading a value past every refresh
// point at once (their points are the same instant): one refresh load, and
// every instance then serves its value from L1 with a version above v1's.
func TestAdversarialRefreshOncePerFleetAtTheSameInstant(t *testing.T) {
	rdb := realRedis(t)
	ctx := context.Background()
	ns := advNamespace(t)
	o := tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 2 * time.Hour}
	cs := refreshFleet(t, rdb, ns, 3, o)
	old, _ := rawValue(t, rdb, ns, "k")
	g := newGatedLoader(t, constant("refreshed"))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for _, c := range cs {
		for range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				for range 20 {
					if v, err := c.GetOrLoad(ctx, "k", g.load); err != nil || v != "v1" && v != "refreshed" {
						t.Errorf("GetOrLoad = %s", describe(v, err))
					}
				}
			}()
		}
	}
	close(start)
	g.awaitStart(t)
	wg.Wait()
	g.release()
	awaitCond(t, 10*time.Second, "every instance to serve the refreshed value from L1", func() bool {
		for _, c := range cs {
			if v, fromL1, err := getFrom(c, "k"); err != nil || v != "refreshed" || !fromL1 {
				return false
			}
		}
		return true
	})
	if n := g.calls.Load(); n != 1 {
		t.Errorf("%d refresh loads; want 1 per fleet", n)
	}
	now, _ := rawValue(t, rdb, ns, "k")
	if binary.BigEndian.Uint64(now[2:10]) <= binary.BigEndian.Uint64(old[2:10]) {
		t.Errorf("refreshed version %d not above v1's %d", binary.BigEndian.Uint64(now[2:10]), binary.BigEndian.Uint64(old[2:10]))
	}
	if binary.BigEndian.Uint64(now[18:26]) != 0 {
		t.Errorf("the refreshed value carries a refresh lease: %x", now[18:26])
	}
}

// TestAdversarialRefreshALeaseNeverOutlivesItsValue: the refresh lease is
// written in place (SETRANGE). A Set that replaces the value at that moment
// leaves no lease in the new value, and a refresh, its release or its
// write-back on a key that expired meanwhile creates no key.
func TestAdversarialRefreshALeaseNeverOutlivesItsValue(t *testing.T) {
	ctx := context.Background()
	t.Run("Set", func(t *testing.T) {
		_, rdb := newMini(t)
		ns := advNamespace(t)
		o := tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 2 * time.Hour}
		cs := refreshFleet(t, rdb, ns, 2, o)
		g := newGatedLoader(t, constant("refreshed"))
		if _, err := cs[0].GetOrLoad(ctx, "k", g.load); err != nil {
			t.Fatal(err)
		}
		g.awaitStart(t)
		if b, _ := rawValue(t, rdb, ns, "k"); binary.BigEndian.Uint64(b[18:26]) == 0 {
			t.Fatalf("redis holds %q during the refresh; want its refresh lease set", b)
		}
		if err := cs[1].Set(ctx, "k", "written"); err != nil {
			t.Fatal(err)
		}
		if b, _ := rawValue(t, rdb, ns, "k"); binary.BigEndian.Uint64(b[18:26]) != 0 || string(b[26:]) != "written" {
			t.Errorf("after a Set during a refresh redis holds %q; want the new value without a lease", b)
		}
		g.release()
		awaitStats(t, cs[0], "the write-back to be fenced off", func(s tiered.Stats) bool { return s.FenceRejections == 1 })
		if b, _ := rawValue(t, rdb, ns, "k"); string(b[26:]) != "written" || binary.BigEndian.Uint64(b[18:26]) != 0 {
			t.Errorf("after the refresh redis holds %q; want the Set's value, no lease", b)
		}
	})
	for _, end := range []string{"fails", "succeeds"} {
		t.Run("expired/"+end, func(t *testing.T) {
			mr, rdb := newMini(t)
			ns := advNamespace(t)
			c := newCache(t, rdb, ns, tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 2 * time.Hour, LocalMaxBytes: 1})
			plant(t, rdb, ns, "k", rawEnvelope(3, oldVersion(), time.Now().Add(time.Hour), "v1"), time.Minute)
			g := newGatedLoader(t, func(int32) (string, error) {
				if end == "fails" {
					return "", errors.New("database down")
				}
				return "refreshed", nil
			})
			if _, err := c.GetOrLoad(ctx, "k", g.load); err != nil {
				t.Fatal(err)
			}
			g.awaitStart(t)
			mr.FastForward(2 * time.Minute) // the key expires while the refresh loads
			g.release()
			awaitStats(t, c, "the refresh to end", func(s tiered.Stats) bool {
				return s.RefreshesFailed == 1 || s.FenceRejections == 1
			})
			if mr.Exists(ns + ":k") {
				v, _ := mr.Get(ns + ":k")
				t.Errorf("the refresh of an expired key left %q under it; want no key", v)
			}
		})
	}
}

// TestAdversarialRefreshStaleIfErrorServesNothingRemoved: an expired value
// in its grace period is served when the load fails (baseline), but never
// once it was removed: by a Delete (on another instance), by a Set (the
// Set's value is the one served, also once it expired in turn), by a
// subscription gap during which it was deleted, nor once its grace (RemoteTTL + StaleIfError) is
// over; nor a value this instance kept only because Redis was down.
func TestAdversarialRefreshStaleIfErrorServesNothingRemoved(t *testing.T) {
	ctx := context.Background()
	failing := func(context.Context, string) (string, error) { return "", errors.New("database down") }
	inGrace := func(t *testing.T, rdb redis.Cmdable, ns string) {
		plant(t, rdb, ns, "k", rawEnvelope(3, oldVersion(), time.Now().Add(-time.Second), "v1"), time.Hour)
	}
	t.Run("baseline", func(t *testing.T) {
		_, rdb := newMini(t)
		ns := advNamespace(t)
		a := advCache(t, rdb, ns, tiered.Options{StaleIfError: time.Hour})
		inGrace(t, rdb, ns)
		for i := 0; i < 2; i++ {
			if v, err := a.GetOrLoad(ctx, "k", failing); err != nil || v != "v1" {
				t.Fatalf("GetOrLoad #%d = %s; want the value in grace", i+1, describe(v, err))
			}
		}
	})
	t.Run("Delete", func(t *testing.T) {
		_, rdb := newMini(t)
		ns := advNamespace(t)
		a := advCache(t, rdb, ns, tiered.Options{StaleIfError: time.Hour})
		b := advCache(t, rdb, ns, tiered.Options{StaleIfError: time.Hour})
		inGrace(t, rdb, ns)
		if v, err := a.GetOrLoad(ctx, "k", failing); err != nil || v != "v1" {
			t.Fatalf("GetOrLoad = %s; want v1", describe(v, err))
		}
		received := a.Stats().InvalidationsReceived
		if err := b.Delete(ctx, "k"); err != nil {
			t.Fatal(err)
		}
		awaitStats(t, a, "A to hear the Delete", func(s tiered.Stats) bool { return s.InvalidationsReceived > received })
		if v, err := a.GetOrLoad(ctx, "k", failing); err == nil {
			t.Errorf("after a Delete, GetOrLoad with a failing loader = %s; want its error", describe(v, err))
		}
	})
	t.Run("Set", func(t *testing.T) {
		_, rdb := newMini(t)
		ns := advNamespace(t)
		a := advCache(t, rdb, ns, tiered.Options{StaleIfError: time.Hour})
		b := advCache(t, rdb, ns, tiered.Options{StaleIfError: time.Hour})
		inGrace(t, rdb, ns)
		if v, err := a.GetOrLoad(ctx, "k", failing); err != nil || v != "v1" {
			t.Fatalf("GetOrLoad = %s; want v1", describe(v, err))
		}
		received := a.Stats().InvalidationsReceived
		if err := b.Set(ctx, "k", "v2", tiered.WithRemoteTTL(time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		awaitStats(t, a, "A to hear the Set", func(s tiered.Stats) bool { return s.InvalidationsReceived > received })
		awaitCond(t, 10*time.Second, "v2 to expire (1 ms)", func() bool {
			_, err := b.Get(ctx, "k")
			return errors.Is(err, tiered.ErrNotFound)
		})
		if v, err := a.GetOrLoad(ctx, "k", failing); err != nil || v != "v2" {
			t.Errorf("after Set(v2), v2 expired, failing load: GetOrLoad = %s; want v2 (the expired value is the Set's, never v1)", describe(v, err))
		}
	})
	t.Run("past grace", func(t *testing.T) {
		_, rdb := newMini(t)
		ns := advNamespace(t)
		a := advCache(t, rdb, ns, tiered.Options{StaleIfError: time.Minute})
		// Redis keeps it longer than its envelope says (a longer
		// StaleIfError on the writer): its grace here is over.
		plant(t, rdb, ns, "k", rawEnvelope(3, oldVersion(), time.Now().Add(-2*time.Minute), "v1"), time.Hour)
		if v, err := a.GetOrLoad(ctx, "k", failing); err == nil {
			t.Errorf("a value expired 2 min ago with StaleIfError 1 min: GetOrLoad = %s; want the error", describe(v, err))
		}
	})
	t.Run("gap", func(t *testing.T) {
		mr := miniredis.RunT(t)
		n := newAdvNet(mr.Addr())
		rdb := n.client(t)
		ns := advNamespace(t)
		a := advCache(t, rdb, ns, tiered.Options{StaleIfError: time.Hour, HeartbeatInterval: 50 * time.Millisecond})
		b := advCache(t, plainClient(t, mr.Addr()), ns, tiered.Options{StaleIfError: time.Hour})
		inGrace(t, rdb, ns)
		if v, err := a.GetOrLoad(ctx, "k", failing); err != nil || v != "v1" {
			t.Fatalf("GetOrLoad = %s; want v1", describe(v, err))
		}
		gaps := a.Stats().SubscriptionGaps
		n.killSubscribers.Store(true) // A's subscription cannot come back
		n.killAll()
		awaitStats(t, a, "A to notice the gap", func(s tiered.Stats) bool { return s.SubscriptionGaps > gaps })
		if err := b.Delete(ctx, "k"); err != nil { // A cannot hear it
			t.Fatal(err)
		}
		if v, err := a.GetOrLoad(ctx, "k", failing); err == nil {
			t.Errorf("during the gap, after a Delete A never heard: GetOrLoad = %s; want the error", describe(v, err))
		}
		n.killSubscribers.Store(false)
		awaitL1InUse(t, a)
		if v, err := a.GetOrLoad(ctx, "k", failing); err == nil {
			t.Errorf("after the gap healed: GetOrLoad = %s; want the error", describe(v, err))
		}
	})
	t.Run("outage", func(t *testing.T) {
		mr := miniredis.RunT(t)
		n := newAdvNet(mr.Addr())
		const hb = 20 * time.Millisecond
		a := advCache(t, n.client(t), advNamespace(t), tiered.Options{StaleIfError: time.Hour, HeartbeatInterval: hb})
		gaps := a.Stats().SubscriptionGaps
		n.refuseDial.Store(true)
		n.killAll()
		awaitStats(t, a, "the outage to be noticed", func(s tiered.Stats) bool { return s.SubscriptionGaps > gaps })
		if v, err := a.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "outage", nil }); err != nil || v != "outage" {
			t.Fatalf("GetOrLoad in the outage = %s", describe(v, err))
		}
		// Past the outage bound (4 × HeartbeatInterval), the value is gone.
		awaitCond(t, 10*time.Second, "the outage value to expire", func() bool {
			_, fromL1, _ := getFrom(a, "k")
			return !fromL1
		})
		if v, err := a.GetOrLoad(ctx, "k", failing); err == nil {
			t.Errorf("a value kept only during an outage, past its bound: GetOrLoad = %s; want the error", describe(v, err))
		}
	})
}

// TestAdversarialRefreshCarriesTheItemOptions: a refresh started by a
// GetOrLoad with WithRemoteTTL writes back under that TTL (plus the grace),
// not under RemoteTTL.
func TestAdversarialRefreshCarriesTheItemOptions(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMini(t)
	ns := advNamespace(t)
	c := advCache(t, rdb, ns, tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 10 * time.Hour,
		StaleIfError: time.Minute, RemoteTTLJitter: -1})
	plant(t, rdb, ns, "k", rawEnvelope(3, oldVersion(), time.Now().Add(time.Hour), "v1"), time.Hour)
	load := func(context.Context, string) (string, error) { return "refreshed", nil }
	if _, err := c.GetOrLoad(ctx, "k", load, tiered.WithRemoteTTL(2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	awaitCond(t, 10*time.Second, "the refresh to land", func() bool {
		b, _ := rawValue(t, rdb, ns, "k")
		return strings.HasSuffix(string(b), "refreshed")
	})
	if ttl := mr.TTL(ns + ":k"); ttl != 2*time.Hour+time.Minute {
		t.Errorf("refreshed value's Redis TTL = %v; want WithRemoteTTL + StaleIfError = %v", ttl, 2*time.Hour+time.Minute)
	}
}

// TestAdversarialRefreshAcrossAKilledSubscription (private redis-server):
// B's pub/sub connection is killed (CLIENT KILL TYPE pubsub) while A's
// refresh runs; A's write-back is published while B may not be
// subscribed. Once B is healthy again it must serve the refreshed value,
// never v1.
func TestAdversarialRefreshAcrossAKilledSubscription(t *testing.T) {
	addr := privateRedis(t)
	admin := plainClient(t, addr)
	ctx := context.Background()
	ns := advNamespace(t)
	o := tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 2 * time.Hour, HeartbeatInterval: 100 * time.Millisecond}
	a := advCache(t, plainClient(t, addr), ns, o)
	b := advCache(t, plainClient(t, addr), ns, o)
	plant(t, admin, ns, "k", rawEnvelope(3, oldVersion(), time.Now().Add(time.Hour), "v1"), time.Hour)
	for _, c := range []*tiered.Cache[string]{a, b} {
		if v, err := c.Get(ctx, "k"); err != nil || v != "v1" {
			t.Fatalf("Get = %s", describe(v, err))
		}
	}
	g := newGatedLoader(t, constant("refreshed"))
	if _, err := a.GetOrLoad(ctx, "k", g.load); err != nil {
		t.Fatal(err)
	}
	g.awaitStart(t)
	gaps := b.Stats().SubscriptionGaps
	if err := admin.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	g.release()
	awaitCond(t, 10*time.Second, "the refreshed value in redis", func() bool {
		p, _ := rawPayload(t, admin, ns, "k")
		return p == "refreshed"
	})
	awaitStats(t, b, "B to notice the gap", func(s tiered.Stats) bool { return s.SubscriptionGaps > gaps })
	awaitL1InUse(t, b)
	if v, err := b.Get(ctx, "k"); err != nil || v != "refreshed" {
		t.Errorf("B after its subscription healed: Get = %s; want the refreshed value", describe(v, err))
	}
	if v, err := a.Get(ctx, "k"); err != nil || v != "refreshed" {
		t.Errorf("A: Get = %s; want the refreshed value", describe(v, err))
	}
}

// TestAdversarialRefreshGetNeverRefreshes: Get, from Redis and from L1, of
// a value long past RefreshAfter starts no refresh and takes no refresh
// lease.
func TestAdversarialRefreshGetNeverRefreshes(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMini(t)
	ns := advNamespace(t)
	c := advCache(t, rdb, ns, tiered.Options{RefreshAfter: time.Minute, RemoteTTL: time.Hour})
	env := rawEnvelope(3, oldVersion(), time.Now().Add(time.Hour), "v1")
	plant(t, rdb, ns, "k", env, time.Hour)
	for i := 0; i < 20; i++ {
		if v, err := c.Get(ctx, "k"); err != nil || v != "v1" {
			t.Fatalf("Get = %s; want v1", describe(v, err))
		}
		if v, _, err := c.GetFrom(ctx, "k"); err != nil || v != "v1" {
			t.Fatalf("GetFrom = %s; want v1", describe(v, err))
		}
	}
	if s := c.Stats(); s.RefreshesStarted != 0 || s.Loads != 0 {
		t.Errorf("Get started refreshes: %+v", s)
	}
	if b, _ := rawValue(t, rdb, ns, "k"); string(b) != string(env) {
		t.Errorf("redis holds %q after Gets; want it untouched (no refresh lease)", b)
	}
}

// TestAdversarialRefreshKeepsTheLocalTTLOfTheKey: the refreshed value (and,
// the same rule, a Set's value) is kept in the writing instance's L1 for
// the key's L1 TTL (LocalTTLFunc, or the caller's WithLocalTTL), not
// Options.LocalTTL, whichever of the write's reply and its own message
// (which carries the value, and knows no WithLocalTTL) comes first. Longer:
// the value stays in L1; shorter: it leaves L1 in time (the L1 TTL bounds
// how long an out-of-band write goes unseen).
func TestAdversarialRefreshKeepsTheLocalTTLOfTheKey(t *testing.T) {
	for _, tc := range []struct {
		how     string
		longer  bool // the key's L1 TTL is 1 h and LocalTTL 5 ms, or the reverse
		viaFunc bool
		set     bool
	}{
		{"LocalTTLFunc/longer", true, true, false},
		{"LocalTTLFunc/shorter", false, true, false},
		{"WithLocalTTL/longer", true, false, false},
		{"WithLocalTTL/shorter", false, false, false},
		{"Set/WithLocalTTL/longer", true, false, true},
		{"Set/WithLocalTTL/shorter", false, false, true},
	} {
		t.Run(tc.how, func(t *testing.T) {
			ctx := context.Background()
			_, rdb := newMini(t)
			ns := advNamespace(t)
			keyTTL, localTTL := time.Hour, 5*time.Millisecond
			if !tc.longer {
				keyTTL, localTTL = localTTL, keyTTL
			}
			o := tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 2 * time.Hour, LocalTTL: localTTL}
			var opts []tiered.ItemOption
			if tc.viaFunc {
				o.LocalTTLFunc = func(key string) time.Duration {
					if key == "k" {
						return keyTTL
					}
					return 0
				}
			} else {
				opts = append(opts, tiered.WithLocalTTL(keyTTL))
			}
			c := advCache(t, rdb, ns, o)
			plant(t, rdb, ns, "k", rawEnvelope(3, oldVersion(), time.Now().Add(time.Hour), "v1"), time.Hour)
			if tc.set {
				if _, err := c.Get(ctx, "k"); err != nil { // L1 holds k: the own message replaces it
					t.Fatal(err)
				}
				if err := c.Set(ctx, "k", "refreshed", opts...); err != nil {
					t.Fatal(err)
				}
			} else {
				load := func(context.Context, string) (string, error) { return "refreshed", nil }
				if _, err := c.GetOrLoad(ctx, "k", load, opts...); err != nil {
					t.Fatal(err)
				}
				awaitCond(t, 10*time.Second, "the refresh to land in redis", func() bool {
					p, _ := rawPayload(t, rdb, ns, "k")
					return p == "refreshed"
				})
			}
			if tc.longer {
				time.Sleep(50 * time.Millisecond) // 10 × LocalTTL: letting it run out, not synchronising
				if v, fromL1, err := getFrom(c, "k"); err != nil || v != "refreshed" || !fromL1 {
					t.Errorf("Get 50 ms after the write = %s (from L1: %v); want the value from L1 (its L1 TTL is 1 h)", describe(v, err), fromL1)
				}
				return
			}
			deadline := time.Now().Add(2 * time.Second)
			for {
				_, fromL1, _ := getFrom(c, "k")
				if !fromL1 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the value is still served from L1 2 s after the write; its L1 TTL is 5 ms")
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
}

// TestAdversarialRefreshAnInGraceLoadRacesARefresh: A's refresh of v1 is
// held in its loader when v1 expires; B's GetOrLoad finds v1 in its grace
// period with A's refresh lease on it, and loads too (fenced by the
// version alone). B's write-back lands first; A's, later, must be fenced
// off, and both instances and Redis must end with B's value.
func TestAdversarialRefreshAnInGraceLoadRacesARefresh(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMini(t)
	ns := advNamespace(t)
	o := tiered.Options{RefreshAfter: time.Hour, RemoteTTL: 2 * time.Hour, StaleIfError: time.Hour}
	a := advCache(t, rdb, ns, o)
	b := advCache(t, rdb, ns, o)
	plant(t, rdb, ns, "k", rawEnvelope(3, oldVersion(), time.Now().Add(200*time.Millisecond), "v1"), time.Hour)
	ga := newGatedLoader(t, constant("refreshed-by-A"))
	if v, err := a.GetOrLoad(ctx, "k", ga.load); err != nil || v != "v1" {
		t.Fatalf("A: GetOrLoad = %s; want v1", describe(v, err))
	}
	ga.awaitStart(t)
	awaitCond(t, 10*time.Second, "v1 to expire", func() bool {
		_, err := b.Get(ctx, "k")
		return errors.Is(err, tiered.ErrNotFound)
	})
	gb := newGatedLoader(t, constant("loaded-by-B"))
	gb.block = func(int32) bool { return false }
	if v, err := b.GetOrLoad(ctx, "k", gb.load); err != nil || v != "loaded-by-B" {
		t.Fatalf("B: GetOrLoad of the expired value = %s; want its load", describe(v, err))
	}
	ga.release()
	awaitStats(t, a, "A's write-back to be fenced off", func(s tiered.Stats) bool { return s.FenceRejections == 1 })
	if p, _ := rawPayload(t, rdb, ns, "k"); p != "loaded-by-B" {
		t.Errorf("redis holds %q; want B's value", p)
	}
	for i, c := range []*tiered.Cache[string]{a, b} {
		if v, err := c.GetOrLoad(ctx, "k", ga.load); err != nil || v != "loaded-by-B" {
			t.Errorf("instance %d: GetOrLoad = %s; want B's value", i, describe(v, err))
		}
	}
}
