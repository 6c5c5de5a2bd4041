package tiered

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Batch reads (issue 13): GetMany and GetOrLoadMany.

// roundTrips counts what a client sends: calls (a command alone, or a
// pipeline: one round trip each) and the commands in them, by name.
type roundTrips struct {
	mu    sync.Mutex
	calls int
	cmds  map[string]int
}

// countRoundTrips counts the calls c makes through its client rdb from
// now on. It first waits for c's position in the invalidation log: once
// subscribed, c's subscriber reads the log's tail in the background, a
// call on rdb that is no part of what a test counts.
func countRoundTrips[V any](t *testing.T, c *Cache[V], rdb *redis.Client) *roundTrips {
	t.Helper()
	awaitLogPosition(t, c)
	rt := &roundTrips{cmds: map[string]int{}}
	rdb.AddHook(rt)
	return rt
}

func (rt *roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }

func (rt *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		rt.count(cmd)
		return next(ctx, cmd)
	}
}

func (rt *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		rt.count(cmds...)
		return next(ctx, cmds)
	}
}

func (rt *roundTrips) count(cmds ...redis.Cmder) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if n := cmds[0].Name(); n == "hello" || n == "client" {
		return // a new connection's handshake
	}
	rt.calls++
	for _, c := range cmds {
		rt.cmds[c.Name()]++
	}
}

// loadScripts loads the batch's scripts into Redis, so that no call is
// sent twice for a NOSCRIPT.
func loadScripts(t *testing.T, rdb *redis.Client) {
	for _, s := range []*redis.Script{leaseScript, fillScript, releaseScript} {
		if err := s.Load(context.Background(), rdb).Err(); err != nil {
			t.Fatal(err)
		}
	}
}

// since returns the calls and commands counted since the last call of since.
func (rt *roundTrips) since() (calls int, cmds map[string]int) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	calls, cmds = rt.calls, rt.cmds
	rt.calls, rt.cmds = 0, map[string]int{}
	return calls, cmds
}

// batchLoader is a GetOrLoadMany loader of "v-<key>" for every key but
// those starting with "none", which records what it was asked.
type batchLoader struct {
	mu    sync.Mutex
	calls [][]string
}

func (l *batchLoader) load(_ context.Context, keys []string) (map[string]string, error) {
	l.mu.Lock()
	l.calls = append(l.calls, slices.Clone(keys))
	l.mu.Unlock()
	m := make(map[string]string)
	for _, k := range keys {
		if !strings.HasPrefix(k, "none") {
			m[k] = "v-" + k
		}
	}
	return m, nil
}

func (l *batchLoader) asked() [][]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([][]string, len(l.calls))
	for i, c := range l.calls {
		out[i] = slices.Sorted(slices.Values(c))
	}
	return out
}

func wantMap(t *testing.T, what string, got map[string]string, err error, want map[string]string) {
	t.Helper()
	if err != nil || !maps.Equal(got, want) {
		t.Fatalf("%s = %v, %v; want %v, nil", what, got, err, want)
	}
}

func valuesOf(keys ...string) map[string]string {
	m := make(map[string]string, len(keys))
	for _, k := range keys {
		m[k] = "v-" + k
	}
	return m
}

func TestGetManyServesL1HitsWithoutRedis(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	keys := make([]string, 100)
	for i := range keys {
		keys[i] = "k" + strconv.Itoa(i)
		if err := c.Set(ctx, keys[i], "v-"+keys[i]); err != nil {
			t.Fatal(err)
		}
	}
	// A Set drops the other keys of its generation slot from L1: refill
	// those first.
	got, err := c.GetMany(ctx, keys)
	wantMap(t, "GetMany", got, err, valuesOf(keys...))
	rt := countRoundTrips(t, c, rdb)
	before := c.Stats()
	got, err = c.GetMany(ctx, keys)
	wantMap(t, "GetMany", got, err, valuesOf(keys...))
	if calls, cmds := rt.since(); calls != 0 {
		t.Errorf("GetMany of L1 hits sent %d calls to Redis (%v); want none", calls, cmds)
	}
	if s := c.Stats(); s.LocalHits-before.LocalHits != 100 || s.LocalMisses != before.LocalMisses || s.BatchCalls != 2 {
		t.Errorf("LocalHits +%d, LocalMisses +%d, BatchCalls %d; want +100, +0, 2",
			s.LocalHits-before.LocalHits, s.LocalMisses-before.LocalMisses, s.BatchCalls)
	}
	if raceEnabled {
		return // allocation counts mean nothing under the race detector
	}
	// No allocation beyond the result map: as many as making and filling it.
	var sink map[string]string
	mapOnly := testing.AllocsPerRun(1000, func() {
		sink = make(map[string]string, len(keys))
		for _, k := range keys {
			sink[k] = k
		}
	})
	batch := testing.AllocsPerRun(1000, func() { sink, _ = c.GetMany(ctx, keys) })
	if batch > mapOnly {
		t.Errorf("GetMany of 100 L1 hits makes %.0f allocations; the result map alone makes %.0f", batch, mapOnly)
	}
	_ = sink
}

func TestGetManyReadsAllMissesInOneRoundTripAndKeepsThem(t *testing.T) {
	ctx := context.Background()
	dial := miniredisDialer(t)
	cs := newInstances[string](t, 2, dial, Options{})
	writer := cs[0]
	rdb := redis.NewClient(&redis.Options{Addr: dial().(*redis.Client).Options().Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	c := newTestCache[string](t, rdb, Options{Namespace: writer.opts.Namespace})
	// 1,200 keys: three MGETs (maxBatchKeys is 500), in one pipeline.
	keys := make([]string, 1200)
	for i := range keys {
		keys[i] = "k" + strconv.Itoa(i)
		if err := writer.Set(ctx, keys[i], "v-"+keys[i]); err != nil {
			t.Fatal(err)
		}
	}
	rt := countRoundTrips(t, c, rdb)
	got, err := c.GetMany(ctx, append(keys, keys[:10]...)) // duplicates are fine
	wantMap(t, "GetMany", got, err, valuesOf(keys...))
	if calls, cmds := rt.since(); calls != 1 || cmds["mget"] != 3 || len(cmds) != 1 {
		t.Errorf("GetMany of 1,200 L1 misses sent %d calls with %v; want 1 call of 3 MGETs", calls, cmds)
	}
	if s := c.Stats(); s.LocalMisses != 1200 || s.RemoteHits != 1200 {
		t.Errorf("LocalMisses %d, RemoteHits %d; want 1200 each (duplicates read once)", s.LocalMisses, s.RemoteHits)
	}
	// Kept in L1 (ristretto may drop some of 1,200 new keys at once: look
	// at a few).
	for _, k := range keys[:50] {
		waitUntil(t, 10*time.Second, "L1 to hold "+k+" after GetMany read it", func() bool {
			e, ok := c.local.get(k)
			return ok && e.value == "v-"+k
		})
	}
}

func TestGetManyLeavesOutWhatNeitherTierHas(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{NegativeTTL: time.Minute})
	other := newTestCache[string](t, rdb, Options{Namespace: c.opts.Namespace, NegativeTTL: time.Minute})
	if err := other.Set(ctx, "there", "v-there"); err != nil {
		t.Fatal(err)
	}
	if _, err := other.GetOrLoad(ctx, "none-remembered", func(context.Context, string) (string, error) { return "", ErrNotFound }); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
	rdb.Set(ctx, c.remote.key("corrupt"), "not an envelope", 0)
	rdb.HSet(ctx, c.remote.key("hash"), "f", "v")
	lease := encodeEnvelope(kindLease, time.Now().Add(time.Minute).UnixNano(), newLeaseToken())
	rdb.Set(ctx, c.remote.key("leased"), lease, time.Minute)
	got, err := c.GetMany(ctx, []string{"there", "absent", "none-remembered", "corrupt", "hash", "leased"})
	wantMap(t, "GetMany", got, err, valuesOf("there"))
	// MGET reads another Redis type as nil: absent, not corrupt.
	if s := c.Stats(); s.CorruptValues != 1 || s.RemoteHits != 2 || s.RemoteMisses != 4 {
		t.Errorf("CorruptValues %d, RemoteHits %d, RemoteMisses %d; want 1, 2, 4", s.CorruptValues, s.RemoteHits, s.RemoteMisses)
	}
	if _, ok := c.local.get("none-remembered"); !ok {
		t.Error("the remembered not-found Redis had is not kept in L1")
	}
}

func TestBatchInputErrorsDoNothing(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	rt := countRoundTrips(t, c, rdb)
	l := &batchLoader{}
	if _, err := c.GetMany(ctx, []string{"a", "", "b"}); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("GetMany with an empty key: %v; want ErrInvalidKey", err)
	}
	if _, err := c.GetOrLoadMany(ctx, []string{"a", ""}, l.load); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("GetOrLoadMany with an empty key: %v; want ErrInvalidKey", err)
	}
	if _, err := c.GetOrLoadMany(ctx, []string{"a"}, l.load, WithLocalTTL(-time.Second)); !errors.Is(err, ErrInvalidOption) {
		t.Errorf("GetOrLoadMany with a negative TTL: %v; want ErrInvalidOption", err)
	}
	if _, err := c.GetOrLoadMany(ctx, []string{"a"}, nil); !errors.Is(err, ErrInvalidOption) {
		t.Errorf("GetOrLoadMany with a nil loader: %v; want ErrInvalidOption", err)
	}
	for name, f := range map[string]func() (map[string]string, error){
		"GetMany":       func() (map[string]string, error) { return c.GetMany(ctx, nil) },
		"GetOrLoadMany": func() (map[string]string, error) { return c.GetOrLoadMany(ctx, []string{}, l.load) },
	} {
		if got, err := f(); err != nil || got == nil || len(got) != 0 {
			t.Errorf("%s of no keys = %v, %v; want an empty map, nil", name, got, err)
		}
	}
	if calls, cmds := rt.since(); calls != 0 || len(l.asked()) != 0 {
		t.Errorf("bad input sent %d calls (%v) and called the loader %v; want nothing done", calls, cmds, l.asked())
	}
	if s := c.Stats(); s.LocalMisses != 0 {
		t.Errorf("bad input counted %d L1 misses", s.LocalMisses)
	}
	_ = c.Close()
	if _, err := c.GetMany(ctx, []string{"a"}); !errors.Is(err, ErrClosed) {
		t.Errorf("GetMany after Close: %v; want ErrClosed", err)
	}
	if _, err := c.GetOrLoadMany(ctx, []string{"a"}, l.load); !errors.Is(err, ErrClosed) {
		t.Errorf("GetOrLoadMany after Close: %v; want ErrClosed", err)
	}
}

func TestGetManyWithRedisDownReturnsL1HitsAndRemoteUnavailable(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	if err := c.Set(ctx, "hit", "v-hit"); err != nil {
		t.Fatal(err)
	}
	// Redis stops answering reads (a closed Redis would also break the
	// subscription, and L1 would be bypassed).
	rdb.AddHook(processHook{process: func(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
		if cmd.Name() == "mget" {
			cmd.SetErr(errors.New("connection reset"))
			return cmd.Err()
		}
		return next(ctx, cmd)
	}})
	got, err := c.GetMany(ctx, []string{"hit", "miss"})
	if !errors.Is(err, ErrRemoteUnavailable) || !maps.Equal(got, valuesOf("hit")) {
		t.Errorf("GetMany with Redis down = %v, %v; want the L1 hit and ErrRemoteUnavailable", got, err)
	}
}

func TestGetOrLoadManyLoadsTheMissingKeysInOneCall(t *testing.T) {
	ctx := context.Background()
	dial := miniredisDialer(t)
	rdb := dial().(*redis.Client)
	c := newTestCache[string](t, rdb, Options{})
	other := newTestCache[string](t, dial(), Options{Namespace: c.opts.Namespace})
	if err := c.Set(ctx, "in-l1", "v-in-l1"); err != nil {
		t.Fatal(err)
	}
	if err := other.Set(ctx, "in-redis", "v-in-redis"); err != nil {
		t.Fatal(err)
	}
	loadScripts(t, rdb)
	rt := countRoundTrips(t, c, rdb)
	l := &batchLoader{}
	keys := []string{"in-l1", "cold-1", "in-redis", "cold-2", "cold-1", "none-1", "in-l1"}
	got, err := c.GetOrLoadMany(ctx, keys, l.load)
	wantMap(t, "GetOrLoadMany", got, err, valuesOf("in-l1", "in-redis", "cold-1", "cold-2"))
	if want := [][]string{{"cold-1", "cold-2", "none-1"}}; !slices.EqualFunc(l.asked(), want, slices.Equal) {
		t.Errorf("loader asked for %v; want one call for %v", l.asked(), want)
	}
	// One round trip reads (and leases) the misses, one writes back (and
	// one releases the lease of the key the loader left out).
	if calls, cmds := rt.since(); calls != 3 || cmds["evalsha"] != 4+2+1 {
		t.Errorf("GetOrLoadMany sent %d calls with %v; want 3: the read, the write-back, the release", calls, cmds)
	}
	// "in-l1" is read twice, as two Gets would; the misses once each.
	s := c.Stats()
	if s.LocalHits != 2 || s.LocalMisses != 4 || s.RemoteHits != 1 || s.RemoteMisses != 3 ||
		s.LeasesGranted != 3 || s.Loads != 3 || s.BatchCalls != 1 {
		t.Errorf("stats %+v; want LocalHits 2, LocalMisses 4, RemoteHits 1, RemoteMisses 3, LeasesGranted 3, Loads 3, BatchCalls 1", s)
	}
	// Both tiers hold the loaded values; the key left out is nowhere.
	for _, k := range []string{"cold-1", "cold-2"} {
		if _, ok := c.local.get(k); !ok {
			t.Errorf("L1 does not hold loaded %s", k)
		}
		v, err := other.Get(ctx, k)
		coreWant(t, "Get on the other instance of "+k, v, err, "v-"+k)
	}
	if n, _ := rdb.Exists(ctx, c.remote.key("none-1")).Result(); n != 0 {
		t.Error("Redis holds the key the loader left out (its lease was not released)")
	}
	got, err = c.GetOrLoadMany(ctx, keys, l.load)
	wantMap(t, "GetOrLoadMany again", got, err, valuesOf("in-l1", "in-redis", "cold-1", "cold-2"))
	if want := [][]string{{"cold-1", "cold-2", "none-1"}, {"none-1"}}; !slices.EqualFunc(l.asked(), want, slices.Equal) {
		t.Errorf("loader asked for %v; want %v: without NegativeTTL a key left out is asked for again", l.asked(), want)
	}
}

func TestGetOrLoadManyRemembersKeysLeftOutForNegativeTTL(t *testing.T) {
	for _, lease := range []time.Duration{0, -1} {
		t.Run(fmt.Sprintf("LoadLease=%v", lease), func(t *testing.T) {
			ctx := context.Background()
			_, rdb := newMiniredis(t)
			c := newTestCache[string](t, rdb, Options{NegativeTTL: time.Minute, LoadLease: lease})
			other := newTestCache[string](t, rdb, Options{Namespace: c.opts.Namespace})
			l := &batchLoader{}
			for range 2 {
				got, err := c.GetOrLoadMany(ctx, []string{"a", "none-1"}, l.load)
				wantMap(t, "GetOrLoadMany", got, err, valuesOf("a"))
			}
			if len(l.asked()) != 1 {
				t.Errorf("loader asked for %v; want one call: the key left out is remembered", l.asked())
			}
			if _, err := other.Get(ctx, "none-1"); !errors.Is(err, ErrNotFound) {
				t.Errorf("Get of the key left out on another instance: %v; want ErrNotFound from Redis", err)
			}
		})
	}
}

func TestGetOrLoadManyLoaderErrorReturnsWhatItHasAndCachesNothing(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	if err := c.Set(ctx, "hit", "v-hit"); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("database down")
	var calls atomic.Int32
	failing := func(context.Context, []string) (map[string]string, error) {
		calls.Add(1)
		return map[string]string{"a": "partial"}, fmt.Errorf("query: %w", boom)
	}
	got, err := c.GetOrLoadMany(ctx, []string{"hit", "a", "b"}, failing)
	if !errors.Is(err, boom) || !maps.Equal(got, valuesOf("hit")) {
		t.Errorf("GetOrLoadMany with a failing loader = %v, %v; want the L1 hit and the loader's error", got, err)
	}
	for _, k := range []string{"a", "b"} {
		if n, _ := rdb.Exists(ctx, c.remote.key(k)).Result(); n != 0 {
			t.Errorf("Redis holds %s after the failed load (a lease not released, or the partial value)", k)
		}
	}
	if s := c.Stats(); s.LoadErrors != 2 {
		t.Errorf("LoadErrors = %d; want 2 (one per key, as two GetOrLoads would count)", s.LoadErrors)
	}
	l := &batchLoader{}
	got, err = c.GetOrLoadMany(ctx, []string{"hit", "a", "b"}, l.load)
	wantMap(t, "GetOrLoadMany after the failure", got, err, valuesOf("hit", "a", "b"))
}

func TestGetOrLoadManyLoaderPanicIsErrLoaderPanicForEveryWaiter(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	loading, release := make(chan struct{}), make(chan struct{})
	panicking := func(context.Context, []string) (map[string]string, error) {
		close(loading)
		<-release
		panic("boom")
	}
	batch := make(chan error, 1)
	go func() {
		_, err := c.GetOrLoadMany(ctx, []string{"a", "b"}, panicking)
		batch <- err
	}()
	<-loading
	single := make(chan error, 1)
	go func() {
		_, err := c.GetOrLoad(ctx, "b", coreMustNotLoad[string](t))
		single <- err
	}()
	waitUntil(t, 5*time.Second, "the single call to miss", func() bool { return c.Stats().LocalMisses == 3 })
	close(release)
	for name, ch := range map[string]chan error{"GetOrLoadMany": batch, "GetOrLoad joining it": single} {
		if err := <-ch; !errors.Is(err, ErrLoaderPanic) || !strings.Contains(err.Error(), "boom") {
			t.Errorf("%s: %v; want ErrLoaderPanic with the panic value", name, err)
		}
	}
	if s := c.Stats(); s.LoadPanics != 2 {
		t.Errorf("LoadPanics = %d; want 2, one per key", s.LoadPanics)
	}
}

func TestGetOrLoadManyFailsOpenWhenRedisIsDown(t *testing.T) {
	ctx := context.Background()
	mr, rdb := coreOutageMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	if err := c.Set(ctx, "hit", "v-hit"); err != nil {
		t.Fatal(err)
	}
	mr.Close()
	// As for GetOrLoad: a fill that began before the subscription noticed
	// the outage is not kept.
	waitUntil(t, 5*time.Second, "subscription to notice the outage", func() bool { return !c.sub.healthy() })
	l := &batchLoader{}
	got, err := c.GetOrLoadMany(ctx, []string{"hit", "a", "b"}, l.load)
	wantMap(t, "GetOrLoadMany with Redis down", got, err, valuesOf("hit", "a", "b"))
	for _, k := range []string{"a", "b"} {
		if e, ok := c.local.get(k); !ok || e.value != "v-"+k {
			t.Errorf("L1 does not hold %s loaded during the outage: the next call would load again", k)
		}
	}
}

// A Delete and a Set of keys a batch is loading, on another instance, win
// in both tiers; the batch's callers still get what was loaded.
func TestABatchLoadLosesToASetOrDeleteDuringIt(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	loading, release := make(chan struct{}), make(chan struct{})
	done := make(chan map[string]string, 1)
	go func() {
		got, err := a.GetOrLoadMany(ctx, []string{"deleted", "set", "kept"}, func(context.Context, []string) (map[string]string, error) {
			close(loading)
			<-release
			return map[string]string{"deleted": "old", "set": "old", "kept": "loaded"}, nil
		})
		if err != nil {
			t.Error(err)
		}
		done <- got
	}()
	<-loading
	if err := b.Delete(ctx, "deleted"); err != nil {
		t.Fatal(err)
	}
	if err := b.Set(ctx, "set", "new"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, a, 2)
	close(release)
	if got := <-done; !maps.Equal(got, map[string]string{"deleted": "old", "set": "old", "kept": "loaded"}) {
		t.Errorf("the batch's caller got %v; want what was loaded", got)
	}
	if s := a.Stats(); s.FenceRejections != 2 {
		t.Errorf("FenceRejections = %d; want 2", s.FenceRejections)
	}
	mustBeNotFound(t, a, "deleted")
	mustBeNotFound(t, b, "deleted")
	for _, c := range cs {
		v, err := c.Get(ctx, "set")
		coreWant(t, "Get of the key Set during the load", v, err, "new")
		v, err = c.Get(ctx, "kept")
		coreWant(t, "Get of the key nobody wrote", v, err, "loaded")
	}
}

// A batch never loads a key a single GetOrLoad in this process is loading,
// nor the other way round; each gets the other's result. Leases are off so
// that only the flights can keep the loader from running twice.
func TestBatchAndSingleLoadsShareFlights(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{LoadLease: -1})

	finish := startHeldLoad(c, "single", "from-single")
	l := &batchLoader{}
	batch := make(chan map[string]string, 1)
	go func() {
		got, err := c.GetOrLoadMany(ctx, []string{"single", "other"}, l.load)
		if err != nil {
			t.Error(err)
		}
		batch <- got
	}()
	waitUntil(t, 5*time.Second, "the batch to load its other key", func() bool { return len(l.asked()) == 1 })
	finish()
	if got := <-batch; !maps.Equal(got, map[string]string{"single": "from-single", "other": "v-other"}) {
		t.Errorf("GetOrLoadMany joining a GetOrLoad = %v; want the GetOrLoad's value and its own load", got)
	}
	if want := [][]string{{"other"}}; !slices.EqualFunc(l.asked(), want, slices.Equal) {
		t.Errorf("the batch asked the loader for %v; want %v", l.asked(), want)
	}

	finish = startHeldBatchLoad(c, "batched", "from-batch")
	misses := c.Stats().LocalMisses
	single := startMustNotLoad(t, c, "batched")
	waitUntil(t, 5*time.Second, "the GetOrLoad to miss", func() bool { return c.Stats().LocalMisses > misses })
	finish()
	if v := <-single; v != "from-batch" {
		t.Errorf("GetOrLoad joining a GetOrLoadMany = %q; want the batch's value", v)
	}
}

// startHeldBatchLoad starts a GetOrLoadMany of key on c whose loader
// returns value once finish is called (which waits for the call to end).
func startHeldBatchLoad(c *Cache[string], key, value string) (finish func()) {
	loading, release := make(chan struct{}), make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = c.GetOrLoadMany(context.Background(), []string{key}, func(context.Context, []string) (map[string]string, error) {
			close(loading)
			<-release
			return map[string]string{key: value}, nil
		})
	}()
	<-loading
	return func() {
		close(release)
		<-done
	}
}

// startMustNotLoad starts a GetOrLoad of key on c that must not call its
// loader, and returns where its value comes.
func startMustNotLoad(t *testing.T, c *Cache[string], key string) <-chan string {
	single := make(chan string, 1)
	go func() {
		v, err := c.GetOrLoad(context.Background(), key, coreMustNotLoad[string](t))
		if err != nil {
			t.Error(err)
		}
		single <- v
	}()
	return single
}

// A key another instance is loading (it holds the lease) is waited for,
// not loaded; and a single GetOrLoad elsewhere waits for a batch's lease.
func TestGetOrLoadManyWaitsForAnotherInstancesLease(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]

	finish := startHeldLoad(a, "leased", "from-a")
	l := &batchLoader{}
	batch := make(chan map[string]string, 1)
	go func() {
		got, err := b.GetOrLoadMany(ctx, []string{"leased", "free"}, l.load)
		if err != nil {
			t.Error(err)
		}
		batch <- got
	}()
	waitUntil(t, 5*time.Second, "the batch to wait for the lease", func() bool { return b.Stats().LeaseWaits == 1 })
	finish()
	if got := <-batch; !maps.Equal(got, map[string]string{"leased": "from-a", "free": "v-free"}) {
		t.Errorf("GetOrLoadMany = %v; want the other instance's value for the leased key", got)
	}
	if want := [][]string{{"free"}}; !slices.EqualFunc(l.asked(), want, slices.Equal) {
		t.Errorf("the batch asked the loader for %v; want %v", l.asked(), want)
	}

	finish = startHeldBatchLoad(a, "batched", "from-batch")
	single := startMustNotLoad(t, b, "batched")
	waitUntil(t, 5*time.Second, "the GetOrLoad to wait for the batch's lease", func() bool { return b.Stats().LeaseWaits == 2 })
	finish()
	if v := <-single; v != "from-batch" {
		t.Errorf("GetOrLoad waiting for a batch's lease = %q; want the batch's value", v)
	}
}

func TestGetOrLoadManyAppliesItemOptionsAndLocalTTLFuncPerKey(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{RemoteTTLJitter: -1, LocalTTLFunc: func(key string) time.Duration {
		if strings.HasPrefix(key, "short") {
			return time.Second
		}
		return 0
	}})
	l := &batchLoader{}
	if _, err := c.GetOrLoadMany(ctx, []string{"short-a", "long-b"}, l.load, WithRemoteTTL(time.Minute)); err != nil {
		t.Fatal(err)
	}
	now := c.clock.now()
	for k, want := range map[string]time.Duration{"short-a": time.Second, "long-b": time.Minute} {
		e, ok := c.local.get(k)
		if !ok {
			t.Fatalf("L1 does not hold %s", k)
		}
		if left := time.Duration(e.expires - now); left > want || left < want-5*time.Second {
			t.Errorf("%s lives %v in L1; want about %v", k, left, want)
		}
		if ttl, _ := rdb.PTTL(ctx, c.remote.key(k)).Result(); ttl != time.Minute {
			t.Errorf("%s lives %v in Redis; want WithRemoteTTL's minute", k, ttl)
		}
	}
}

func TestGetOrLoadManyPastLoadTimeoutReleasesItsLeases(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{LoadTimeout: 50 * time.Millisecond})
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	_, err := c.GetOrLoadMany(ctx, []string{"a", "b"}, func(context.Context, []string) (map[string]string, error) {
		<-release
		return nil, nil
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("GetOrLoadMany past LoadTimeout: %v; want DeadlineExceeded", err)
	}
	waitUntil(t, 5*time.Second, "the leases to be released", func() bool {
		n, _ := rdb.Exists(ctx, c.remote.key("a"), c.remote.key("b")).Result()
		return n == 0
	})
	if s := c.Stats(); s.LoadTimeouts != 2 {
		t.Errorf("LoadTimeouts = %d; want 2, one per key", s.LoadTimeouts)
	}
}

// A caller that gives up returns at once; the load goes on and is cached.
func TestGetOrLoadManyCallerLeavesTheLoadGoesOn(t *testing.T) {
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	release := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, err := c.GetOrLoadMany(ctx, []string{"a"}, func(context.Context, []string) (map[string]string, error) {
			cancel()
			<-release
			return map[string]string{"a": "v-a"}, nil
		})
		done <- err
	}()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("GetOrLoadMany whose context ended: %v; want context.Canceled", err)
	}
	close(release)
	waitUntil(t, 5*time.Second, "the load to be written back", func() bool {
		b, _ := rdb.Get(context.Background(), c.remote.key("a")).Bytes()
		env, err := decodeEnvelope(b)
		return err == nil && env.kind == kindValue
	})
	v, err := c.Get(context.Background(), "a")
	coreWant(t, "Get after the abandoned call", v, err, "v-a")
}

// A key holding another Redis type is replaced by the load (the lease
// script tells it apart, unlike MGET).
func TestGetOrLoadManyReplacesAValueOfAnotherType(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	rdb.HSet(ctx, c.remote.key("hash"), "f", "v")
	rdb.Set(ctx, c.remote.key("corrupt"), "junk", 0)
	l := &batchLoader{}
	got, err := c.GetOrLoadMany(ctx, []string{"hash", "corrupt"}, l.load)
	wantMap(t, "GetOrLoadMany", got, err, valuesOf("hash", "corrupt"))
	for _, k := range []string{"hash", "corrupt"} {
		if v := redisValue(t, rdb, c, k); v != "v-"+k {
			t.Errorf("Redis holds %q under %s; want the loaded value", v, k)
		}
	}
	if s := c.Stats(); s.CorruptValues != 2 {
		t.Errorf("CorruptValues = %d; want 2", s.CorruptValues)
	}
}

// On a real cluster the misses are read per slot, one pipeline per master,
// and loaded and written back the same way.
func testClusterBatch(t *testing.T, tc *testCluster) {
	ctx := context.Background()
	ns := uniqueNamespace(t)
	a := newTestCache[string](t, tc.client(t), Options{Namespace: ns})
	b := newTestCache[string](t, tc.client(t), Options{Namespace: ns})
	keys := clusterKeys(300)
	for i := range 700 { // one slot, two MGETs
		keys = append(keys, "{hot}"+strconv.Itoa(i))
	}
	for _, k := range keys {
		if err := a.Set(ctx, k, "v-"+k); err != nil {
			t.Fatal(err)
		}
	}
	got, err := b.GetMany(ctx, keys)
	wantMap(t, "GetMany on the cluster", got, err, valuesOf(keys...))

	cold := make([]string, 0, 400)
	for i := range 300 {
		cold = append(cold, "cold-"+strconv.Itoa(i))
	}
	for i := range 100 {
		cold = append(cold, "{cold}"+strconv.Itoa(i))
	}
	l := &batchLoader{}
	got, err = b.GetOrLoadMany(ctx, cold, l.load)
	wantMap(t, "GetOrLoadMany on the cluster", got, err, valuesOf(cold...))
	if len(l.asked()) != 1 {
		t.Errorf("loader called %d times; want once", len(l.asked()))
	}
	if s := b.Stats(); s.LeasesGranted != 400 || s.FenceRejections != 0 {
		t.Errorf("LeasesGranted %d, FenceRejections %d; want 400, 0", s.LeasesGranted, s.FenceRejections)
	}
	got, err = a.GetMany(ctx, cold)
	wantMap(t, "GetMany of the loaded keys on the other instance", got, err, valuesOf(cold...))
}

// cancelOnPipeline cancels a context when a pipeline is sent.
type cancelOnPipeline struct{ cancel context.CancelFunc }

func (h cancelOnPipeline) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h cancelOnPipeline) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h cancelOnPipeline) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.cancel()
		return next(ctx, cmds)
	}
}

// A caller whose context ends during the batch's read gets its context's
// error, not a load: it was not an outage.
func TestGetOrLoadManyCancelledDuringItsReadDoesNotLoad(t *testing.T) {
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	rdb.AddHook(cancelOnPipeline{cancel})
	l := &batchLoader{}
	if _, err := c.GetOrLoadMany(ctx, []string{"a", "b"}, l.load); !errors.Is(err, context.Canceled) {
		t.Errorf("GetOrLoadMany cancelled during its read: %v; want context.Canceled", err)
	}
	if len(l.asked()) != 0 {
		t.Errorf("the loader was asked for %v; want no load", l.asked())
	}
	if s := c.Stats(); s.RemoteErrors != 0 {
		t.Errorf("RemoteErrors = %d; a cancelled read is not a Redis failure", s.RemoteErrors)
	}
}
