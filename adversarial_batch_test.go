package tiered_test

// Adversarial black-box tests of batch reads (GetMany, GetOrLoadMany):
// each tries to make an instance serve an overwritten value beyond the
// README's bound, or to lose or duplicate a load against the rules of
// issue 13 (one load per key per fleet, a Set or Delete during a load
// wins, a failed load hands its keys on and caches nothing). Public API
// only; the helpers of adversarial_test.go and adversarial_lease_test.go
// are reused.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tieredcache/tiered"
)

// ---- helpers ----

// gatedBatch is a batch loader that records the keys of each call, and
// whose calls wait until release (ignoring their context: a hung query),
// then return what result says.
type gatedBatch struct {
	mu      sync.Mutex
	asked   [][]string
	done    atomic.Int32 // calls that returned (or panicked)
	started chan []string
	gate    chan struct{}
	once    sync.Once
	result  func(keys []string) (map[string]string, error)
}

func newGatedBatch(t testing.TB, result func(keys []string) (map[string]string, error)) *gatedBatch {
	g := &gatedBatch{started: make(chan []string, 1024), gate: make(chan struct{}), result: result}
	t.Cleanup(g.release)
	return g
}

// prefixed is a result that loads every key asked as prefix+key.
func prefixed(prefix string) func([]string) (map[string]string, error) {
	return func(keys []string) (map[string]string, error) {
		m := make(map[string]string, len(keys))
		for _, k := range keys {
			m[k] = prefix + k
		}
		return m, nil
	}
}

func (g *gatedBatch) release() { g.once.Do(func() { close(g.gate) }) }

func (g *gatedBatch) load(_ context.Context, keys []string) (map[string]string, error) {
	defer g.done.Add(1)
	g.mu.Lock()
	g.asked = append(g.asked, slices.Clone(keys))
	g.mu.Unlock()
	g.started <- keys
	<-g.gate
	return g.result(keys)
}

func (g *gatedBatch) awaitStart(t testing.TB) []string {
	t.Helper()
	select {
	case ks := <-g.started:
		return ks
	case <-time.After(10 * time.Second):
		t.Fatal("the batch loader was never called")
		return nil
	}
}

// loadedKeys returns how many keys the loader's calls asked for so far.
func (g *gatedBatch) loadedKeys() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, ks := range g.asked {
		n += len(ks)
	}
	return n
}

func (g *gatedBatch) calls() [][]string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.asked)
}

type manyResult struct {
	m   map[string]string
	err error
}

func goLoadMany(ctx context.Context, c *tiered.Cache[string], keys []string,
	load func(context.Context, []string) (map[string]string, error)) <-chan manyResult {
	ch := make(chan manyResult, 1)
	go func() {
		m, err := c.GetOrLoadMany(ctx, keys, load)
		ch <- manyResult{m, err}
	}()
	return ch
}

func awaitMany(t testing.TB, r <-chan manyResult, timeout time.Duration, what string) manyResult {
	t.Helper()
	select {
	case res := <-r:
		return res
	case <-time.After(timeout):
		t.Fatalf("%s: no answer within %v", what, timeout)
		return manyResult{}
	}
}

// mustNotLoadMany is a batch loader that fails the test if called.
func mustNotLoadMany(t testing.TB, what string) func(context.Context, []string) (map[string]string, error) {
	return func(_ context.Context, keys []string) (map[string]string, error) {
		t.Errorf("%s: loader called with %v; want no load", what, keys)
		return nil, errors.New("must not load")
	}
}

// returning is a single-key loader that counts its calls and returns v.
func returning(n *atomic.Int32, v string) func(context.Context, string) (string, error) {
	return func(context.Context, string) (string, error) {
		n.Add(1)
		return v, nil
	}
}

// awaitReceived waits until c has applied n invalidation messages of
// other instances.
func awaitReceived(t testing.TB, c *tiered.Cache[string], n uint64) {
	t.Helper()
	awaitCond(t, 10*time.Second, fmt.Sprintf("%d invalidations received", n), func() bool {
		return c.Stats().InvalidationsReceived >= n
	})
}

// realRedis returns a client of the shared Redis at REDIS_ADDR (default
// 127.0.0.1:6379), or skips.
func realRedis(t testing.TB) *redis.Client {
	t.Helper()
	addr := os.Getenv("REDIS_ADDR")
	if addr == "" {
		addr = "127.0.0.1:6379"
	}
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		_ = rdb.Close()
		t.Skipf("no Redis at %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// cleanNamespace deletes the keys of ns from a shared Redis at cleanup.
func cleanNamespace(t testing.TB, rdb *redis.Client, ns string) {
	t.Cleanup(func() {
		ctx := context.Background()
		iter := rdb.Scan(ctx, 0, ns+":*", 1000).Iterator()
		for iter.Next(ctx) {
			rdb.Del(ctx, iter.Val())
		}
	})
}

// neverServes fails if any instance's Get (either tier) returns bad for key.
func neverServes(t testing.TB, key, bad string, cs map[string]*tiered.Cache[string]) {
	t.Helper()
	for name, c := range cs {
		v, fromL1, err := getFrom(c, key)
		if err == nil && v == bad {
			t.Errorf("%s: Get(%s) = %q (from L1: %v); want anything but the overwritten value", name, key, v, fromL1)
		}
	}
}

// ---- a Set or Delete during a batch's load wins, on every instance ----

// TestAdversarialBatchSetAndDeleteDuringItsLoadWinEverywhere: A's
// GetOrLoadMany of k1..k3 loads "old" values slowly; C waits for A's
// leases on k1 and k2 (a GetOrLoadMany of its own); B deletes k1 and sets
// k2. C must get the new values without waiting for A (it takes k1 over
// and loads it; k2 comes with B's message), A's write-backs of k1 and k2
// must be fenced out, and afterwards no instance serves an old value of
// k1 or k2 from either tier.
func TestAdversarialBatchSetAndDeleteDuringItsLoadWinEverywhere(t *testing.T) {
	ctx := context.Background()
	mr, raw := newMini(t)
	ns := advNamespace(t)
	o := tiered.Options{LoadTimeout: 30 * time.Second}
	a := advCache(t, plainClient(t, mr.Addr()), ns, o)
	b := advCache(t, plainClient(t, mr.Addr()), ns, o)
	c := advCache(t, plainClient(t, mr.Addr()), ns, o)

	ga := newGatedBatch(t, prefixed("old-"))
	ra := goLoadMany(ctx, a, []string{"k1", "k2", "k3"}, ga.load)
	ga.awaitStart(t)
	gc := newGatedBatch(t, prefixed("new-"))
	gc.release()
	rc := goLoadMany(ctx, c, []string{"k1", "k2"}, gc.load)
	awaitLeaseWaits(t, c, 2)

	if err := b.Delete(ctx, "k1"); err != nil {
		t.Fatal(err)
	}
	if err := b.Set(ctx, "k2", "new-k2"); err != nil {
		t.Fatal(err)
	}
	got := awaitMany(t, rc, 5*time.Second, "C, waiting for A's leases")
	if got.err != nil || !maps.Equal(got.m, map[string]string{"k1": "new-k1", "k2": "new-k2"}) {
		t.Errorf("C's GetOrLoadMany = %v, %v; want the new values, before A's load ends", got.m, got.err)
	}
	ga.release()
	awaitMany(t, ra, 5*time.Second, "A")

	all := map[string]*tiered.Cache[string]{"A": a, "B": b, "C": c}
	for range 3 { // L1 or Redis, then L1
		neverServes(t, "k1", "old-k1", all)
		neverServes(t, "k2", "old-k2", all)
	}
	if v, _ := rawPayload(t, raw, ns, "k1"); v == "old-k1" {
		t.Errorf("Redis holds A's fenced-out k1 %q", v)
	}
	if v, _ := rawPayload(t, raw, ns, "k2"); v != "new-k2" {
		t.Errorf("Redis holds %q for k2; want B's Set", v)
	}
	if v, err := b.Get(ctx, "k3"); err != nil || v != "old-k3" {
		t.Errorf("B: Get(k3) = %s; want A's load of the key nobody wrote", describe(v, err))
	}
}

// TestAdversarialBatchLargeWithConcurrentDelete: a batch of 1,200 keys
// (several MGETs, 1,200 leases) loads; during the load another instance
// deletes three of them. Those three must be cached nowhere; the rest
// everywhere.
func TestAdversarialBatchLargeWithConcurrentDelete(t *testing.T) {
	ctx := context.Background()
	mr, raw := newMini(t)
	ns := advNamespace(t)
	o := tiered.Options{LoadTimeout: 30 * time.Second}
	a := advCache(t, plainClient(t, mr.Addr()), ns, o)
	b := advCache(t, plainClient(t, mr.Addr()), ns, o)
	keys := make([]string, 1200)
	for i := range keys {
		keys[i] = "k" + strconv.Itoa(i)
	}
	g := newGatedBatch(t, prefixed("old-"))
	r := goLoadMany(ctx, a, keys, g.load)
	if n := len(g.awaitStart(t)); n != len(keys) {
		t.Fatalf("loader asked for %d keys; want %d", n, len(keys))
	}
	deleted := []string{"k0", "k600", "k1199"}
	if err := b.Delete(ctx, deleted...); err != nil {
		t.Fatal(err)
	}
	g.release()
	if got := awaitMany(t, r, 10*time.Second, "A"); got.err != nil || len(got.m) != len(keys) {
		t.Fatalf("A's GetOrLoadMany = %d values, %v; want %d", len(got.m), got.err, len(keys))
	}
	for _, c := range []*tiered.Cache[string]{a, b} {
		m, err := c.GetMany(ctx, keys)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range deleted {
			if v, ok := m[k]; ok {
				t.Errorf("GetMany after a Delete during the load has %s = %q; want it absent", k, v)
			}
			if _, ok := rawPayload(t, raw, ns, k); ok {
				t.Errorf("Redis holds %s after a Delete during the load", k)
			}
		}
		if len(m) != len(keys)-len(deleted) {
			t.Errorf("GetMany = %d values; want %d", len(m), len(keys)-len(deleted))
		}
	}
}

// ---- flights and invalidations ----

// TestAdversarialBatchDoesNotJoinAFlightOlderThanAnInvalidation: a
// GetOrLoad of k is loading v1 on A when a write of k (B's Set, or A's own
// Delete) reaches A. A GetOrLoadMany of k on A that starts after it must
// not get the older load's v1; nor, after everything ended, may any tier
// of A or Redis hold v1.
func TestAdversarialBatchDoesNotJoinAFlightOlderThanAnInvalidation(t *testing.T) {
	for _, lease := range []time.Duration{0, -1} {
		for _, write := range []string{"other-set", "own-delete"} {
			t.Run(fmt.Sprintf("lease=%v/%s", lease >= 0, write), func(t *testing.T) {
				ctx := context.Background()
				mr, raw := newMini(t)
				ns := advNamespace(t)
				o := tiered.Options{LoadTimeout: 30 * time.Second, LoadLease: lease}
				a := advCache(t, plainClient(t, mr.Addr()), ns, o)
				b := advCache(t, plainClient(t, mr.Addr()), ns, o)

				l := newGatedLoader(t, constant("v1"))
				rs := goLoad(ctx, a, "k", l.load)
				l.awaitStart(t)
				want := "v2"
				if write == "other-set" {
					n := a.Stats().InvalidationsReceived
					if err := b.Set(ctx, "k", "v2"); err != nil {
						t.Fatal(err)
					}
					awaitReceived(t, a, n+1)
				} else if err := a.Delete(ctx, "k"); err != nil {
					t.Fatal(err)
				}
				g := newGatedBatch(t, prefixed("fresh-"))
				g.release()
				if write == "own-delete" {
					want = "fresh-k"
				}
				got := awaitMany(t, goLoadMany(ctx, a, []string{"k", "k"}, g.load), 5*time.Second, "the batch")
				if got.err != nil || got.m["k"] != want {
					t.Errorf("GetOrLoadMany after the write = %v, %v; want k = %q, not the older flight's v1", got.m, got.err, want)
				}
				l.release()
				awaitResult(t, rs, 5*time.Second, "the older GetOrLoad")
				for range 2 {
					neverServes(t, "k", "v1", map[string]*tiered.Cache[string]{"A": a, "B": b})
				}
				if v, _ := rawPayload(t, raw, ns, "k"); v == "v1" {
					t.Errorf("Redis holds the older load's v1")
				}
			})
		}
	}
}

// TestAdversarialSingleDoesNotJoinABatchFlightOlderThanAnInvalidation: the
// same, the other way round: A's GetOrLoadMany is loading v1 when the
// write reaches A; a GetOrLoad of k after it must not get v1.
func TestAdversarialSingleDoesNotJoinABatchFlightOlderThanAnInvalidation(t *testing.T) {
	for _, lease := range []time.Duration{0, -1} {
		for _, write := range []string{"other-set", "own-delete"} {
			t.Run(fmt.Sprintf("lease=%v/%s", lease >= 0, write), func(t *testing.T) {
				ctx := context.Background()
				mr, raw := newMini(t)
				ns := advNamespace(t)
				o := tiered.Options{LoadTimeout: 30 * time.Second, LoadLease: lease}
				a := advCache(t, plainClient(t, mr.Addr()), ns, o)
				b := advCache(t, plainClient(t, mr.Addr()), ns, o)

				g := newGatedBatch(t, func([]string) (map[string]string, error) {
					return map[string]string{"k": "v1", "j": "vj"}, nil
				})
				rb := goLoadMany(ctx, a, []string{"j", "k"}, g.load)
				g.awaitStart(t)
				want := "v2"
				if write == "other-set" {
					n := a.Stats().InvalidationsReceived
					if err := b.Set(ctx, "k", "v2"); err != nil {
						t.Fatal(err)
					}
					awaitReceived(t, a, n+1)
				} else {
					if err := a.Delete(ctx, "k"); err != nil {
						t.Fatal(err)
					}
					want = "fresh"
				}
				var n atomic.Int32
				got := awaitResult(t, goLoad(ctx, a, "k", returning(&n, "fresh")), 5*time.Second, "the GetOrLoad")
				if got.err != nil || got.v != want {
					t.Errorf("GetOrLoad after the write = %s; want %q, not the older batch's v1", describe(got.v, got.err), want)
				}
				g.release()
				awaitMany(t, rb, 5*time.Second, "the older batch")
				for range 2 {
					neverServes(t, "k", "v1", map[string]*tiered.Cache[string]{"A": a, "B": b})
				}
				if v, _ := rawPayload(t, raw, ns, "k"); v == "v1" {
					t.Errorf("Redis holds the older batch's v1")
				}
			})
		}
	}
}

// replyPipelineGate holds back, from its caller, the replies of the first
// pipeline (or command) that names marker in an argument: Redis has run
// it, the caller has not seen the answer.
type replyPipelineGate struct {
	marker  string
	reached chan struct{}
	release chan struct{}
	once    sync.Once
}

func newReplyPipelineGate(marker string) *replyPipelineGate {
	return &replyPipelineGate{marker: marker, reached: make(chan struct{}), release: make(chan struct{})}
}

func (g *replyPipelineGate) hold(cmds []redis.Cmder) {
	for _, cmd := range cmds {
		if argsContain(cmd, []byte(g.marker)) {
			g.once.Do(func() {
				close(g.reached)
				<-g.release
			})
			return
		}
	}
}

func (g *replyPipelineGate) DialHook(next redis.DialHook) redis.DialHook { return next }
func (g *replyPipelineGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if err == nil {
			g.hold([]redis.Cmder{cmd})
		}
		return err
	}
}
func (g *replyPipelineGate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		g.hold(cmds)
		return err
	}
}

// TestAdversarialBatchReadOverlappingASetIsNotKept: A's batch read (an
// MGET for GetMany, a pipeline of lease reads for GetOrLoadMany) returns
// v1 of k, but its reply reaches A only after B's Set(k, v2) and its
// message did. A's call may return v1 (it overlapped the Set); A's L1
// must not keep it.
func TestAdversarialBatchReadOverlappingASetIsNotKept(t *testing.T) {
	for _, call := range []string{"GetMany", "GetOrLoadMany"} {
		t.Run(call, func(t *testing.T) {
			ctx := context.Background()
			mr, _ := newMini(t)
			ns := advNamespace(t)
			rc := plainClient(t, mr.Addr())
			gate := newReplyPipelineGate(ns + ":marked")
			rc.AddHook(gate)
			a := advCache(t, rc, ns, tiered.Options{})
			b := advCache(t, plainClient(t, mr.Addr()), ns, tiered.Options{})
			for _, k := range []string{"marked", "k"} {
				if err := b.Set(ctx, k, "v1"); err != nil {
					t.Fatal(err)
				}
			}
			done := make(chan struct{})
			go func() {
				defer close(done)
				keys := []string{"marked", "k"}
				if call == "GetMany" {
					_, _ = a.GetMany(ctx, keys)
				} else {
					_, _ = a.GetOrLoadMany(ctx, keys, mustNotLoadMany(t, "values in Redis"))
				}
			}()
			select {
			case <-gate.reached:
			case <-time.After(5 * time.Second):
				t.Fatal("A's batch read never reached Redis")
			}
			n := a.Stats().InvalidationsReceived
			if err := b.Set(ctx, "k", "v2"); err != nil {
				t.Fatal(err)
			}
			awaitReceived(t, a, n+1)
			close(gate.release)
			<-done
			if v, fromL1, err := getFrom(a, "k"); err != nil || v != "v2" {
				t.Errorf("A: Get(k) after its batch read overlapped B's Set = %s (from L1: %v); want v2", describe(v, err), fromL1)
			}
		})
	}
}

// ---- one load per key per fleet ----

// TestAdversarialBatchOverlappingAcrossTheFleet: four instances, on the
// shared real Redis, GetOrLoadMany overlapping key sets at once (each key
// asked by two or three instances, in different orders), plus single
// GetOrLoads of some keys. Every key must be loaded exactly once across
// the fleet, and every caller must get every key's value.
func TestAdversarialBatchOverlappingAcrossTheFleet(t *testing.T) {
	raw := realRedis(t)
	ns := advNamespace(t)
	cleanNamespace(t, raw, ns)
	o := tiered.Options{LoadTimeout: 30 * time.Second}
	const n, keysTotal = 4, 24
	cs := make([]*tiered.Cache[string], n)
	for i := range cs {
		cs[i] = advCache(t, plainClient(t, raw.Options().Addr), ns, o)
	}
	var loads sync.Map // key -> *atomic.Int32
	count := func(keys []string) {
		for _, k := range keys {
			p, _ := loads.LoadOrStore(k, new(atomic.Int32))
			p.(*atomic.Int32).Add(1)
		}
	}
	gates := make([]*gatedBatch, n)
	asks := make([][]string, n)
	results := make([]<-chan manyResult, n)
	for i := range cs {
		gates[i] = newGatedBatch(t, func(keys []string) (map[string]string, error) {
			count(keys)
			return prefixed("v-")(keys)
		})
		for j := range 12 { // keys 6i .. 6i+11, wrapping: each key asked by two instances
			asks[i] = append(asks[i], "k"+strconv.Itoa((6*i+j)%keysTotal))
		}
		if i%2 == 1 {
			slices.Reverse(asks[i])
		}
		asks[i] = append(asks[i], asks[i][0]) // a duplicate
		results[i] = goLoadMany(context.Background(), cs[i], asks[i], gates[i].load)
	}
	// Every instance's batch has either asked its loader for a key or is
	// waiting for another instance's lease of it.
	for i := range cs {
		distinct := len(asks[i]) - 1
		awaitCond(t, 10*time.Second, fmt.Sprintf("instance %d to load or wait for each of its keys", i), func() bool {
			return gates[i].loadedKeys()+int(cs[i].Stats().LeaseWaits) >= distinct
		})
	}
	// Single GetOrLoads of keys the batches are loading: each joins a
	// batch's flight or waits for a batch's lease.
	single := func(_ context.Context, k string) (string, error) {
		count([]string{k})
		return "v-" + k, nil
	}
	var singles []<-chan result
	for i := range cs {
		singles = append(singles, goLoad(context.Background(), cs[i], "k"+strconv.Itoa(5*i), single))
	}
	for _, g := range gates {
		g.release()
	}
	for i, r := range results {
		got := awaitMany(t, r, 10*time.Second, fmt.Sprintf("instance %d", i))
		if got.err != nil || len(got.m) != len(asks[i])-1 {
			t.Errorf("instance %d: GetOrLoadMany = %d values, %v; want %d", i, len(got.m), got.err, len(asks[i])-1)
		}
		for k, v := range got.m {
			if v != "v-"+k {
				t.Errorf("instance %d: %s = %q", i, k, v)
			}
		}
	}
	for i, r := range singles {
		if got := awaitResult(t, r, 10*time.Second, "single"); got.err != nil || got.v != "v-k"+strconv.Itoa(5*i) {
			t.Errorf("instance %d: GetOrLoad = %s", i, describe(got.v, got.err))
		}
	}
	for k := range keysTotal {
		key := "k" + strconv.Itoa(k)
		p, ok := loads.Load(key)
		if !ok || p.(*atomic.Int32).Load() != 1 {
			got := int32(0)
			if ok {
				got = p.(*atomic.Int32).Load()
			}
			t.Errorf("%s was loaded %d times across the fleet; want once", key, got)
		}
	}
}

// ---- failed loads ----

// TestAdversarialBatchLoaderOmitsAndInventsKeys: A's loader leaves k2 out
// and returns a key nobody asked for. A waiter for k2 on B must learn at
// once that it was not found (not wait out A's lease), with NegativeTTL
// or without; the invented key must be cached nowhere.
func TestAdversarialBatchLoaderOmitsAndInventsKeys(t *testing.T) {
	for _, negative := range []time.Duration{0, time.Minute} {
		t.Run(fmt.Sprintf("NegativeTTL=%v", negative), func(t *testing.T) {
			ctx := context.Background()
			mr, raw := newMini(t)
			ns := advNamespace(t)
			o := tiered.Options{LoadTimeout: time.Minute, NegativeTTL: negative}
			a := advCache(t, plainClient(t, mr.Addr()), ns, o)
			b := advCache(t, plainClient(t, mr.Addr()), ns, o)
			g := newGatedBatch(t, func([]string) (map[string]string, error) {
				return map[string]string{"k1": "v1", "invented": "x"}, nil
			})
			ra := goLoadMany(ctx, a, []string{"k1", "k2"}, g.load)
			g.awaitStart(t)
			var bLoads atomic.Int32
			rb := goLoad(ctx, b, "k2", returning(&bLoads, "b-k2"))
			awaitLeaseWaits(t, b, 1)
			g.release()
			if got := awaitMany(t, ra, 5*time.Second, "A"); got.err != nil || !maps.Equal(got.m, map[string]string{"k1": "v1"}) {
				t.Errorf("A's GetOrLoadMany = %v, %v; want only k1", got.m, got.err)
			}
			got := awaitResult(t, rb, 5*time.Second, "B, waiting for A's lease of a key A's loader left out")
			if !errors.Is(got.err, tiered.ErrNotFound) || bLoads.Load() != 0 {
				t.Errorf("B's GetOrLoad(k2) = %s with %d loads; want ErrNotFound from A's load, promptly", describe(got.v, got.err), bLoads.Load())
			}
			for _, c := range []*tiered.Cache[string]{a, b} {
				if v, err := c.Get(ctx, "invented"); !errors.Is(err, tiered.ErrNotFound) {
					t.Errorf("Get(invented) = %s; want ErrNotFound: nobody asked for it", describe(v, err))
				}
			}
			if _, ok := rawKind(t, raw, ns, "invented"); ok {
				t.Error("Redis holds a key the loader invented")
			}
			kind, ok := rawKind(t, raw, ns, "k2")
			switch {
			case negative == 0 && ok:
				t.Errorf("Redis holds kind %d for the key left out; want nothing (NegativeTTL is off)", kind)
			case negative > 0 && (!ok || kind != 1):
				t.Errorf("Redis holds kind %d (%v) for the key left out; want a remembered not-found (1)", kind, ok)
			}
		})
	}
}

// TestAdversarialBatchFailedLoadHandsItsKeysOn: A's batch load of k1, k2
// fails (an error, a panic, or a hang past LoadTimeout) while B waits for
// k1 (GetOrLoad) and C for k2 (GetOrLoadMany). B and C must take over
// promptly (LoadLease is a minute) and load their own values, A's caller
// gets the failure, and nothing of A's load is cached, even when the hung
// loader returns later.
func TestAdversarialBatchFailedLoadHandsItsKeysOn(t *testing.T) {
	boom := errors.New("database down")
	for _, mode := range []string{"error", "panic", "hang"} {
		t.Run(mode, func(t *testing.T) {
			ctx := context.Background()
			mr, raw := newMini(t)
			ns := advNamespace(t)
			o := tiered.Options{LoadTimeout: time.Minute, LoadLease: time.Minute}
			oa := o
			if mode == "hang" {
				oa.LoadTimeout = 300 * time.Millisecond
			}
			a := advCache(t, plainClient(t, mr.Addr()), ns, oa)
			b := advCache(t, plainClient(t, mr.Addr()), ns, o)
			c := advCache(t, plainClient(t, mr.Addr()), ns, o)
			g := newGatedBatch(t, func(keys []string) (map[string]string, error) {
				switch mode {
				case "error":
					return nil, boom
				case "panic":
					panic("loader bug")
				}
				return prefixed("late-")(keys)
			})
			ra := goLoadMany(ctx, a, []string{"k1", "k2"}, g.load)
			g.awaitStart(t)
			var bLoads atomic.Int32
			rb := goLoad(ctx, b, "k1", returning(&bLoads, "b-k1"))
			gc := newGatedBatch(t, prefixed("c-"))
			gc.release()
			rc := goLoadMany(ctx, c, []string{"k2"}, gc.load)
			if mode != "hang" {
				awaitLeaseWaits(t, b, 1)
				awaitLeaseWaits(t, c, 1)
				g.release()
			}
			res := awaitMany(t, ra, 5*time.Second, "A")
			switch mode {
			case "error":
				if !errors.Is(res.err, boom) {
					t.Errorf("A = %v, %v; want the loader's error", res.m, res.err)
				}
			case "panic":
				if !errors.Is(res.err, tiered.ErrLoaderPanic) {
					t.Errorf("A = %v, %v; want ErrLoaderPanic", res.m, res.err)
				}
			case "hang":
				if !errors.Is(res.err, context.DeadlineExceeded) {
					t.Errorf("A = %v, %v; want DeadlineExceeded", res.m, res.err)
				}
			}
			if got := awaitResult(t, rb, 5*time.Second, "B"); got.err != nil || got.v != "b-k1" || bLoads.Load() != 1 {
				t.Errorf("B = %s with %d loads; want its own b-k1 after A's failure", describe(got.v, got.err), bLoads.Load())
			}
			if got := awaitMany(t, rc, 5*time.Second, "C"); got.err != nil || got.m["k2"] != "c-k2" {
				t.Errorf("C = %v, %v; want its own c-k2 after A's failure", got.m, got.err)
			}
			if mode == "hang" {
				g.release()
				awaitCond(t, 5*time.Second, "the hung loader to return", func() bool { return g.done.Load() == 1 })
			}
			for range 2 {
				for k, want := range map[string]string{"k1": "b-k1", "k2": "c-k2"} {
					for name, x := range map[string]*tiered.Cache[string]{"A": a, "B": b, "C": c} {
						if v, err := x.Get(ctx, k); err != nil || v != want {
							t.Errorf("%s: Get(%s) = %s; want %q", name, k, describe(v, err), want)
						}
					}
					if v, _ := rawPayload(t, raw, ns, k); v != want {
						t.Errorf("Redis holds %q for %s; want %q", v, k, want)
					}
				}
			}
		})
	}
}

// TestAdversarialBatchCallerCancelledMidLoad: A's caller gives up while its
// batch loads. It must return at once with its ctx's error; the load goes
// on: a GetOrLoad on A that joined it, and B waiting for A's lease, get
// its values, and both tiers hold them.
func TestAdversarialBatchCallerCancelledMidLoad(t *testing.T) {
	mr, raw := newMini(t)
	ns := advNamespace(t)
	o := tiered.Options{LoadTimeout: time.Minute}
	a := advCache(t, plainClient(t, mr.Addr()), ns, o)
	b := advCache(t, plainClient(t, mr.Addr()), ns, o)
	g := newGatedBatch(t, prefixed("v-"))
	ctx, cancel := context.WithCancel(context.Background())
	ra := goLoadMany(ctx, a, []string{"k1", "k2"}, g.load)
	g.awaitStart(t)
	var loads atomic.Int32
	misses := a.Stats().LocalMisses
	rs := goLoad(context.Background(), a, "k2", returning(&loads, "single"))
	rb := goLoad(context.Background(), b, "k1", returning(&loads, "b"))
	awaitLeaseWaits(t, b, 1)
	awaitCond(t, 5*time.Second, "the GetOrLoad on A to miss", func() bool { return a.Stats().LocalMisses > misses })
	cancel()
	if got := awaitMany(t, ra, 5*time.Second, "the cancelled batch"); !errors.Is(got.err, context.Canceled) {
		t.Errorf("cancelled GetOrLoadMany = %v, %v; want context.Canceled", got.m, got.err)
	}
	g.release()
	if got := awaitResult(t, rs, 5*time.Second, "A's GetOrLoad"); got.err != nil || got.v != "v-k2" {
		t.Errorf("A's GetOrLoad joined to the batch = %s; want the batch's v-k2", describe(got.v, got.err))
	}
	if got := awaitResult(t, rb, 5*time.Second, "B"); got.err != nil || got.v != "v-k1" {
		t.Errorf("B waiting for the batch's lease = %s; want v-k1", describe(got.v, got.err))
	}
	if loads.Load() != 0 {
		t.Errorf("single loaders ran %d times; want 0: the batch's load went on", loads.Load())
	}
	for _, k := range []string{"k1", "k2"} {
		if v, _ := rawPayload(t, raw, ns, k); v != "v-"+k {
			t.Errorf("Redis holds %q for %s; want the batch's value", v, k)
		}
	}
}

// TestAdversarialBatchNegativeTTLThenSet: keys a batch's loader left out
// are remembered as not found (NegativeTTL): not asked again, not found on
// another instance; once another instance Sets one, it is served
// everywhere, the remembered not-found nowhere.
func TestAdversarialBatchNegativeTTLThenSet(t *testing.T) {
	ctx := context.Background()
	mr, _ := newMini(t)
	ns := advNamespace(t)
	o := tiered.Options{NegativeTTL: time.Minute}
	a := advCache(t, plainClient(t, mr.Addr()), ns, o)
	b := advCache(t, plainClient(t, mr.Addr()), ns, o)
	g := newGatedBatch(t, func([]string) (map[string]string, error) { return map[string]string{"k1": "v1"}, nil })
	g.release()
	if got := awaitMany(t, goLoadMany(ctx, a, []string{"k1", "k2"}, g.load), 5*time.Second, "A"); got.err != nil || len(got.m) != 1 {
		t.Fatalf("GetOrLoadMany = %v, %v; want k1 only", got.m, got.err)
	}
	if m, err := a.GetOrLoadMany(ctx, []string{"k1", "k2"}, mustNotLoadMany(t, "again on A")); err != nil || len(m) != 1 {
		t.Errorf("A again = %v, %v; want k1 only, no load", m, err)
	}
	if m, err := b.GetOrLoadMany(ctx, []string{"k2"}, mustNotLoadMany(t, "on B")); err != nil || len(m) != 0 {
		t.Errorf("B = %v, %v; want nothing, no load", m, err)
	}
	n := a.Stats().InvalidationsReceived
	if err := b.Set(ctx, "k2", "now"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, a, n+1)
	for name, c := range map[string]*tiered.Cache[string]{"A": a, "B": b} {
		if m, err := c.GetOrLoadMany(ctx, []string{"k2"}, mustNotLoadMany(t, name)); err != nil || m["k2"] != "now" {
			t.Errorf("%s after the Set = %v, %v; want k2 = now", name, m, err)
		}
		if m, err := c.GetMany(ctx, []string{"k2", "k1"}); err != nil || m["k2"] != "now" || m["k1"] != "v1" {
			t.Errorf("%s GetMany after the Set = %v, %v", name, m, err)
		}
	}
}

// ---- outages and gaps ----

// TestAdversarialBatchOutageValueDoesNotOutliveTheBound: A's connections
// die after its batch's lease read and before the write-back; A's batch
// fails open (returns the loaded "old" values, kept in L1 only). B then
// Sets k, which A cannot hear. A may serve "old" no longer than 4 ×
// HeartbeatInterval after it loaded it (the README's outage bound); once
// Redis answers A again it serves B's value.
func TestAdversarialBatchOutageValueDoesNotOutliveTheBound(t *testing.T) {
	ctx := context.Background()
	mr, _ := newMini(t)
	ns := advNamespace(t)
	hb := 100 * time.Millisecond
	o := tiered.Options{LoadTimeout: time.Minute, HeartbeatInterval: hb}
	an := newAdvNet(mr.Addr())
	a := advCache(t, an.client(t), ns, o)
	b := advCache(t, plainClient(t, mr.Addr()), ns, o)
	g := newGatedBatch(t, prefixed("old-"))
	ra := goLoadMany(ctx, a, []string{"k", "j"}, g.load)
	g.awaitStart(t)
	an.refuseDial.Store(true)
	an.killAll()
	g.release()
	got := awaitMany(t, ra, 5*time.Second, "A")
	loaded := time.Now()
	if got.err != nil || got.m["k"] != "old-k" {
		t.Fatalf("A's GetOrLoadMany in an outage = %v, %v; want its load (fail-open)", got.m, got.err)
	}
	if err := b.Set(ctx, "k", "new"); err != nil {
		t.Fatal(err)
	}
	bound := 4 * hb
	var last time.Time
	for time.Since(loaded) < bound+time.Second {
		if v, _, err := getFrom(a, "k"); err == nil && v == "old-k" {
			last = time.Now()
		}
		time.Sleep(5 * time.Millisecond) // sampling, not synchronisation
	}
	if d := last.Sub(loaded); !last.IsZero() && d > bound+50*time.Millisecond {
		t.Errorf("A served the value it loaded in the outage %v after loading it; want at most 4 x HeartbeatInterval = %v", d, bound)
	}
	an.refuseDial.Store(false)
	awaitCond(t, 10*time.Second, "A to read B's value", func() bool {
		v, err := a.Get(ctx, "k")
		return err == nil && v == "new"
	})
	awaitL1InUse(t, a)
	for range 3 {
		neverServes(t, "k", "old-k", map[string]*tiered.Cache[string]{"A": a})
	}
}

// TestAdversarialBatchPubSubKilledDuringItsRead (private redis-server):
// A's GetMany has read v1 of k from Redis but not yet seen the reply when
// CLIENT KILL TYPE pubsub ends every subscription, and B's Set(k, v2) is
// published while A is not subscribed (A's redials are refused). A must
// never serve v1 from L1 afterwards, and serves v2 once its subscription
// is back.
func TestAdversarialBatchPubSubKilledDuringItsRead(t *testing.T) {
	addr := privateRedis(t)
	admin := plainClient(t, addr)
	ctx := context.Background()
	ns := advNamespace(t)
	o := tiered.Options{HeartbeatInterval: 200 * time.Millisecond}
	an := newAdvNet(addr)
	rc := an.client(t)
	gate := newReplyPipelineGate(ns + ":k")
	rc.AddHook(gate)
	a := advCache(t, rc, ns, o)
	b := advCache(t, plainClient(t, addr), ns, o)
	if err := b.Set(ctx, "k", "v1"); err != nil {
		t.Fatal(err)
	}
	done := make(chan map[string]string, 1)
	go func() {
		m, _ := a.GetMany(ctx, []string{"k", "j"})
		done <- m
	}()
	<-gate.reached
	an.killSubscribers.Store(true)
	gaps := a.Stats().SubscriptionGaps
	if err := admin.ClientKillByFilter(ctx, "TYPE", "pubsub").Err(); err != nil {
		t.Fatalf("CLIENT KILL: %v", err)
	}
	awaitCond(t, 5*time.Second, "A to notice the gap", func() bool { return a.Stats().SubscriptionGaps > gaps })
	channel := "tiered:inv:" + ns
	awaitCond(t, 5*time.Second, "only B subscribed", func() bool {
		m, err := admin.PubSubNumSub(ctx, channel).Result()
		return err == nil && m[channel] == 1
	})
	if err := b.Set(ctx, "k", "v2"); err != nil {
		t.Fatal(err)
	}
	close(gate.release)
	<-done
	for range 3 {
		if v, fromL1, err := getFrom(a, "k"); fromL1 && v == "v1" {
			t.Errorf("A served v1 from L1 after its subscription died during its read: %s", describe(v, err))
		}
	}
	an.killSubscribers.Store(false)
	awaitL1InUse(t, a)
	if v, err := a.Get(ctx, "k"); err != nil || v != "v2" {
		t.Errorf("A after its subscription is back = %s; want v2", describe(v, err))
	}
}

// ---- foreign values ----

// TestAdversarialBatchForeignValuesAmongTheKeys: among the keys of a
// GetOrLoadMany are a hash, a string that is not ours, and a lease-looking
// value without a TTL (no lease of ours lasts forever). Each is loaded and
// replaced (not waited for), and read back by GetMany on another instance;
// GetMany alone never returns them.
func TestAdversarialBatchForeignValuesAmongTheKeys(t *testing.T) {
	ctx := context.Background()
	mr, raw := newMini(t)
	ns := advNamespace(t)
	o := tiered.Options{LoadTimeout: time.Minute}
	a := advCache(t, plainClient(t, mr.Addr()), ns, o)
	b := advCache(t, plainClient(t, mr.Addr()), ns, o)
	raw.HSet(ctx, ns+":hash", "f", "x")
	raw.Set(ctx, ns+":corrupt", "not an envelope", 0)
	lease := append([]byte{2, 2}, make([]byte, 16)...)
	lease = append(lease, []byte("0123456789abcdef")...)
	raw.Set(ctx, ns+":nottl", lease, 0)
	keys := []string{"hash", "corrupt", "nottl", "missing"}
	if m, err := b.GetMany(ctx, keys); err != nil || len(m) != 0 {
		t.Errorf("GetMany of foreign values = %v, %v; want none", m, err)
	}
	g := newGatedBatch(t, prefixed("v-"))
	g.release()
	got := awaitMany(t, goLoadMany(ctx, a, keys, g.load), 5*time.Second, "A")
	if got.err != nil || len(got.m) != len(keys) {
		t.Errorf("GetOrLoadMany over foreign values = %v, %v; want all loaded", got.m, got.err)
	}
	if calls := g.calls(); len(calls) != 1 || len(calls[0]) != len(keys) {
		t.Errorf("loader calls %v; want one with every key", calls)
	}
	m, err := b.GetMany(ctx, keys)
	if err != nil || len(m) != len(keys) {
		t.Errorf("GetMany on B after the load = %v, %v; want every loaded value", m, err)
	}
}

// TestAdversarialBatchCancelledAfterRedisGrantedItsLeases: Redis ran the
// lease reads of A's batch and granted the leases, but A's caller gave up
// before the replies reached it (a ContextTimeoutEnabled client, a slow
// link). A returns its ctx's error. A GetOrLoad on A that had joined the
// batch's flight of k1, and B reading k2, must not wait for those orphaned
// leases to run out (a minute here).
func TestAdversarialBatchCancelledAfterRedisGrantedItsLeases(t *testing.T) {
	mr, raw := newMini(t)
	ns := advNamespace(t)
	o := tiered.Options{LoadTimeout: time.Minute}
	rc := plainClient(t, mr.Addr())
	var armed atomic.Bool
	reached := make(chan struct{})
	rc.AddHook(pipelineHookFunc(func(ctx context.Context, cmds []redis.Cmder, next redis.ProcessPipelineHook) error {
		err := next(ctx, cmds)
		if err == nil && isLeaseScript(cmds[0]) && armed.CompareAndSwap(true, false) {
			close(reached)
			<-ctx.Done() // the replies arrive after the caller gave up
			for _, c := range cmds {
				c.SetErr(ctx.Err())
			}
			return ctx.Err()
		}
		return err
	}))
	a := advCache(t, rc, ns, o)
	b := advCache(t, plainClient(t, mr.Addr()), ns, o)
	armed.Store(true)
	cctx, cancel := context.WithCancel(context.Background())
	gb := newGatedBatch(t, prefixed("batch-"))
	gb.release()
	ra := goLoadMany(cctx, a, []string{"k1", "k2"}, gb.load)
	<-reached
	misses := a.Stats().LocalMisses
	var loads atomic.Int32
	rs := goLoad(context.Background(), a, "k1", returning(&loads, "v"))
	awaitCond(t, 5*time.Second, "A's GetOrLoad to miss", func() bool { return a.Stats().LocalMisses > misses })
	awaitLeased(t, raw, ns, "k2", false)
	cancel()
	if got := awaitMany(t, ra, 5*time.Second, "the cancelled batch"); !errors.Is(got.err, context.Canceled) {
		t.Errorf("cancelled GetOrLoadMany = %v, %v; want context.Canceled", got.m, got.err)
	}
	// k1 is read and loaded for the GetOrLoad that waits for it, as a
	// GetOrLoad's flight would be; k2, which nobody waited for, is not.
	if got := awaitResult(t, rs, 5*time.Second, "A's GetOrLoad of k1"); got.err != nil || got.v != "batch-k1" || loads.Load() != 0 {
		t.Errorf("A's GetOrLoad joined to the batch whose caller gave up = %s (%d loads of its own); want the batch's load of k1 within 5 s, not a wait for the orphaned lease",
			describe(got.v, got.err), loads.Load())
	}
	if calls := gb.calls(); len(calls) != 1 || !slices.Equal(calls[0], []string{"k1"}) {
		t.Errorf("the batch's loader was called with %v; want [k1] alone, for its waiter", calls)
	}
	if got := awaitResult(t, goLoad(context.Background(), b, "k2", returning(&loads, "v")), 5*time.Second, "B's GetOrLoad of k2"); got.err != nil || got.v != "v" {
		t.Errorf("B's GetOrLoad of a key the abandoned batch had leased = %s; want \"v\" within 5 s", describe(got.v, got.err))
	}
}

// pipelineHookFunc sees what a client sends: a pipeline, or a single
// command as a pipeline of one (a batch of one key sends its script alone).
type pipelineHookFunc func(ctx context.Context, cmds []redis.Cmder, next redis.ProcessPipelineHook) error

func (h pipelineHookFunc) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h pipelineHookFunc) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		return h(ctx, []redis.Cmder{cmd}, func(ctx context.Context, cmds []redis.Cmder) error { return next(ctx, cmds[0]) })
	}
}
func (h pipelineHookFunc) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { return h(ctx, cmds, next) }
}

// TestAdversarialBatchAfterScriptFlush: Redis forgot the scripts (SCRIPT
// FLUSH, a restart, a failover to a replica that never ran them). A batch's
// lease reads, write-backs and releases are pipelined EVALSHAs: each must
// run exactly once, so the values are cached in both tiers (a write-back
// run twice would refuse its own value) and the next call loads nothing.
func TestAdversarialBatchAfterScriptFlush(t *testing.T) {
	ctx := context.Background()
	mr, raw := newMini(t)
	ns := advNamespace(t)
	a := advCache(t, plainClient(t, mr.Addr()), ns, tiered.Options{})
	b := advCache(t, plainClient(t, mr.Addr()), ns, tiered.Options{})
	warm := newGatedBatch(t, prefixed("w-"))
	warm.release()
	if _, err := a.GetOrLoadMany(ctx, []string{"w1", "w2"}, warm.load); err != nil {
		t.Fatal(err)
	}
	if err := raw.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	g := newGatedBatch(t, func(keys []string) (map[string]string, error) {
		return map[string]string{"k1": "v-k1", "k2": "v-k2"}, nil // k3 left out: released
	})
	g.release()
	got := awaitMany(t, goLoadMany(ctx, a, []string{"k1", "k2", "k3"}, g.load), 5*time.Second, "A")
	if got.err != nil || len(got.m) != 2 {
		t.Fatalf("GetOrLoadMany after SCRIPT FLUSH = %v, %v", got.m, got.err)
	}
	for _, k := range []string{"k1", "k2"} {
		if v, _ := rawPayload(t, raw, ns, k); v != "v-"+k {
			t.Errorf("Redis holds %q for %s after the write-back; want v-%s", v, k, k)
		}
	}
	if _, ok := rawPayload(t, raw, ns, "k3"); ok {
		t.Error("Redis still holds the lease of the key left out")
	}
	if m, err := b.GetOrLoadMany(ctx, []string{"k1", "k2"}, mustNotLoadMany(t, "B after the write-back")); err != nil || len(m) != 2 {
		t.Errorf("B = %v, %v; want both from Redis", m, err)
	}
	if fr := a.Stats().FenceRejections; fr != 0 {
		t.Errorf("FenceRejections = %d; want 0: a write-back ran twice and refused its own value", fr)
	}
}

// TestAdversarialBatchRandomWritesAndBatchReads (shared real Redis): a
// "database" of 8 rows, one writer instance W that updates a row and then
// Sets or Deletes its key, and batch readers on three instances (W
// included) whose loaders read the database. W's own batch reads of a key
// must never return a row older than W's last completed write of it (own
// writes); and once every instance has received every message, every
// instance's GetOrLoadMany of all keys returns the database's rows.
func TestAdversarialBatchRandomWritesAndBatchReads(t *testing.T) {
	raw := realRedis(t)
	ns := advNamespace(t)
	cleanNamespace(t, raw, ns)
	o := tiered.Options{LoadTimeout: 30 * time.Second}
	cs := make([]*tiered.Cache[string], 3)
	for i := range cs {
		cs[i] = advCache(t, plainClient(t, raw.Options().Addr), ns, o)
	}
	w := cs[0]
	const rows = 8
	keys := make([]string, rows)
	var db [rows]atomic.Int64
	for i := range keys {
		keys[i] = "row" + strconv.Itoa(i)
	}
	index := func(k string) int { n, _ := strconv.Atoi(k[3:]); return n }
	parse := func(v string) int64 { n, _ := strconv.ParseInt(v, 10, 64); return n }
	load := func(_ context.Context, ks []string) (map[string]string, error) {
		m := make(map[string]string, len(ks))
		for _, k := range ks {
			m[k] = strconv.FormatInt(db[index(k)].Load(), 10)
		}
		return m, nil
	}
	ctx := context.Background()
	published := func(y int) uint64 { return cs[y].Stats().InvalidationsPublished }
	var pub0, rec0 [3]uint64
	for y, c := range cs {
		pub0[y], rec0[y] = published(y), c.Stats().InvalidationsReceived
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for r, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := uint64(r + 1)
			for {
				select {
				case <-stop:
					return
				default:
				}
				rng = rng*6364136223846793005 + 1442695040888963407
				ks := []string{keys[rng>>33%rows], keys[rng>>40%rows], keys[rng>>50%rows]}
				var err error
				if rng>>20%4 == 0 {
					_, err = c.GetMany(ctx, ks)
				} else {
					_, err = c.GetOrLoadMany(ctx, ks, load)
				}
				if err != nil {
					t.Errorf("reader %d: %v", r, err)
					return
				}
			}
		}()
	}
	for n := range 400 {
		i := n * 7 % rows
		v := db[i].Add(1)
		var err error
		if n%3 == 0 {
			err = w.Delete(ctx, keys[i])
		} else {
			err = w.Set(ctx, keys[i], strconv.FormatInt(v, 10))
		}
		if err != nil {
			t.Fatal(err)
		}
		m, err := w.GetOrLoadMany(ctx, []string{keys[i], keys[(i+1)%rows]}, load)
		if err != nil {
			t.Fatal(err)
		}
		if got := parse(m[keys[i]]); got < v {
			t.Fatalf("W's GetOrLoadMany after its own write %d of %s = %q; want %d or newer", v, keys[i], m[keys[i]], v)
		}
		if n%5 == 0 {
			g, err := w.GetMany(ctx, []string{keys[i]})
			if got, ok := g[keys[i]]; err != nil || ok && parse(got) < v {
				t.Fatalf("W's GetMany after its own write %d of %s = %q, %v; want %d or newer", v, keys[i], got, err, v)
			}
		}
	}
	close(stop)
	wg.Wait()
	// Every message has reached every instance.
	for x, c := range cs {
		awaitCond(t, 10*time.Second, fmt.Sprintf("instance %d to receive every message", x), func() bool {
			var sent uint64
			for y := range cs {
				if y != x {
					sent += published(y) - pub0[y]
				}
			}
			return c.Stats().InvalidationsReceived-rec0[x] >= sent
		})
	}
	for x, c := range cs {
		m, err := c.GetOrLoadMany(ctx, keys, load)
		if err != nil {
			t.Fatal(err)
		}
		for i, k := range keys {
			if want := strconv.FormatInt(db[i].Load(), 10); m[k] != want {
				t.Errorf("instance %d: %s = %q at the end; want the database's %s", x, k, m[k], want)
			}
		}
	}
}

// TestAdversarialBatchJoinerOfACancelledBatchLoadsOnce: B2, a
// GetOrLoadMany of k and j, joins the flight of k that B1 (a GetOrLoadMany
// of k on the same instance) leads, and loads j. B1's caller gives up
// during its read of k. B2 waited for k: its result must come to it, as a
// GetOrLoad's leader gone during its read hands the read on to those who
// wait (singleflight.go). B2's loader must be called once, as the issue
// says ("load is called at most once per call"), not again for k.
func TestAdversarialBatchJoinerOfACancelledBatchLoadsOnce(t *testing.T) {
	mr, _ := newMini(t)
	ns := advNamespace(t)
	rc := plainClient(t, mr.Addr())
	var armed atomic.Bool
	reached := make(chan struct{})
	rc.AddHook(pipelineHookFunc(func(ctx context.Context, cmds []redis.Cmder, next redis.ProcessPipelineHook) error {
		if isLeaseScript(cmds[0]) && armed.CompareAndSwap(true, false) {
			close(reached)
			<-ctx.Done() // a slow link: the caller gives up first
			for _, c := range cmds {
				c.SetErr(ctx.Err())
			}
			return ctx.Err()
		}
		return next(ctx, cmds)
	}))
	a := advCache(t, rc, ns, tiered.Options{LoadTimeout: time.Minute})
	armed.Store(true)
	cctx, cancel := context.WithCancel(context.Background())
	g1 := newGatedBatch(t, prefixed("b1-"))
	g1.release()
	r1 := goLoadMany(cctx, a, []string{"k"}, g1.load)
	<-reached
	g2 := newGatedBatch(t, prefixed("b2-"))
	g2.release()
	r2 := goLoadMany(context.Background(), a, []string{"k", "j"}, g2.load)
	if ks := g2.awaitStart(t); !slices.Equal(ks, []string{"j"}) {
		t.Fatalf("B2's first load asked for %v; want [j] (k is B1's)", ks)
	}
	cancel()
	if got := awaitMany(t, r1, 5*time.Second, "B1"); !errors.Is(got.err, context.Canceled) {
		t.Errorf("B1 = %v, %v; want context.Canceled", got.m, got.err)
	}
	got := awaitMany(t, r2, 5*time.Second, "B2")
	if got.err != nil || len(got.m) != 2 || got.m["j"] != "b2-j" {
		t.Errorf("B2 = %v, %v; want k and j", got.m, got.err)
	}
	if calls := g2.calls(); len(calls) != 1 {
		t.Errorf("B2's loader was called %d times (%v); want once: it waited for k, whose leader's caller gave up", len(calls), calls)
	}
}
