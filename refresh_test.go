package tiered

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// Tests of Options.RefreshAfter and Options.StaleIfError. Time is moved by
// hand: L1's clock (a manual clock shared by the instances), Redis' clock
// (SetTime: the versions, hence the ages) and Redis' TTLs (FastForward).

// freshWorld is a miniredis and a manual clock at one start time.
type freshWorld struct {
	mr    *miniredis.Miniredis
	clk   *clock
	start time.Time
	ns    string
}

func newFreshWorld(t *testing.T) *freshWorld {
	mr := miniredis.RunT(t)
	start := coreMsNow()
	mr.SetTime(start)
	return &freshWorld{mr: mr, clk: newManualClock(start), start: start, ns: uniqueNamespace(t)}
}

// instance returns a Cache of the world's namespace on a client of its own
// (an instance with its own subscription).
func (w *freshWorld) instance(t *testing.T, opts Options) *Cache[string] {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: w.mr.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	opts.Namespace = w.ns
	if opts.LoadTimeout == 0 {
		opts.LoadTimeout = 5 * time.Second
	}
	opts.RemoteTTLJitter = -1
	return newTestCacheClock[string](t, rdb, coreOptions(opts), w.clk)
}

// advance moves every clock d past the start.
func (w *freshWorld) advance(d time.Duration) {
	w.clk.set(w.start.Add(d))
	w.mr.SetTime(w.start.Add(d))
}

func constLoader(v string) func(context.Context, string) (string, error) {
	return func(context.Context, string) (string, error) { return v, nil }
}

// gatedLoader is a loader that reports each call on started and returns v
// once gate is closed.
type gatedLoader struct {
	v       string
	calls   atomic.Int32
	started chan struct{}
	gate    chan struct{}
}

func newGatedLoader(v string) *gatedLoader {
	return &gatedLoader{v: v, started: make(chan struct{}, 100), gate: make(chan struct{})}
}

func (g *gatedLoader) load(ctx context.Context, _ string) (string, error) {
	g.calls.Add(1)
	g.started <- struct{}{}
	select {
	case <-g.gate:
		return g.v, nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func TestRefreshAfterReturnsTheValueAtOnceAndRefreshesItEverywhere(t *testing.T) {
	for _, tc := range []struct {
		name     string
		localTTL time.Duration
		src      Source // of the read past RefreshAfter
	}{
		{"L1 hit", time.Hour, SourceLocal},
		{"Redis hit", 90 * time.Second, SourceRemote}, // L1 has dropped the value when it is read
	} {
		t.Run(tc.name, func(t *testing.T) { testRefreshAfterReturnsTheValueAtOnce(t, tc.localTTL, tc.src) })
	}
}

func testRefreshAfterReturnsTheValueAtOnce(t *testing.T, localTTL time.Duration, src Source) {
	w := newFreshWorld(t)
	opts := Options{RefreshAfter: time.Minute, LocalTTL: localTTL}
	a, b := w.instance(t, opts), w.instance(t, opts)
	ctx := context.Background()
	if v, err := a.GetOrLoad(ctx, "k", constLoader("v1")); v != "v1" || err != nil {
		t.Fatalf("first load: %q, %v", v, err)
	}
	if v, err := b.GetOrLoad(ctx, "k", constLoader("unused")); v != "v1" || err != nil {
		t.Fatalf("other instance: %q, %v", v, err)
	}
	w.advance(2 * time.Minute)

	slow := newGatedLoader("v2") // held until the call has returned
	if v, got, err := a.GetOrLoadFrom(ctx, "k", slow.load); v != "v1" || got != src || err != nil {
		t.Fatalf("read past RefreshAfter: %q from %v, %v; want v1 from %v at once", v, got, err, src)
	}
	<-slow.started // the refresh runs in the background
	close(slow.gate)
	waitUntil(t, 5*time.Second, "the refreshed value in both instances", func() bool {
		va, _ := a.Get(ctx, "k")
		vb, _ := b.Get(ctx, "k")
		return va == "v2" && vb == "v2"
	})
	if got, _ := redisHolds(t, w.mr, w.ns, "k"); got != "v2" {
		t.Fatalf("redis holds %s, want the refreshed value", got)
	}
	if s := a.Stats(); s.RefreshesStarted != 1 || s.RefreshesFailed != 0 {
		t.Fatalf("stats %+v: want one refresh", s)
	}
}

// redisHolds returns the payload Redis holds for key of namespace ns.
func redisHolds(t *testing.T, mr *miniredis.Miniredis, ns, key string) (string, bool) {
	t.Helper()
	raw, err := mr.Get(ns + ":" + key)
	if errors.Is(err, miniredis.ErrKeyNotFound) {
		return "", false
	}
	p, err := envelopePayload(raw)
	if err != nil {
		t.Fatalf("redis holds %q: %v", raw, err)
	}
	return string(p), true
}

func TestRefreshAfterMakesOneLoadAcrossInstancesAndGoroutines(t *testing.T) {
	w := newFreshWorld(t)
	opts := Options{RefreshAfter: time.Minute}
	caches := []*Cache[string]{w.instance(t, opts), w.instance(t, opts), w.instance(t, opts)}
	ctx := context.Background()
	for _, c := range caches {
		if v, err := c.GetOrLoad(ctx, "k", constLoader("v1")); v != "v1" || err != nil {
			t.Fatalf("prime: %q, %v", v, err)
		}
	}
	w.advance(2 * time.Minute)

	refresh := newGatedLoader("v2")
	var wg sync.WaitGroup
	begin := make(chan struct{})
	for _, c := range caches {
		for range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-begin
				for range 50 {
					if v, err := c.GetOrLoad(ctx, "k", refresh.load); err != nil || (v != "v1" && v != "v2") {
						t.Errorf("read during the refresh: %q, %v", v, err)
						return
					}
				}
			}()
		}
	}
	close(begin)
	<-refresh.started
	wg.Wait() // every read returned while the refresh's load was held
	close(refresh.gate)
	waitUntil(t, 5*time.Second, "the refreshed value in every instance", func() bool {
		for _, c := range caches {
			if v, _ := c.Get(ctx, "k"); v != "v2" {
				return false
			}
		}
		return true
	})
	var started uint64
	for _, c := range caches {
		started += c.Stats().RefreshesStarted
	}
	if n := refresh.calls.Load(); n != 1 || started != 1 {
		t.Fatalf("%d refresh loads (%d counted); want exactly 1 for 3 instances x 20 goroutines", n, started)
	}
}

func TestASetOrDeleteDuringARefreshWins(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(c *Cache[string]) error
		want  string // "" for not found
	}{
		{"Set", func(c *Cache[string]) error { return c.Set(context.Background(), "k", "set") }, "set"},
		{"Delete", func(c *Cache[string]) error { return c.Delete(context.Background(), "k") }, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFreshWorld(t)
			opts := Options{RefreshAfter: time.Minute}
			a, b := w.instance(t, opts), w.instance(t, opts)
			ctx := context.Background()
			if _, err := a.GetOrLoad(ctx, "k", constLoader("v1")); err != nil {
				t.Fatal(err)
			}
			w.advance(2 * time.Minute)
			refresh := newGatedLoader("refreshed")
			a.GetOrLoad(ctx, "k", refresh.load)
			<-refresh.started
			if err := tc.write(b); err != nil {
				t.Fatalf("%s during the refresh: %v", tc.name, err)
			}
			close(refresh.gate)
			waitUntil(t, 5*time.Second, "the refresh's write-back fenced off", func() bool {
				return a.Stats().FenceRejections == 1
			})
			coreWaitInvalidations(t, a, 1) // b's write, as a sees it
			for _, c := range []*Cache[string]{a, b} {
				v, err := c.Get(ctx, "k")
				if tc.want == "" && !errors.Is(err, ErrNotFound) || tc.want != "" && v != tc.want {
					t.Fatalf("after the refresh: %q, %v; want %q", v, err, tc.want)
				}
			}
			got, found := redisHolds(t, w.mr, w.ns, "k")
			if tc.want == "" && found || tc.want != "" && got != tc.want {
				t.Fatalf("redis holds %q (%v)", got, found)
			}
		})
	}
}

func TestAFailedRefreshKeepsTheValueAndWaitsBeforeRetrying(t *testing.T) {
	w := newFreshWorld(t)
	a := w.instance(t, Options{RefreshAfter: time.Minute})
	ctx := context.Background()
	if _, err := a.GetOrLoad(ctx, "k", constLoader("v1")); err != nil {
		t.Fatal(err)
	}
	w.advance(2 * time.Minute)
	var calls atomic.Int32
	failing := func(context.Context, string) (string, error) {
		calls.Add(1)
		return "", errors.New("database down")
	}
	if v, err := a.GetOrLoad(ctx, "k", failing); v != "v1" || err != nil {
		t.Fatalf("%q, %v", v, err)
	}
	waitUntil(t, 5*time.Second, "the refresh failed", func() bool { return a.Stats().RefreshesFailed == 1 })
	for range 10 {
		if v, err := a.GetOrLoad(ctx, "k", failing); v != "v1" || err != nil {
			t.Fatalf("after the failed refresh: %q, %v; want the value", v, err)
		}
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("%d refresh loads within RefreshAfter/10; want 1", n)
	}
	w.advance(2*time.Minute + 7*time.Second) // past RefreshAfter/10
	a.GetOrLoad(ctx, "k", constLoader("v2"))
	waitUntil(t, 5*time.Second, "the retried refresh", func() bool { v, _ := a.Get(ctx, "k"); return v == "v2" })
}

func TestGetNeverRefreshes(t *testing.T) {
	w := newFreshWorld(t)
	a := w.instance(t, Options{RefreshAfter: time.Minute, StaleIfError: time.Hour, RemoteTTL: 10 * time.Minute})
	ctx := context.Background()
	if _, err := a.GetOrLoad(ctx, "k", constLoader("v1")); err != nil {
		t.Fatal(err)
	}
	w.advance(5 * time.Minute)
	if v, err := a.Get(ctx, "k"); v != "v1" || err != nil {
		t.Fatalf("Get past RefreshAfter: %q, %v", v, err)
	}
	w.advance(11 * time.Minute) // expired, in its grace period
	w.mr.FastForward(11 * time.Minute)
	if v, err := a.Get(ctx, "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get past the expiry: %q, %v; want ErrNotFound", v, err)
	}
	if s := a.Stats(); s.RefreshesStarted != 0 || s.StaleServed != 0 {
		t.Fatalf("Get refreshed or served stale: %+v", s)
	}
}

func TestStaleIfErrorServesTheExpiredValueWhenTheLoadFails(t *testing.T) {
	ctx := context.Background()
	failures := map[string]func(context.Context, string) (string, error){
		"error": func(context.Context, string) (string, error) { return "", errors.New("database down") },
		"panic": func(context.Context, string) (string, error) { panic("loader bug") },
		"timeout": func(ctx context.Context, _ string) (string, error) {
			<-ctx.Done()
			return "", ctx.Err()
		},
	}
	for name, fail := range failures {
		for _, tc := range []struct {
			name      string
			grace     time.Duration
			past      time.Duration // past the expiry
			wantStale bool
		}{
			{"in grace", time.Hour, time.Minute, true},
			{"off", 0, time.Minute, false},
			{"grace passed", time.Hour, 2 * time.Hour, false},
		} {
			t.Run(name+"/"+tc.name, func(t *testing.T) {
				w := newFreshWorld(t)
				opts := Options{StaleIfError: tc.grace, RemoteTTL: time.Minute, LocalTTL: time.Hour, LoadTimeout: 200 * time.Millisecond}
				a, b := w.instance(t, opts), w.instance(t, opts)
				if _, err := a.GetOrLoad(ctx, "k", constLoader("v1")); err != nil {
					t.Fatal(err)
				}
				w.advance(time.Minute + tc.past)
				w.mr.FastForward(time.Minute + tc.past)
				// a falls back on its L1 entry, b (which never held the
				// key) on the value Redis keeps for the grace period.
				for _, c := range []*Cache[string]{a, b} {
					v, err := c.GetOrLoad(ctx, "k", fail)
					switch {
					case tc.wantStale && (v != "v1" || err != nil):
						t.Fatalf("failed load: %q, %v; want the expired value", v, err)
					case !tc.wantStale && err == nil:
						t.Fatalf("failed load: %q, nil; want its error", v)
					}
					if want := map[bool]uint64{true: 1}[tc.wantStale]; c.Stats().StaleServed != want {
						t.Fatalf("StaleServed %d, want %d", c.Stats().StaleServed, want)
					}
				}
				// Served stale, never fresh: a working loader replaces it.
				if v, err := a.GetOrLoad(ctx, "k", constLoader("v2")); v != "v2" || err != nil {
					t.Fatalf("load after the failure: %q, %v", v, err)
				}
			})
		}
	}
}

func TestStaleIfErrorDoesNotServeADeletedValue(t *testing.T) {
	w := newFreshWorld(t)
	a := w.instance(t, Options{StaleIfError: time.Hour, RemoteTTL: time.Minute, LocalTTL: time.Hour})
	ctx := context.Background()
	if _, err := a.GetOrLoad(ctx, "k", constLoader("v1")); err != nil {
		t.Fatal(err)
	}
	w.advance(2 * time.Minute)
	w.mr.FastForward(2 * time.Minute)
	if err := a.Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if v, err := a.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) {
		return "", errors.New("database down")
	}); err == nil {
		t.Fatalf("failed load after a Delete: %q, nil; want the error", v)
	}
}

func TestValuesOfBothEnvelopeFormatsAreRead(t *testing.T) {
	w := newFreshWorld(t)
	a := w.instance(t, Options{RefreshAfter: time.Minute})
	ctx := context.Background()

	// An instance before format 3 wrote this: read as a value, and never
	// refreshed in place (the refresh lease needs format 3).
	old := encodeEnvelopeV2(kindValue, w.start.Add(time.Hour).UnixNano(), []byte("old"))
	binary.BigEndian.PutUint64(old[versionAt:], uint64(w.start.UnixMicro()))
	w.mr.Set(w.ns+":old", string(old))
	w.advance(2 * time.Minute)
	for range 2 { // from Redis, then from L1
		if v, err := a.GetOrLoad(ctx, "old", constLoader("unused")); v != "old" || err != nil {
			t.Fatalf("format 2 value: %q, %v", v, err)
		}
	}
	waitUntil(t, 5*time.Second, "the refresh tried", func() bool { return !a.refreshing.start("old", 0, 0) })
	if s := a.Stats(); s.RefreshesStarted != 0 || s.Loads != 0 {
		t.Fatalf("format 2 value refreshed: %+v", s)
	}

	// What this version writes is format 3, which an older instance's
	// decoder (format byte 2 or nothing) reads as a foreign value: a miss.
	if err := a.Set(ctx, "new", "new"); err != nil {
		t.Fatal(err)
	}
	raw, _ := w.mr.Get(w.ns + ":new")
	if raw[0] != envelopeV3 || len(raw) != envelopeHeader+len("new") {
		t.Fatalf("written envelope %x: want format 3", raw)
	}
	if env, err := decodeEnvelope([]byte(raw)); err != nil || string(env.payload) != "new" {
		t.Fatalf("format 3 value: %+v, %v", env, err)
	}
}

func TestL1HitWithRefreshAfterDoesNotAllocate(t *testing.T) {
	w := newFreshWorld(t)
	a := w.instance(t, Options{RefreshAfter: time.Minute, StaleIfError: time.Minute})
	ctx := context.Background()
	load := constLoader("v")
	if _, err := a.GetOrLoad(ctx, "k", load, WithLocalTTL(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(1000, func() {
		if _, err := a.GetOrLoad(ctx, "k", load, WithLocalTTL(time.Hour)); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("GetOrLoad hit before the refresh point: %v allocs, want 0", n)
	}
	if s := a.Stats(); s.LocalHits != 1001 {
		t.Errorf("LocalHits %d, want 1001", s.LocalHits)
	}
}

// GetOrLoadMany refreshes and falls back on stale values per key, as
// GetOrLoad does: a key past RefreshAfter is returned at once (from L1 or
// Redis) and refreshed in the background by a load of that key alone.
func TestGetOrLoadManyRefreshesKeysPastRefreshAfter(t *testing.T) {
	for _, tc := range []struct {
		name     string
		localTTL time.Duration
	}{
		{"L1 hit", time.Hour},
		{"Redis hit", 90 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFreshWorld(t)
			a := w.instance(t, Options{RefreshAfter: time.Minute, LocalTTL: tc.localTTL})
			ctx := context.Background()
			first := func(_ context.Context, keys []string) (map[string]string, error) {
				m := map[string]string{}
				for _, k := range keys {
					m[k] = k + "1"
				}
				return m, nil
			}
			if m, err := a.GetOrLoadMany(ctx, []string{"x", "y"}, first); err != nil || m["x"] != "x1" || m["y"] != "y1" {
				t.Fatalf("first load: %v, %v", m, err)
			}
			w.advance(2 * time.Minute)

			asked := make(chan []string, 10)
			gate := make(chan struct{})
			slow := func(_ context.Context, keys []string) (map[string]string, error) {
				asked <- keys
				<-gate
				m := map[string]string{}
				for _, k := range keys {
					m[k] = k + "2"
				}
				return m, nil
			}
			if m, err := a.GetOrLoadMany(ctx, []string{"x", "y"}, slow); err != nil || m["x"] != "x1" || m["y"] != "y1" {
				t.Fatalf("read past RefreshAfter: %v, %v; want the current values at once", m, err)
			}
			got := map[string]bool{}
			for range 2 {
				var keys []string
				select {
				case keys = <-asked:
				case <-time.After(5 * time.Second):
					t.Fatalf("refreshes started for %v; want x and y", got)
				}
				if len(keys) != 1 {
					t.Fatalf("a refresh loaded %v; want one key", keys)
				}
				got[keys[0]] = true
			}
			if !got["x"] || !got["y"] {
				t.Fatalf("refreshed %v; want x and y", got)
			}
			close(gate)
			waitUntil(t, 5*time.Second, "the refreshed values", func() bool {
				m, _ := a.GetMany(ctx, []string{"x", "y"})
				return m["x"] == "x2" && m["y"] == "y2"
			})
			if s := a.Stats(); s.RefreshesStarted != 2 {
				t.Fatalf("RefreshesStarted %d, want 2", s.RefreshesStarted)
			}
		})
	}
}

func TestGetOrLoadManyServesStaleValuesWhenTheLoadFails(t *testing.T) {
	w := newFreshWorld(t)
	a := w.instance(t, Options{StaleIfError: time.Hour, RemoteTTL: time.Minute, LocalTTL: time.Hour})
	ctx := context.Background()
	if _, err := a.GetOrLoad(ctx, "k", constLoader("v1")); err != nil {
		t.Fatal(err)
	}
	w.advance(2 * time.Minute)
	w.mr.FastForward(2 * time.Minute)
	down := errors.New("database down")
	fail := func(context.Context, []string) (map[string]string, error) { return nil, down }
	m, err := a.GetOrLoadMany(ctx, []string{"k", "never"}, fail)
	if m["k"] != "v1" || !errors.Is(err, down) {
		t.Fatalf("failed batch load: %v, %v; want k's expired value and the error for the key with none", m, err)
	}
	if s := a.Stats(); s.StaleServed != 1 {
		t.Fatalf("StaleServed %d, want 1", s.StaleServed)
	}
}
