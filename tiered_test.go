package tiered

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// Tests of the core semantics of the two-tier cache (issue 2). They run on
// miniredis unless their name says otherwise; each one fails if the
// behaviour its name states breaks.

// coreHeartbeat is the HeartbeatInterval of tests that count L1 hits. A
// subscription is declared dead after 3 intervals without a heartbeat, which
// on a loaded 2-core machine can happen with the 500 ms default and would
// make L1 step aside mid-test. (The heartbeat itself is tested elsewhere.)
const coreHeartbeat = time.Minute

// coreUser is the value type of most tests: a struct, so it goes through
// the Codec.
type coreUser struct {
	ID   int
	Name string
}

// coreDoc can hold a value JSON cannot encode (a channel in Extra).
type coreDoc struct {
	Name  string
	Extra any `json:",omitempty"`
}

// coreLocalMaxBytes is the L1 budget of tests that do not set one: ample
// for their values, and closing the 64 MiB default ristretto takes ~70 ms
// under -race, per cache.
const coreLocalMaxBytes = 1 << 20

// newCoreCache is newTestCache with a steady heartbeat and a small L1.
func newCoreCache[V any](t *testing.T, rdb redis.UniversalClient, opts Options) *Cache[V] {
	t.Helper()
	return newTestCache[V](t, rdb, coreOptions(opts))
}

func coreOptions(opts Options) Options {
	if opts.HeartbeatInterval == 0 {
		opts.HeartbeatInterval = coreHeartbeat
	}
	if opts.LocalMaxBytes == 0 {
		opts.LocalMaxBytes = coreLocalMaxBytes
	}
	return opts
}

// newCoreCacheClock is newCoreCache with a manual clock starting at start.
func newCoreCacheClock[V any](t *testing.T, rdb redis.UniversalClient, opts Options, start time.Time) (*Cache[V], *clock) {
	t.Helper()
	clk := newManualClock(start)
	return newTestCacheClock[V](t, rdb, coreOptions(opts), clk), clk
}

// coreOtherClient returns a second client on mr: a Cache on it is "another
// instance" with its own subscription.
func coreOtherClient(t *testing.T, mr *miniredis.Miniredis) *redis.Client {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// coreFastFailClient is a client on addr that does not retry commands or dials,
// so that an outage costs a test milliseconds instead of go-redis's default
// retries (4 attempts x 5 dials x 100 ms).
func coreFastFailClient(t *testing.T, addr string) *redis.Client {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialerRetries: 1})
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// coreOutageMiniredis starts a miniredis with a fast-failing client on it.
func coreOutageMiniredis(t *testing.T) (*miniredis.Miniredis, *redis.Client) {
	t.Helper()
	mr := miniredis.RunT(t)
	return mr, coreFastFailClient(t, mr.Addr())
}

// coreMsNow returns now truncated to the millisecond, the resolution of the
// expiry stored in the L2 envelope.
func coreMsNow() time.Time { return time.UnixMilli(time.Now().UnixMilli()) }

// coreEnvelope returns what the cache would store in Redis for payload.
func coreEnvelope(payload string, expires time.Time) string {
	return string(encodeEnvelope(kindValue, expires.UnixNano(), []byte(payload)))
}

// coreRedisKey is the Redis key under which c stores key.
func coreRedisKey[V any](c *Cache[V], key string) string { return c.remote.key(key) }

// coreWaitInL1 waits until a fill of key (which, unlike Set, does not wait for
// ristretto's buffer) is visible in c's L1.
func coreWaitInL1[V any](t *testing.T, c *Cache[V], key string) {
	t.Helper()
	waitUntil(t, 5*time.Second, "L1 to hold "+key, func() bool {
		_, ok := c.local.get(key)
		return ok
	})
}

// coreWaitInvalidations waits until c has received n invalidation messages.
// A reader that fills L1 with another instance's write before that write's
// invalidation reached it drops the entry when it does (the fill cannot tell
// it read the new value), so tests that count L1 hits on a reader wait first.
func coreWaitInvalidations[V any](t *testing.T, c *Cache[V], n uint64) {
	t.Helper()
	waitUntil(t, 5*time.Second, "invalidations to arrive", func() bool {
		return c.Stats().InvalidationsReceived >= n
	})
}

// coreCountingCodec is the JSON codec, counting its calls.
type coreCountingCodec struct {
	marshals, unmarshals atomic.Int64
}

func (c *coreCountingCodec) Marshal(v any) ([]byte, error) {
	c.marshals.Add(1)
	return json.Marshal(v)
}

func (c *coreCountingCodec) Unmarshal(b []byte, v any) error {
	c.unmarshals.Add(1)
	return json.Unmarshal(b, v)
}

// coreCountGets makes rdb count the GET commands it sends.
func coreCountGets(rdb *redis.Client) *atomic.Int64 {
	var n atomic.Int64
	rdb.AddHook(processHook{process: func(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
		if cmd.Name() == "get" {
			n.Add(1)
		}
		return next(ctx, cmd)
	}})
	return &n
}

func coreLoadAda(context.Context, string) (coreUser, error) { return coreUser{ID: 1, Name: "Ada"}, nil }

func coreLoadString(v string) func(context.Context, string) (string, error) {
	return func(context.Context, string) (string, error) { return v, nil }
}

// coreCountingLoader returns a loader of v and the number of times it ran.
func coreCountingLoader[V any](v V) (func(context.Context, string) (V, error), *atomic.Int64) {
	var n atomic.Int64
	return func(context.Context, string) (V, error) {
		n.Add(1)
		return v, nil
	}, &n
}

func coreMustNotLoad[V any](t *testing.T) func(context.Context, string) (V, error) {
	return func(_ context.Context, key string) (V, error) {
		t.Errorf("loader called for %q; the value should have come from the cache", key)
		var zero V
		return zero, errors.New("unexpected load")
	}
}

func coreWant[V comparable](t *testing.T, what string, got V, err error, want V) {
	t.Helper()
	if err != nil || got != want {
		t.Fatalf("%s = %v, %v; want %v, nil", what, got, err, want)
	}
}

// ---- 1. L1 holds decoded values ----

func TestL1HitDoesNotDecode(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	codecA, codecB := &coreCountingCodec{}, &coreCountingCodec{}
	a := newCoreCache[coreUser](t, rdb, Options{Codec: codecA})
	b := newCoreCache[coreUser](t, coreOtherClient(t, mr), Options{Namespace: a.opts.Namespace, Codec: codecB})
	u := coreUser{ID: 7, Name: "Grace"}

	if err := a.Set(ctx, "u", u); err != nil {
		t.Fatal(err)
	}
	if n := codecA.unmarshals.Load(); n != 1 {
		t.Errorf("Set decoded %d times; want once (L1 keeps the codec's round trip)", n)
	}
	for range 10 {
		got, err := a.Get(ctx, "u")
		coreWant(t, "writer Get", got, err, u)
	}
	if n := codecA.unmarshals.Load(); n != 1 {
		t.Errorf("writer decoded %d times after 10 hits; an L1 hit must not decode", n-1)
	}

	coreWaitInvalidations(t, b, 1)
	got, err := b.Get(ctx, "u") // L1 miss: decoded once from L2
	coreWant(t, "reader Get", got, err, u)
	coreWaitInL1(t, b, "u")
	before := codecB.unmarshals.Load()
	hits := b.Stats().LocalHits
	for range 10 {
		got, err := b.Get(ctx, "u")
		coreWant(t, "reader Get", got, err, u)
		got, err = b.GetOrLoad(ctx, "u", coreMustNotLoad[coreUser](t))
		coreWant(t, "reader GetOrLoad", got, err, u)
	}
	if n := codecB.unmarshals.Load() - before; n != 0 {
		t.Errorf("reader decoded %d times on L1 hits", n)
	}
	if h := b.Stats().LocalHits - hits; h != 20 {
		t.Errorf("LocalHits grew by %d, want 20", h)
	}
}

func TestL1HitDoesNotAllocate(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[coreUser](t, rdb, Options{})
	if err := c.Set(ctx, "u", coreUser{ID: 1, Name: "Ada"}); err != nil {
		t.Fatal(err)
	}
	hits := c.Stats().LocalHits

	if n := testing.AllocsPerRun(1000, func() {
		if _, err := c.Get(ctx, "u"); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("Get hit: %v allocs, want 0", n)
	}
	if n := testing.AllocsPerRun(1000, func() {
		if _, err := c.GetOrLoad(ctx, "u", coreLoadAda); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("GetOrLoad hit: %v allocs, want 0", n)
	}
	if s := c.Stats(); s.LocalHits-hits != 2002 || s.Loads != 0 {
		t.Errorf("LocalHits grew by %d (want 2002: AllocsPerRun runs once more), Loads %d (want 0)", s.LocalHits-hits, s.Loads)
	}
}

func TestL1NeverServesPastItsTTL(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	start := coreMsNow()
	c, clk := newCoreCacheClock[string](t, rdb, Options{LocalTTL: 10 * time.Second}, start)
	if err := c.Set(ctx, "k", "in L1"); err != nil {
		t.Fatal(err)
	}
	// Change Redis behind the cache's back (no invalidation): what Get
	// returns now tells which tier answered.
	if err := rdb.Set(ctx, coreRedisKey(c, "k"), coreEnvelope("in Redis", start.Add(time.Hour)), 0).Err(); err != nil {
		t.Fatal(err)
	}

	coreWantL1Until(t, c, clk, "k", start.Add(10*time.Second), "in L1", "in Redis")
}

// coreWantL1Until checks that c serves key from L1 (inL1) until just before
// expiry and from Redis (inRedis) at expiry, moving clk.
func coreWantL1Until(t *testing.T, c *Cache[string], clk *clock, key string, expiry time.Time, inL1, inRedis string) {
	t.Helper()
	ctx := context.Background()
	clk.set(expiry.Add(-time.Millisecond))
	got, err := c.Get(ctx, key)
	coreWant(t, key+" just before "+expiry.Format(time.StampMilli), got, err, inL1)
	clk.set(expiry)
	got, err = c.Get(ctx, key)
	coreWant(t, key+" at "+expiry.Format(time.StampMilli), got, err, inRedis)
}

func TestL1EntryFilledFromL2ExpiresWithTheL2Entry(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	start := coreMsNow()
	opts := Options{LocalTTL: time.Hour, RemoteTTLJitter: -1}
	w, _ := newCoreCacheClock[string](t, rdb, opts, start)
	opts.Namespace = w.opts.Namespace
	r, rclk := newCoreCacheClock[string](t, coreOtherClient(t, mr), opts, start)

	if err := w.Set(ctx, "k", "v", WithRemoteTTL(10*time.Second)); err != nil {
		t.Fatal(err)
	}
	coreWaitInvalidations(t, r, 1)
	got, err := r.Get(ctx, "k") // fills r's L1 from L2
	coreWant(t, "reader Get", got, err, "v")
	coreWaitInL1(t, r, "k")

	rclk.set(start.Add(10*time.Second - time.Millisecond))
	hits := r.Stats().LocalHits
	got, err = r.Get(ctx, "k")
	coreWant(t, "reader Get just before the L2 expiry", got, err, "v")
	if r.Stats().LocalHits != hits+1 {
		t.Fatal("reader did not serve the L2-filled entry from L1 before the L2 expiry")
	}

	// The L2 entry expires; the L1 entry (LocalTTL 1h) must go with it.
	mr.FastForward(10 * time.Second)
	rclk.set(start.Add(10 * time.Second))
	if got, err := r.Get(ctx, "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("reader Get after the L2 expiry = %q, %v; want ErrNotFound", got, err)
	}
}

// ---- 2. ristretto's traps ----

func TestSetOfNewKeyIsServedAtOnceDespiteRistrettoBuffering(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	const n = 100
	for i := range n {
		key := "new-" + strconv.Itoa(i)
		if err := c.Set(ctx, key, "v"+strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
		got, err := c.Get(ctx, key)
		coreWant(t, "Get after Set of "+key, got, err, "v"+strconv.Itoa(i))
	}
	if s := c.Stats(); s.LocalHits != n || s.LocalMisses != 0 {
		t.Errorf("LocalHits %d, LocalMisses %d; want %d, 0", s.LocalHits, s.LocalMisses, n)
	}
}

func TestRepeatedSetsOfOneKeyAlwaysServeTheNewestValue(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	for i := range 150 {
		// A fresh key every 3 rounds: ristretto keeps the older of two
		// buffered Sets of a new key.
		key := "k" + strconv.Itoa(i/3)
		want := "v" + strconv.Itoa(i)
		if err := c.Set(ctx, key, want); err != nil {
			t.Fatal(err)
		}
		got, err := c.Get(ctx, key)
		coreWant(t, "Get after Set", got, err, want)
	}
}

func TestDeleteIsNotUndoneByABufferedSet(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	for i := range 100 {
		key := "k" + strconv.Itoa(i)
		if err := c.Set(ctx, key, "v"); err != nil {
			t.Fatal(err)
		}
		if err := c.Delete(ctx, key); err != nil {
			t.Fatal(err)
		}
		if got, err := c.Get(ctx, key); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get after Delete of %s = %q, %v; want ErrNotFound", key, got, err)
		}
	}
}

func TestLoadRacingSetDoesNotOverwriteTheNewerValue(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	started, release := make(chan struct{}), make(chan struct{})
	done := make(chan string)
	go func() {
		v, err := c.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) {
			close(started)
			<-release
			return "loaded before the Set", nil // read from the source before the Set
		})
		if err != nil {
			t.Error(err)
		}
		done <- v
	}()
	<-started
	if err := c.Set(ctx, "k", "set"); err != nil {
		t.Fatal(err)
	}
	close(release)
	<-done // the racing caller may get the loaded value: it asked before the Set returned

	got, err := c.Get(ctx, "k")
	coreWant(t, "Get after both", got, err, "set")
	if raw, _ := rdb.Get(ctx, coreRedisKey(c, "k")).Result(); len(raw) < envelopeHeader || raw[envelopeHeader:] != "set" {
		t.Errorf("Redis holds %q; want the Set's value", raw)
	}
	other := newCoreCache[string](t, coreOtherClient(t, mr), Options{Namespace: c.opts.Namespace})
	got, err = other.Get(ctx, "k")
	coreWant(t, "other instance Get", got, err, "set")
}

func TestRedisReadRacingSetDoesNotOverwriteTheNewerValue(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	read, release := make(chan struct{}), make(chan struct{})
	var block atomic.Bool
	rdb.AddHook(processHook{process: func(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
		err := next(ctx, cmd)
		if cmd.Name() == "get" && block.CompareAndSwap(true, false) {
			close(read) // the reply (the old value) is in; hold it
			<-release
		}
		return err
	}})
	c := newCoreCache[string](t, rdb, Options{})
	w := newCoreCache[string](t, coreOtherClient(t, mr), Options{Namespace: c.opts.Namespace})
	if err := w.Set(ctx, "k", "old"); err != nil {
		t.Fatal(err)
	}

	block.Store(true)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = c.Get(ctx, "k") // L1 miss: reads "old" from Redis
	}()
	<-read
	if err := c.Set(ctx, "k", "new"); err != nil {
		t.Fatal(err)
	}
	close(release) // the stale fill now lands in L1
	<-done

	got, err := c.Get(ctx, "k")
	coreWant(t, "Get after the racing read", got, err, "new")
}

func TestClosedCacheReturnsErrClosed(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	if err := c.Set(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, "k"); !errors.Is(err, ErrClosed) {
		t.Errorf("Get of a key that was in L1: %v, want ErrClosed", err)
	}
	if _, err := c.GetOrLoad(ctx, "k", coreLoadString("x")); !errors.Is(err, ErrClosed) {
		t.Errorf("GetOrLoad: %v, want ErrClosed", err)
	}
	if _, err := c.GetOrLoad(ctx, "cold", coreLoadString("x")); !errors.Is(err, ErrClosed) {
		t.Errorf("GetOrLoad of a cold key: %v, want ErrClosed", err)
	}
	if err := c.Set(ctx, "k", "v2"); !errors.Is(err, ErrClosed) {
		t.Errorf("Set: %v, want ErrClosed", err)
	}
	if err := c.Delete(ctx, "k"); !errors.Is(err, ErrClosed) {
		t.Errorf("Delete: %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v, want nil", err)
	}
	_ = c.Stats()
	if raw, _ := rdb.Get(ctx, coreRedisKey(c, "k")).Result(); !strings.HasSuffix(raw, "v") {
		t.Errorf("Redis holds %q after calls on a closed cache; want the value set before Close", raw)
	}
}

func TestCloseConcurrentWithCallsNeverPanics(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	for range 5 {
		c := newCoreCache[string](t, rdb, Options{})
		for i := range 8 {
			if err := c.Set(ctx, "k"+strconv.Itoa(i), "v"); err != nil {
				t.Fatal(err)
			}
		}
		var wg sync.WaitGroup
		var calls atomic.Int64
		// Each worker calls until it sees ErrClosed; any other error is
		// fine (Close may cut a call short).
		work := func(op func(i int) error) {
			defer wg.Done()
			for i := 0; ; i++ {
				calls.Add(1)
				if errors.Is(op(i), ErrClosed) {
					return
				}
			}
		}
		if err := c.Set(ctx, "hot", "v"); err != nil {
			t.Fatal(err)
		}
		key := func(i int) string { return "k" + strconv.Itoa(i%8) }
		wg.Add(8)
		// L1 hits race Close inside ristretto (its Get can send on a
		// channel Close closes).
		go work(func(int) error { _, err := c.Get(ctx, "hot"); return err })
		go work(func(int) error { _, err := c.GetOrLoad(ctx, "hot", coreLoadString("v")); return err })
		go work(func(i int) error { _, err := c.Get(ctx, key(i)); return err })
		go work(func(i int) error { _, err := c.Get(ctx, key(i+3)); return err })
		go work(func(i int) error { _, err := c.GetOrLoad(ctx, key(i+1), coreLoadString("v")); return err })
		go work(func(i int) error { return c.Set(ctx, key(i+2), "v") })
		go work(func(i int) error { return c.Delete(ctx, key(i+5)) })
		go work(func(i int) error { _, err := c.GetOrLoad(ctx, "new-"+strconv.Itoa(i), coreLoadString("v")); return err })
		waitUntil(t, 5*time.Second, "calls to run", func() bool { return calls.Load() > 300 })
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		stopped := make(chan struct{})
		go func() { wg.Wait(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(10 * time.Second): // a failure bound: calls keep succeeding
			t.Fatal("calls did not start returning ErrClosed after Close")
		}
		if err := c.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	}
}

// ---- 3. Stampede protection ----

func TestConcurrentGetOrLoadOfColdKeyCallsLoaderOnce(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	const n = 100
	var loads atomic.Int64
	release := make(chan struct{})
	load := func(context.Context, string) (string, error) {
		loads.Add(1)
		<-release
		return "v", nil
	}
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := c.GetOrLoad(ctx, "cold", load)
			if err != nil || v != "v" {
				t.Errorf("GetOrLoad = %q, %v", v, err)
			}
		}()
	}
	// Hold the load until every caller has missed L1, so that without
	// de-duplication each of them would have called the loader.
	waitUntil(t, 5*time.Second, "all callers to miss", func() bool { return c.Stats().LocalMisses == n })
	close(release)
	wg.Wait()
	if l := loads.Load(); l != 1 {
		t.Errorf("loader called %d times, want 1", l)
	}
	// Every other caller shared the load, except any that missed L1 but
	// reached the flight after it ended: those found the value in Redis.
	if s := c.Stats(); s.Loads != 1 || s.Shared+s.RemoteHits != n-1 {
		t.Errorf("Loads %d, Shared %d + RemoteHits %d; want 1, %d", s.Loads, s.Shared, s.RemoteHits, n-1)
	}
}

// The caller that starts a flight reads Redis under its own context. If that
// context ends during the read, the callers waiting on the flight must not
// get the leader's context error: the flight reads again for them.
func TestWaitersOutliveALeaderCancelledDuringItsRedisRead(t *testing.T) {
	for _, op := range []struct {
		name string
		call func(c *Cache[string], ctx context.Context) (string, error)
	}{
		{"Get", func(c *Cache[string], ctx context.Context) (string, error) { return c.Get(ctx, "k") }},
		{"GetOrLoad", func(c *Cache[string], ctx context.Context) (string, error) {
			return c.GetOrLoad(ctx, "k", coreMustNotLoad[string](t))
		}},
	} {
		t.Run(op.name, func(t *testing.T) {
			mr, rdb := newMiniredis(t)
			entered := coreBlockCommands(rdb, 1)
			c := newCoreCache[string](t, rdb, Options{})
			w := newCoreCache[string](t, coreOtherClient(t, mr), Options{Namespace: c.opts.Namespace})
			if err := w.Set(context.Background(), "k", "v"); err != nil {
				t.Fatal(err)
			}
			coreWaitInvalidations(t, c, 1)

			leaderCtx, cancel := context.WithCancel(context.WithValue(context.Background(), coreBlockKey{}, true))
			defer cancel()
			leader := make(chan error)
			go func() {
				_, err := op.call(c, leaderCtx)
				leader <- err
			}()
			<-entered
			waiter := make(chan string)
			go func() {
				v, err := op.call(c, context.Background())
				if err != nil {
					t.Errorf("waiter: %v, want the value", err)
				}
				waiter <- v
			}()
			waitUntil(t, 5*time.Second, "the waiter to join the flight", func() bool { return c.Stats().LocalMisses == 2 })

			cancel()
			if err := <-leader; !errors.Is(err, context.Canceled) {
				t.Errorf("leader: %v, want context.Canceled", err)
			}
			if v := <-waiter; v != "v" {
				t.Errorf("waiter got %q, want v", v)
			}
			if s := c.Stats(); s.RemoteErrors != 0 || s.Shared != 1 || s.RemoteHits != 1 {
				t.Errorf("RemoteErrors %d, Shared %d, RemoteHits %d; want 0, 1, 1 (the flight read Redis again for the waiter)",
					s.RemoteErrors, s.Shared, s.RemoteHits)
			}
		})
	}
}

type coreCtxKey struct{}

func TestLoaderIsNotCancelledWhenTheFirstCallerGivesUp(t *testing.T) {
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	started, release := make(chan struct{}), make(chan struct{})
	type observed struct {
		err   error
		value any
	}
	loaderSaw := make(chan observed, 1)
	load := func(ctx context.Context, _ string) (string, error) {
		close(started)
		<-release
		loaderSaw <- observed{ctx.Err(), ctx.Value(coreCtxKey{})}
		return "v", nil
	}

	firstCtx, cancel := context.WithCancel(context.WithValue(context.Background(), coreCtxKey{}, "trace-1"))
	defer cancel()
	first := make(chan error)
	go func() {
		_, err := c.GetOrLoad(firstCtx, "k", load)
		first <- err
	}()
	<-started
	second := make(chan string)
	go func() {
		v, err := c.GetOrLoad(context.Background(), "k", coreMustNotLoad[string](t))
		if err != nil {
			t.Errorf("second caller: %v", err)
		}
		second <- v
	}()
	waitUntil(t, 5*time.Second, "second caller to miss", func() bool { return c.Stats().LocalMisses == 2 })

	cancel()
	// The first caller returns while the loader is still blocked.
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("first caller after cancel: %v, want context.Canceled", err)
	}
	close(release)
	saw := <-loaderSaw
	if saw.err != nil {
		t.Errorf("loader's context was cancelled (%v) by the first caller", saw.err)
	}
	if saw.value != "trace-1" {
		t.Errorf("loader's context lost the caller's values: %v", saw.value)
	}
	if v := <-second; v != "v" {
		t.Errorf("second caller got %q, want the loaded value", v)
	}
	got, err := c.GetOrLoad(context.Background(), "k", coreMustNotLoad[string](t))
	coreWant(t, "GetOrLoad after the load", got, err, "v")
}

func TestLoaderPanicBecomesErrLoaderPanicForEveryWaiter(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	const n = 10
	release := make(chan struct{})
	var calls atomic.Int64
	load := func(context.Context, string) (string, error) {
		calls.Add(1)
		<-release
		panic("boom")
	}
	errs := make(chan error, n)
	for range n {
		go func() {
			_, err := c.GetOrLoad(ctx, "k", load)
			errs <- err
		}()
	}
	waitUntil(t, 5*time.Second, "all callers to miss", func() bool { return c.Stats().LocalMisses == n })
	close(release)
	for range n {
		if err := <-errs; !errors.Is(err, ErrLoaderPanic) || !strings.Contains(err.Error(), "boom") {
			t.Errorf("waiter got %v, want an error wrapping ErrLoaderPanic with the panic value", err)
		}
	}
	// One call, unless a caller reached the flight after it ended (then it
	// loads, and panics, again).
	if s := c.Stats(); s.LoadPanics == 0 || s.LoadPanics != uint64(calls.Load()) || s.LoadErrors != s.LoadPanics {
		t.Errorf("LoadPanics %d, LoadErrors %d; want both = loader calls (%d)", s.LoadPanics, s.LoadErrors, calls.Load())
	}
	// The panic was not cached: the next call loads again.
	got, err := c.GetOrLoad(ctx, "k", coreLoadString("v"))
	coreWant(t, "GetOrLoad after the panic", got, err, "v")
}

func TestLoaderErrorsAreNotCached(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	boom := errors.New("database down")
	var calls atomic.Int64
	load := func(context.Context, string) (string, error) {
		calls.Add(1)
		return "", boom
	}
	for i := 1; i <= 2; i++ {
		if _, err := c.GetOrLoad(ctx, "k", load); !errors.Is(err, boom) {
			t.Fatalf("call %d: %v, want the loader's error", i, err)
		}
		if calls.Load() != int64(i) {
			t.Fatalf("after call %d the loader ran %d times: its error was cached", i, calls.Load())
		}
	}
	if s := c.Stats(); s.LoadErrors != 2 {
		t.Errorf("LoadErrors = %d, want 2", s.LoadErrors)
	}
	if n, _ := rdb.Exists(ctx, coreRedisKey(c, "k")).Result(); n != 0 {
		t.Error("a loader error was written to Redis")
	}
}

func TestLoaderNotFoundIsRememberedInBothTiersForNegativeTTL(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	opts := Options{NegativeTTL: 30 * time.Second, RemoteTTLJitter: -1}
	c := newCoreCache[string](t, rdb, opts)
	var calls atomic.Int64
	load := func(_ context.Context, key string) (string, error) {
		calls.Add(1)
		return "", fmt.Errorf("row %s: %w", key, ErrNotFound)
	}
	if _, err := c.GetOrLoad(ctx, "missing", load); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetOrLoad: %v, want ErrNotFound", err)
	}
	if _, err := c.GetOrLoad(ctx, "missing", load); !errors.Is(err, ErrNotFound) || calls.Load() != 1 {
		t.Fatalf("second GetOrLoad: %v after %d loads; want ErrNotFound after 1", err, calls.Load())
	}
	if _, err := c.Get(ctx, "missing"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get: %v, want ErrNotFound", err)
	}

	raw, err := rdb.Get(ctx, coreRedisKey(c, "missing")).Bytes()
	if err != nil {
		t.Fatalf("Redis has no negative entry: %v", err)
	}
	if env, err := decodeEnvelope([]byte(raw)); err != nil || env.kind != kindNotFound {
		t.Errorf("Redis holds %q; want a not-found envelope", raw)
	}
	if ttl := mr.TTL(coreRedisKey(c, "missing")); ttl != 30*time.Second {
		t.Errorf("negative entry TTL in Redis = %v, want NegativeTTL (30s)", ttl)
	}

	opts.Namespace = c.opts.Namespace
	other := newCoreCache[string](t, coreOtherClient(t, mr), opts)
	if _, err := other.GetOrLoad(ctx, "missing", coreMustNotLoad[string](t)); !errors.Is(err, ErrNotFound) {
		t.Errorf("other instance GetOrLoad: %v, want ErrNotFound from Redis", err)
	}
	if _, err := other.Get(ctx, "missing"); !errors.Is(err, ErrNotFound) {
		t.Errorf("other instance Get: %v, want ErrNotFound", err)
	}
	if s := other.Stats(); s.RemoteHits == 0 {
		t.Error("other instance did not count the remembered not-found as a remote hit")
	}
}

func TestLoaderNotFoundIsNotRememberedWithoutNegativeTTL(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	var calls atomic.Int64
	load := func(context.Context, string) (string, error) {
		calls.Add(1)
		return "", ErrNotFound
	}
	for i := 1; i <= 2; i++ {
		if _, err := c.GetOrLoad(ctx, "missing", load); !errors.Is(err, ErrNotFound) {
			t.Fatalf("call %d: %v, want ErrNotFound", i, err)
		}
	}
	if calls.Load() != 2 {
		t.Errorf("loader ran %d times, want 2: not-found was remembered", calls.Load())
	}
	if n, _ := rdb.Exists(ctx, coreRedisKey(c, "missing")).Result(); n != 0 {
		t.Error("not-found was written to Redis")
	}
	if s := c.Stats(); s.LoadErrors != 0 {
		t.Errorf("LoadErrors = %d; ErrNotFound is an answer, not an error", s.LoadErrors)
	}
}

func TestLoadTimeoutBoundsTheLoaderContext(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	const timeout = 50 * time.Millisecond
	c := newCoreCache[string](t, rdb, Options{LoadTimeout: timeout})
	type seen struct {
		called, deadline time.Time
		hasDeadline      bool
	}
	seenCh := make(chan seen, 1)
	load := func(ctx context.Context, _ string) (string, error) {
		d, ok := ctx.Deadline()
		seenCh <- seen{time.Now(), d, ok}
		select { // a loader that only stops when told to
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(10 * time.Second): // a failure bound, not a wait
			return "", errors.New("the loader's context was never done")
		}
	}
	_, err := c.GetOrLoad(ctx, "k", load)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("GetOrLoad: %v, want the loader's context.DeadlineExceeded", err)
	}
	if l := <-seenCh; !l.hasDeadline || l.deadline.After(l.called.Add(timeout)) {
		t.Errorf("loader context deadline %v (set: %v); want within LoadTimeout of the call at %v", l.deadline, l.hasDeadline, l.called)
	}
	if s := c.Stats(); s.RemoteErrors != 0 {
		t.Errorf("RemoteErrors = %d; a load timeout is not a Redis failure", s.RemoteErrors)
	}
}

// ---- 4. Fail-open ----

func TestGetOrLoadFailsOpenWhenRedisIsDown(t *testing.T) {
	ctx := context.Background()
	mr, rdb := coreOutageMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	mr.Close()
	// Values loaded during an outage are kept in L1 until the subscription
	// is healthy again; wait for it to notice the outage, so the fill below
	// is not one that began just before.
	waitUntil(t, 5*time.Second, "subscription to notice the outage", func() bool { return !c.sub.healthy() })

	load, calls := coreCountingLoader("v")
	got, err := c.GetOrLoad(ctx, "k", load)
	coreWant(t, "GetOrLoad with Redis down", got, err, "v")
	if s := c.Stats(); s.RemoteErrors == 0 {
		t.Error("RemoteErrors not counted")
	}
	got, err = c.GetOrLoad(ctx, "k", load)
	coreWant(t, "second GetOrLoad with Redis down", got, err, "v")
	if calls.Load() != 1 {
		t.Errorf("loader ran %d times; the second call should be served by L1", calls.Load())
	}
	got, err = c.Get(ctx, "k")
	coreWant(t, "Get with Redis down", got, err, "v")
}

func TestSetWhenRedisIsDownReturnsErrorAndKeepsNothingInL1(t *testing.T) {
	ctx := context.Background()
	mr, rdb := coreOutageMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	if err := c.Set(ctx, "k", "old"); err != nil {
		t.Fatal(err)
	}
	mr.Close()
	for _, key := range []string{"k", "fresh"} {
		err := c.Set(ctx, key, "new")
		if !errors.Is(err, ErrRemoteUnavailable) {
			t.Fatalf("Set(%s) with Redis down: %v, want ErrRemoteUnavailable", key, err)
		}
		got, err := c.Get(ctx, key)
		if got == "new" || !errors.Is(err, ErrRemoteUnavailable) {
			t.Errorf("Get(%s) after the failed Set = %q, %v; want ErrRemoteUnavailable (L1 must not hold what Redis lacks)", key, got, err)
		}
	}
	if s := c.Stats(); s.RemoteErrors == 0 {
		t.Error("RemoteErrors not counted")
	}

	// Redis never took the write: once it is back, the old value is served.
	if err := mr.Restart(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "Get to answer from Redis again", func() bool {
		v, err := c.Get(ctx, "k")
		return err == nil && v == "old"
	})
}

func TestDeleteWhenRedisIsDownReturnsErrorAndDropsL1(t *testing.T) {
	ctx := context.Background()
	mr, rdb := coreOutageMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	if err := c.Set(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	mr.Close()
	if err := c.Delete(ctx, "k"); !errors.Is(err, ErrRemoteUnavailable) {
		t.Fatalf("Delete with Redis down: %v, want ErrRemoteUnavailable", err)
	}
	if got, err := c.Get(ctx, "k"); !errors.Is(err, ErrRemoteUnavailable) {
		t.Errorf("Get after the failed Delete = %q, %v; want ErrRemoteUnavailable, not an L1 hit", got, err)
	}
}

func TestGetWithL1MissAndRedisDownIsRemoteUnavailableNotNotFound(t *testing.T) {
	ctx := context.Background()
	mr, rdb := coreOutageMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	mr.Close()
	for range 2 { // the first reaches Redis, the second the open breaker
		_, err := c.Get(ctx, "k")
		if !errors.Is(err, ErrRemoteUnavailable) || errors.Is(err, ErrNotFound) {
			t.Fatalf("Get: %v; want ErrRemoteUnavailable and not ErrNotFound", err)
		}
		var opErr *net.OpError
		if !errors.As(err, &opErr) && !errors.Is(err, io.EOF) {
			t.Errorf("Get: %v; want it to wrap the connection error", err)
		}
	}
}

func TestNewWithRedisUnreachableStartsFailOpenAndConnectsLater(t *testing.T) {
	ctx := context.Background()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	rdb := coreFastFailClient(t, addr)
	c, err := New[string](Options{Redis: rdb, Namespace: uniqueNamespace(t), HeartbeatInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatalf("New with Redis unreachable: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })

	load, calls := coreCountingLoader("loaded")
	got, err := c.GetOrLoad(ctx, "k", load)
	coreWant(t, "GetOrLoad with Redis unreachable", got, err, "loaded")
	got, err = c.GetOrLoad(ctx, "k", load)
	coreWant(t, "second GetOrLoad", got, err, "loaded")
	if calls.Load() != 1 {
		t.Errorf("loader ran %d times; the second call should be served by L1", calls.Load())
	}
	if s := c.Stats(); s.RemoteErrors == 0 {
		t.Error("RemoteErrors not counted")
	}

	mr := miniredis.NewMiniRedis()
	if err := mr.StartAddr(addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(mr.Close)
	waitUntil(t, 10*time.Second, "the cache to connect", func() bool { return c.ready.Load() && c.sub.healthy() })
	// What was loaded while Redis was unreachable is not served from L1
	// any more: Redis never got it. (Get may first meet the breaker, still
	// open from the outage.)
	waitUntil(t, 10*time.Second, "Get to ask Redis again", func() bool {
		got, err := c.Get(ctx, "k")
		if err == nil {
			t.Fatalf("Get of the key loaded during the outage = %q from L1; want ErrNotFound from Redis", got)
		}
		return errors.Is(err, ErrNotFound)
	})
	w := newCoreCache[string](t, coreOtherClient(t, mr), Options{Namespace: c.opts.Namespace})
	if err := w.Set(ctx, "k2", "from another instance"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "a remote hit", func() bool {
		v, err := c.Get(ctx, "k2")
		return err == nil && v == "from another instance"
	})
	if s := c.Stats(); s.RemoteHits == 0 {
		t.Error("RemoteHits not counted")
	}
}

// ---- 5. Bad input ----

func TestEmptyKeyIsInvalidEverywhere(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	load, calls := coreCountingLoader("v")
	if _, err := c.Get(ctx, ""); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Get: %v", err)
	}
	if _, err := c.GetOrLoad(ctx, "", load); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("GetOrLoad: %v", err)
	}
	if err := c.Set(ctx, "", "v"); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Set: %v", err)
	}
	if err := c.Delete(ctx, ""); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Delete: %v", err)
	}
	if err := c.Set(ctx, "ok", "v"); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, "ok", ""); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Delete with one empty key: %v", err)
	}
	got, err := c.Get(ctx, "ok")
	coreWant(t, "Get of a key named with an empty one in a rejected Delete", got, err, "v")
	if calls.Load() != 0 {
		t.Error("loader called for an empty key")
	}
	if keys, _ := rdb.Keys(ctx, c.opts.Namespace+":*").Result(); len(keys) != 1 {
		t.Errorf("Redis holds keys %q, want 1", keys)
	}
}

func TestNewRejectsInvalidOptions(t *testing.T) {
	_, rdb := newMiniredis(t)
	for name, opts := range map[string]Options{
		"nil Redis":                  {Namespace: "ns"},
		"empty Namespace":            {Redis: rdb},
		"negative LocalMaxBytes":     {Redis: rdb, Namespace: "ns", LocalMaxBytes: -1},
		"negative LocalTTL":          {Redis: rdb, Namespace: "ns", LocalTTL: -time.Second},
		"negative RemoteTTL":         {Redis: rdb, Namespace: "ns", RemoteTTL: -time.Second},
		"negative NegativeTTL":       {Redis: rdb, Namespace: "ns", NegativeTTL: -time.Second},
		"negative LoadTimeout":       {Redis: rdb, Namespace: "ns", LoadTimeout: -time.Second},
		"negative HeartbeatInterval": {Redis: rdb, Namespace: "ns", HeartbeatInterval: -time.Second},
		"RemoteTTLJitter 1":          {Redis: rdb, Namespace: "ns", RemoteTTLJitter: 1},
		"RemoteTTLJitter 1.5":        {Redis: rdb, Namespace: "ns", RemoteTTLJitter: 1.5},
	} {
		c, err := New[string](opts)
		if !errors.Is(err, ErrInvalidOption) || c != nil {
			t.Errorf("%s: New = %v, %v; want nil, ErrInvalidOption", name, c, err)
		}
	}
}

func TestNegativeItemTTLIsInvalid(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	load, calls := coreCountingLoader("v")
	for name, o := range map[string]ItemOption{
		"WithLocalTTL":  WithLocalTTL(-time.Second),
		"WithRemoteTTL": WithRemoteTTL(-time.Second),
	} {
		if err := c.Set(ctx, "k", "v", o); !errors.Is(err, ErrInvalidOption) {
			t.Errorf("Set %s(-1s): %v, want ErrInvalidOption", name, err)
		}
		if _, err := c.GetOrLoad(ctx, "k", load, o); !errors.Is(err, ErrInvalidOption) {
			t.Errorf("GetOrLoad %s(-1s): %v, want ErrInvalidOption", name, err)
		}
	}
	if calls.Load() != 0 {
		t.Error("loader called despite an invalid option")
	}
	if _, err := c.Get(ctx, "k"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after rejected calls: %v, want ErrNotFound", err)
	}
}

func TestUnencodableValueIsNotStoredInEitherTier(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	c := newCoreCache[coreDoc](t, rdb, Options{})
	good := coreDoc{Name: "good"}
	if err := c.Set(ctx, "k", good); err != nil {
		t.Fatal(err)
	}
	rawBefore, _ := rdb.Get(ctx, coreRedisKey(c, "k")).Result()

	err := c.Set(ctx, "k", coreDoc{Name: "bad", Extra: make(chan int)})
	if !errors.Is(err, ErrEncode) {
		t.Fatalf("Set of a value with a channel: %v, want ErrEncode", err)
	}
	if got, err := c.Get(ctx, "k"); err != nil || got.Name != "good" {
		t.Errorf("Get after the failed Set = %+v, %v; want the old value", got, err)
	}
	if raw, _ := rdb.Get(ctx, coreRedisKey(c, "k")).Result(); raw != rawBefore {
		t.Errorf("Redis changed from %q to %q", rawBefore, raw)
	}
	other := newCoreCache[coreDoc](t, coreOtherClient(t, mr), Options{Namespace: c.opts.Namespace})
	if got, err := other.Get(ctx, "k"); err != nil || got.Name != "good" {
		t.Errorf("other instance Get = %+v, %v; want the old value", got, err)
	}
	if s := c.Stats(); s.EncodeErrors != 1 || s.InvalidationsPublished != 1 {
		t.Errorf("EncodeErrors %d, InvalidationsPublished %d; want 1, 1 (the failed Set publishes nothing)", s.EncodeErrors, s.InvalidationsPublished)
	}
}

func TestValueLargerThanL1BudgetLivesInRedisOnly(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{LocalMaxBytes: 4096})
	big := strings.Repeat("x", 8192)
	if err := c.Set(ctx, "big", big); err != nil {
		t.Fatalf("Set of a value larger than L1: %v", err)
	}
	if s := c.Stats(); s.LocalTooLarge != 1 {
		t.Errorf("LocalTooLarge = %d, want 1", s.LocalTooLarge)
	}
	got, err := c.Get(ctx, "big")
	coreWant(t, "Get", got, err, big)
	if s := c.Stats(); s.LocalHits != 0 || s.RemoteHits != 1 || s.LocalTooLarge != 2 {
		t.Errorf("LocalHits %d, RemoteHits %d, LocalTooLarge %d; want 0, 1, 2 (served by Redis, not kept in L1)", s.LocalHits, s.RemoteHits, s.LocalTooLarge)
	}
	// A small value still goes to L1.
	if err := c.Set(ctx, "small", "s"); err != nil {
		t.Fatal(err)
	}
	got, err = c.Get(ctx, "small")
	coreWant(t, "Get small", got, err, "s")
	if s := c.Stats(); s.LocalHits != 1 {
		t.Errorf("LocalHits = %d, want 1", s.LocalHits)
	}
}

func TestCorruptValueInRedisIsAMissAndIsOverwrittenByTheLoad(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[coreUser](t, rdb, Options{})
	far := time.Now().Add(time.Hour)
	foreign := map[string]string{
		"text":        "written by someone else",
		"bad payload": coreEnvelope("{not json", far),
		"bad kind":    "\x01\x07" + coreEnvelope("", far)[2:],
		"short":       "\x01",
	}
	for key, raw := range foreign {
		if err := rdb.Set(ctx, coreRedisKey(c, key), raw, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	for key := range foreign {
		before := c.Stats()
		got, err := c.GetOrLoad(ctx, key, coreLoadAda)
		coreWant(t, "GetOrLoad of "+key, got, err, coreUser{ID: 1, Name: "Ada"})
		s := c.Stats()
		if s.CorruptValues != before.CorruptValues+1 || s.Loads != before.Loads+1 {
			t.Errorf("%s: CorruptValues +%d, Loads +%d; want +1, +1", key, s.CorruptValues-before.CorruptValues, s.Loads-before.Loads)
		}
		raw, _ := rdb.Get(ctx, coreRedisKey(c, key)).Bytes()
		env, err := decodeEnvelope([]byte(raw))
		kind, payload := env.kind, env.payload
		if err != nil || kind != kindValue || string(payload) != `{"ID":1,"Name":"Ada"}` {
			t.Errorf("%s: Redis holds %q after the load; want the loaded value's envelope", key, raw)
		}
	}
}

// The load that replaces a corrupt value must not replace a value that a
// Set wrote while it ran: that one is newer.
func TestLoadReplacingACorruptValueLosesToASetDuringTheLoad(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	w := newCoreCache[string](t, coreOtherClient(t, mr), Options{Namespace: c.opts.Namespace})
	if err := rdb.Set(ctx, coreRedisKey(c, "k"), "written by someone else", 0).Err(); err != nil {
		t.Fatal(err)
	}
	loading, release := make(chan struct{}), make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		v, err := c.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) {
			close(loading)
			<-release
			return "loaded", nil
		})
		if err != nil || v != "loaded" {
			t.Errorf("GetOrLoad = %q, %v; want the loaded value", v, err)
		}
	}()
	<-loading
	if err := w.Set(ctx, "k", "set"); err != nil {
		t.Fatal(err)
	}
	close(release)
	<-done
	raw, _ := rdb.Get(ctx, coreRedisKey(c, "k")).Bytes()
	if payload, err := envelopePayload(raw); err != nil || string(payload) != "set" {
		t.Errorf("Redis holds %q after the load; want the Set's value", raw)
	}
	got, err := c.GetOrLoad(ctx, "k", coreMustNotLoad[string](t))
	coreWant(t, "GetOrLoad after the load", got, err, "set")
}

func TestCorruptValueInRedisIsNotFoundForGet(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[coreUser](t, rdb, Options{})
	if err := rdb.Set(ctx, coreRedisKey(c, "k"), "not ours", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Get(ctx, "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get = %+v, %v; want ErrNotFound", got, err)
	}
	if s := c.Stats(); s.CorruptValues != 1 || s.RemoteErrors != 0 {
		t.Errorf("CorruptValues %d, RemoteErrors %d; want 1, 0", s.CorruptValues, s.RemoteErrors)
	}
	if raw, _ := rdb.Get(ctx, coreRedisKey(c, "k")).Result(); raw != "not ours" {
		t.Errorf("Get changed Redis to %q; only a load may overwrite", raw)
	}
}

func TestCancelledContextReturnsContextErrorNotRedisError(t *testing.T) {
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	load, calls := coreCountingLoader("v")
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	expired, cancel2 := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel2()
	for _, tc := range []struct {
		ctx  context.Context
		want error
	}{{cancelled, context.Canceled}, {expired, context.DeadlineExceeded}} {
		check := func(op string, err error) {
			t.Helper()
			if !errors.Is(err, tc.want) || errors.Is(err, ErrRemoteUnavailable) {
				t.Errorf("%s with a done context: %v, want %v", op, err, tc.want)
			}
		}
		_, err := c.Get(tc.ctx, "k")
		check("Get", err)
		_, err = c.GetOrLoad(tc.ctx, "k", load)
		check("GetOrLoad", err)
		check("Set", c.Set(tc.ctx, "k", "v"))
		check("Delete", c.Delete(tc.ctx, "k"))
	}
	if calls.Load() != 0 {
		t.Error("loader called with a done context")
	}
	if s := c.Stats(); s.RemoteErrors != 0 {
		t.Errorf("RemoteErrors = %d, want 0", s.RemoteErrors)
	}
}

type coreBlockKey struct{}

// coreBlockCommands makes the first n commands on rdb (all if n < 0) whose
// context carries coreBlockKey behave like a Redis that does not answer:
// they wait for the context. Each sends its name on the returned channel
// when it starts waiting.
func coreBlockCommands(rdb *redis.Client, n int64) <-chan string {
	var blocked atomic.Int64
	entered := make(chan string, 1)
	rdb.AddHook(processHook{process: func(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
		if ctx.Value(coreBlockKey{}) != nil && (n < 0 || blocked.Add(1) <= n) {
			entered <- cmd.Name()
			<-ctx.Done()
			cmd.SetErr(ctx.Err())
			return ctx.Err()
		}
		return next(ctx, cmd)
	}})
	return entered
}

func TestContextCancelledDuringRedisCallIsNotARedisError(t *testing.T) {
	mr, rdb := newMiniredis(t)
	entered := coreBlockCommands(rdb, -1)
	c := newCoreCache[string](t, rdb, Options{})
	w := newCoreCache[string](t, coreOtherClient(t, mr), Options{Namespace: c.opts.Namespace})
	if err := w.Set(context.Background(), "k", "old"); err != nil {
		t.Fatal(err)
	}

	for _, op := range []struct {
		name string
		call func(ctx context.Context) error
	}{
		{"Set", func(ctx context.Context) error { return c.Set(ctx, "k", "new") }},
		{"Delete", func(ctx context.Context) error { return c.Delete(ctx, "k") }},
	} {
		ctx, cancel := context.WithCancel(context.WithValue(context.Background(), coreBlockKey{}, true))
		res := make(chan error)
		go func() { res <- op.call(ctx) }()
		var err error
		select {
		case <-entered:
			cancel()
			err = <-res
		case err = <-res:
			cancel()
			t.Errorf("%s returned %v without asking Redis", op.name, err)
		}
		if !errors.Is(err, context.Canceled) || errors.Is(err, ErrRemoteUnavailable) {
			t.Errorf("%s cancelled during the Redis call: %v, want context.Canceled", op.name, err)
		}
	}
	if s := c.Stats(); s.RemoteErrors != 0 {
		t.Errorf("RemoteErrors = %d, want 0", s.RemoteErrors)
	}
	// Nothing opened the breaker: Redis is asked at once.
	if err := c.Set(context.Background(), "k", "after"); err != nil {
		t.Fatalf("Set after the cancellations: %v", err)
	}
	if raw, _ := rdb.Get(context.Background(), coreRedisKey(c, "k")).Result(); len(raw) < envelopeHeader || raw[envelopeHeader:] != "after" {
		t.Errorf("Redis holds %q, want the last Set's value", raw)
	}
}

// ---- 6. Read-your-writes ----

func TestSetThenGetServesOwnWriteFromL1(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	gets := coreCountGets(rdb)
	c := newCoreCache[coreUser](t, rdb, Options{})
	w := newCoreCache[coreUser](t, coreOtherClient(t, mr), Options{Namespace: c.opts.Namespace})
	if err := w.Set(ctx, "u", coreUser{ID: 1, Name: "old"}); err != nil {
		t.Fatal(err)
	}
	coreWaitInvalidations(t, c, 1)
	if _, err := c.Get(ctx, "u"); err != nil { // L1 now holds the old value
		t.Fatal(err)
	}
	for i := range 50 {
		want := coreUser{ID: i, Name: "new"}
		if err := c.Set(ctx, "u", want); err != nil {
			t.Fatal(err)
		}
		g, hits := gets.Load(), c.Stats().LocalHits
		got, err := c.Get(ctx, "u")
		coreWant(t, "Get after Set", got, err, want)
		if gets.Load() != g || c.Stats().LocalHits != hits+1 {
			t.Fatalf("round %d: the own write was not served from L1 (Redis GETs +%d, LocalHits +%d)", i, gets.Load()-g, c.Stats().LocalHits-hits)
		}
	}
}

// A fill of a key that L1 does not hold yet (a Get or GetOrLoad reading
// Redis) is a buffered ristretto Set; Set's own write to L1, if it comes
// while that is still buffered, is a second buffered Set of the same new key,
// and ristretto keeps the older one. The own write must still win. (White
// box: the two L1 writes in the order that loses in ristretto, which a
// cache-level test can produce only by chance.)
func TestOwnWriteWinsOverABufferedFillOfTheSameKey(t *testing.T) {
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{})
	far := c.clock.now() + int64(time.Hour)
	for i := range 100 {
		key := "k" + strconv.Itoa(i)
		t0 := c.local.begin(key)
		fill := &entry[string]{value: "fill", expires: far, check: t0.check, gen: t0.gen, epoch: t0.epoch, cost: 1}
		c.local.hand(map[uint64]*entry[string]{t0.hash: fill})
		own := &entry[string]{value: "own", expires: far, version: 1, cost: 1}
		c.local.wrote(c.local.begin(key), own)
		if e, ok := c.local.get(key); !ok || e != own {
			t.Fatalf("%s: L1 serves %+v (ok %v) after the own write; want the own write", key, e, ok)
		}
	}
}

func TestL1TTLPrecedencePerCallOverFuncOverDefault(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	start := coreMsNow()
	c, clk := newCoreCacheClock[string](t, rdb, Options{
		LocalTTL: time.Minute,
		LocalTTLFunc: func(key string) time.Duration {
			if strings.HasPrefix(key, "short:") {
				return 10 * time.Second
			}
			return 0
		},
	}, start)
	k := slotApart(c, "short:call", "long:call", "short:func", "long:default", "loaded")
	writes := []struct {
		key  string
		opts []ItemOption
		ttl  time.Duration
	}{
		{k[0], []ItemOption{WithLocalTTL(3 * time.Second)}, 3 * time.Second},
		{k[1], []ItemOption{WithLocalTTL(5 * time.Second)}, 5 * time.Second},
		{k[2], nil, 10 * time.Second},
		{k[3], nil, time.Minute},
	}
	for _, w := range writes {
		if err := c.Set(ctx, w.key, "L1", w.opts...); err != nil {
			t.Fatal(err)
		}
		// Redis gets a different value behind the cache's back, so a read
		// shows which tier answered.
		if err := rdb.Set(ctx, coreRedisKey(c, w.key), coreEnvelope("Redis", start.Add(time.Hour)), 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	for _, w := range writes {
		coreWantL1Until(t, c, clk, w.key, start.Add(w.ttl), "L1", "Redis")
	}

	// GetOrLoad's per-call L1 TTL applies to what it loads.
	now := start.Add(2 * time.Minute)
	clk.set(now)
	if _, err := c.GetOrLoad(ctx, k[4], coreLoadString("L1"), WithLocalTTL(2*time.Second)); err != nil {
		t.Fatal(err)
	}
	coreWaitInL1(t, c, k[4])
	if err := rdb.Set(ctx, coreRedisKey(c, k[4]), coreEnvelope("Redis", now.Add(time.Hour)), 0).Err(); err != nil {
		t.Fatal(err)
	}
	coreWantL1Until(t, c, clk, k[4], now.Add(2*time.Second), "L1", "Redis")
}

// slotApart returns names, each with one suffix that puts no two of them
// in one of c's generation slots. L1 keeps generations and the versions it
// heard per slot, so a write's message that overtakes its reply drops a
// slot neighbour's entry (a miss, never a stale hit); a test of how long
// each of several keys stays in L1 must not see that.
func slotApart[V any](c *Cache[V], names ...string) []string {
	slots := uint64(len(c.local.gens))
	for suffix := 0; ; suffix++ {
		out := make([]string, len(names))
		used := make(map[uint64]bool)
		for i, n := range names {
			out[i] = n + "#" + strconv.Itoa(suffix)
			used[c.local.hash(out[i])&(slots-1)] = true
		}
		if len(used) == len(names) {
			return out
		}
	}
}

func TestGetOrLoadWritesBackToRedisBeforeReturning(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	c := newCoreCache[coreUser](t, rdb, Options{})
	got, err := c.GetOrLoad(ctx, "u", coreLoadAda)
	coreWant(t, "GetOrLoad", got, err, coreUser{ID: 1, Name: "Ada"})

	raw, err := rdb.Get(ctx, coreRedisKey(c, "u")).Bytes()
	if err != nil {
		t.Fatalf("Redis has no value right after GetOrLoad returned: %v", err)
	}
	env, err := decodeEnvelope([]byte(raw))
	kind, payload := env.kind, env.payload
	if err != nil || kind != kindValue || string(payload) != `{"ID":1,"Name":"Ada"}` {
		t.Errorf("Redis holds %q; want an envelope of the loaded value", raw)
	}
	other := newCoreCache[coreUser](t, coreOtherClient(t, mr), Options{Namespace: c.opts.Namespace})
	got, err = other.GetOrLoad(ctx, "u", coreMustNotLoad[coreUser](t))
	coreWant(t, "other instance GetOrLoad", got, err, coreUser{ID: 1, Name: "Ada"})
	if s := other.Stats(); s.RemoteHits != 1 || s.Loads != 0 {
		t.Errorf("other instance RemoteHits %d, Loads %d; want 1, 0", s.RemoteHits, s.Loads)
	}
}

// ---- 7. Errors a caller can act on ----

func TestUnencodableLoadedValueIsReturnedButNotCached(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[coreDoc](t, rdb, Options{})
	ch := make(chan int)
	load, calls := coreCountingLoader(coreDoc{Name: "doc", Extra: ch})
	for i := 1; i <= 2; i++ {
		got, err := c.GetOrLoad(ctx, "k", load)
		if err != nil || got.Name != "doc" || got.Extra != any(ch) {
			t.Fatalf("call %d = %+v, %v; want the loaded value and no error", i, got, err)
		}
		if calls.Load() != int64(i) {
			t.Fatalf("loader ran %d times after %d calls: the value was cached", calls.Load(), i)
		}
	}
	if s := c.Stats(); s.EncodeErrors != 2 {
		t.Errorf("EncodeErrors = %d, want 2", s.EncodeErrors)
	}
	if n, _ := rdb.Exists(ctx, coreRedisKey(c, "k")).Result(); n != 0 {
		t.Error("something was written to Redis")
	}
}

// ---- 8. TTL jitter ----

func TestRemoteTTLIsJitteredWithinTenPercentByDefault(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{RemoteTTL: 100 * time.Second})
	ttls := map[time.Duration]bool{}
	for i := range 100 {
		key := "k" + strconv.Itoa(i)
		var err error
		if i%2 == 0 {
			err = c.Set(ctx, key, "v")
		} else {
			_, err = c.GetOrLoad(ctx, key, coreLoadString("v"))
		}
		if err != nil {
			t.Fatal(err)
		}
		ttl, err := rdb.PTTL(ctx, coreRedisKey(c, key)).Result()
		if err != nil {
			t.Fatal(err)
		}
		if ttl < 90*time.Second || ttl > 100*time.Second {
			t.Errorf("%s: TTL %v outside [90s, 100s]", key, ttl)
		}
		ttls[ttl] = true
	}
	if len(ttls) < 50 {
		t.Errorf("only %d distinct TTLs among 100 keys written together", len(ttls))
	}
}

func TestRemoteTTLJitterCanBeDisabled(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{RemoteTTL: 100 * time.Second, RemoteTTLJitter: -1})
	for i := range 20 {
		key := "k" + strconv.Itoa(i)
		if err := c.Set(ctx, key, "v", WithRemoteTTL(50*time.Second)); err != nil {
			t.Fatal(err)
		}
		if ttl, _ := rdb.PTTL(ctx, coreRedisKey(c, key)).Result(); ttl < 50*time.Second-time.Millisecond || ttl > 50*time.Second {
			t.Errorf("%s: TTL %v, want 50s", key, ttl)
		}
	}
}

// ---- Values, codecs, counters ----

func TestStringAndBytesBypassTheCodec(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	codec := &coreCountingCodec{}
	s := newCoreCache[string](t, rdb, Options{Codec: codec})
	b := newCoreCache[[]byte](t, rdb, Options{Codec: codec})
	const text = `say "hi"` // JSON would quote and escape it
	if err := s.Set(ctx, "k", text); err != nil {
		t.Fatal(err)
	}
	if err := b.Set(ctx, "k", []byte(text)); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{coreRedisKey(s, "k"), coreRedisKey(b, "k")} {
		raw, _ := rdb.Get(ctx, key).Bytes()
		if len(raw) < envelopeHeader || string(raw[envelopeHeader:]) != text {
			t.Errorf("%s: Redis payload %q, want the raw string", key, raw)
		}
	}
	// Another instance reads them back without the codec.
	s2 := newCoreCache[string](t, coreOtherClient(t, mr), Options{Namespace: s.opts.Namespace, Codec: codec})
	b2 := newCoreCache[[]byte](t, coreOtherClient(t, mr), Options{Namespace: b.opts.Namespace, Codec: codec})
	got, err := s2.Get(ctx, "k")
	coreWant(t, "string Get", got, err, text)
	gotB, err := b2.Get(ctx, "k")
	if err != nil || !bytes.Equal(gotB, []byte(text)) {
		t.Errorf("[]byte Get = %q, %v", gotB, err)
	}
	if codec.marshals.Load() != 0 || codec.unmarshals.Load() != 0 {
		t.Errorf("codec called: %d Marshal, %d Unmarshal", codec.marshals.Load(), codec.unmarshals.Load())
	}
}

func TestCacheOfInterfaceValuesRoundTripsStrings(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	w := newCoreCache[any](t, rdb, Options{})
	r := newCoreCache[any](t, coreOtherClient(t, mr), Options{Namespace: w.opts.Namespace})
	for key, v := range map[string]any{"string": "hello", "number": 42.0} {
		if err := w.Set(ctx, key, v); err != nil {
			t.Fatal(err)
		}
		got, err := r.Get(ctx, key)
		if err != nil || got != v {
			t.Errorf("%s: other instance Get = %#v, %v; want %#v", key, got, err, v)
		}
	}
	if s := r.Stats(); s.CorruptValues != 0 {
		t.Errorf("CorruptValues = %d, want 0", s.CorruptValues)
	}
}

func TestStatsCountersMoveAsDocumented(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	a := newCoreCache[string](t, rdb, Options{})
	b := newCoreCache[string](t, coreOtherClient(t, mr), Options{Namespace: a.opts.Namespace})

	// a: L1 miss, Redis miss, one load.
	if _, err := a.GetOrLoad(ctx, "k1", coreLoadString("v1")); err != nil {
		t.Fatal(err)
	}
	// b: L1 miss, Redis hit.
	if _, err := b.Get(ctx, "k1"); err != nil {
		t.Fatal(err)
	}
	// a: L1 miss, Redis miss, ErrNotFound.
	if _, err := a.Get(ctx, "k2"); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
	// a: one invalidation published; b receives it (one key).
	if err := a.Set(ctx, "k2", "v2"); err != nil {
		t.Fatal(err)
	}
	// a: L1 hit.
	if _, err := a.Get(ctx, "k2"); err != nil {
		t.Fatal(err)
	}
	// a: a failed load and a panicking one.
	if _, err := a.GetOrLoad(ctx, "k3", func(context.Context, string) (string, error) { return "", errors.New("x") }); err == nil {
		t.Fatal("want an error")
	}
	if _, err := a.GetOrLoad(ctx, "k4", func(context.Context, string) (string, error) { panic("x") }); err == nil {
		t.Fatal("want an error")
	}
	// a: one invalidation for two keys; b receives it.
	if err := a.Delete(ctx, "k1", "k2"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "b to receive both invalidations", func() bool { return b.Stats().KeysInvalidated == 3 })
	// b: L1 miss (invalidated), Redis miss.
	if _, err := b.Get(ctx, "k1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("b Get after Delete: %v", err)
	}

	wantA := Stats{LocalHits: 1, LocalMisses: 4, RemoteMisses: 4, Loads: 3, LoadErrors: 2, LoadPanics: 1, LeasesGranted: 3, InvalidationsPublished: 2}
	wantB := Stats{LocalMisses: 2, RemoteHits: 1, RemoteMisses: 1, InvalidationsReceived: 2, KeysInvalidated: 3}
	if got := a.Stats(); got != wantA {
		t.Errorf("a.Stats() =\n%+v\nwant\n%+v", got, wantA)
	}
	if got := b.Stats(); got != wantB {
		t.Errorf("b.Stats() =\n%+v\nwant\n%+v", got, wantB)
	}
}

// ---- On a real Redis ----

func TestCoreSemanticsHoldOnRealRedis(t *testing.T) {
	rdb := realRedis(t)
	ctx := context.Background()
	c := newCoreCache[coreUser](t, rdb, Options{RemoteTTL: time.Minute, NegativeTTL: time.Minute})
	// Another instance: its own client, so its own subscription.
	other := newCoreCache[coreUser](t, realRedis(t), Options{Namespace: c.opts.Namespace})
	gets := coreCountGets(rdb)

	// Read-your-writes from L1.
	want := coreUser{ID: 2, Name: "Grace"}
	if err := c.Set(ctx, "u", want); err != nil {
		t.Fatal(err)
	}
	got, err := c.Get(ctx, "u")
	coreWant(t, "Get after Set", got, err, want)
	if gets.Load() != 0 {
		t.Error("Get after Set asked Redis")
	}

	// GetOrLoad writes back before returning.
	got, err = c.GetOrLoad(ctx, "loaded", coreLoadAda)
	coreWant(t, "GetOrLoad", got, err, coreUser{ID: 1, Name: "Ada"})
	got, err = other.GetOrLoad(ctx, "loaded", coreMustNotLoad[coreUser](t))
	coreWant(t, "other instance GetOrLoad", got, err, coreUser{ID: 1, Name: "Ada"})

	// Negative caching in both tiers.
	if _, err := c.GetOrLoad(ctx, "missing", func(context.Context, string) (coreUser, error) { return coreUser{}, ErrNotFound }); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
	if _, err := other.GetOrLoad(ctx, "missing", coreMustNotLoad[coreUser](t)); !errors.Is(err, ErrNotFound) {
		t.Errorf("other instance: %v, want the remembered ErrNotFound", err)
	}

	// Jittered TTLs.
	keys := []string{"u", "loaded", "missing"}
	for i := range 20 {
		key := "j" + strconv.Itoa(i)
		keys = append(keys, key)
		if err := c.Set(ctx, key, want); err != nil {
			t.Fatal(err)
		}
		ttl, err := rdb.PTTL(ctx, coreRedisKey(c, key)).Result()
		if err != nil || ttl < 54*time.Second-5*time.Second || ttl > time.Minute {
			t.Errorf("%s: TTL %v, %v; want within [54s, 60s] less elapsed time", key, ttl, err)
		}
	}
	if err := c.Delete(ctx, keys...); err != nil { // the shared server: leave nothing behind
		t.Fatal(err)
	}
}
