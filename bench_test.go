package tiered

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/ristretto/v2"
	"github.com/redis/go-redis/v9"
)

// BenchmarkTiers measures every tier side by side, with one value (a
// ~200-byte struct, benchValue, cached as *benchValue) and one key set
// (benchKeys keys, read round-robin, through copies of the key strings
// that filled the caches, as a service builds its keys per request):
//
//	go test -bench Tiers -run '^$'                           # embedded miniredis
//	REDIS_ADDR=127.0.0.1:6379 go test -bench Tiers -run '^$' # a real Redis
//
// Every sub-benchmark runs serially (serial/...) and under RunParallel
// (parallel/...). Floors first, then the tiers, then the pairs:
//
//	ristretto-Get      raw ristretto Get of a string key, sized like our L1,
//	                   with ristretto's default key hashing (the L1 floor:
//	                   what a service using ristretto directly pays)
//	redis-GET          raw go-redis GET of the value's JSON, not decoded
//	redis-GET+decode   raw go-redis GET + json.Unmarshal (the L2 floor)
//	db-load            the simulated database call alone (the loader floor)
//	L1-Get             Cache.Get, L1 hit
//	L1-GetOrLoad       Cache.GetOrLoad with a preallocated loader, L1 hit
//	L1-Get-byvalue     L1-Get on a Cache[benchValue]: the 136-byte struct is
//	                   copied out on every hit
//	L2-Get             Cache.Get of a key whose L1 entry has expired: L1 miss,
//	                   Redis GET, envelope and JSON decode, L1 fill (on a
//	                   Cache of its own with a LocalTTL of 1 ms; a key is read
//	                   again only after all 1024 others, tens of ms later)
//	loader             Cache.GetOrLoad of a key no tier has: L1 miss, Redis
//	                   miss, load, write-back (SET NX), L1 fill (on a Cache
//	                   of its own, so that the fresh keys stay out of the
//	                   L1 the other benchmarks read)
//	zipf               GetOrLoad with Zipf(s=1.1) key popularity, an L1 that
//	                   holds ~10% of the keys and every key in Redis
//	pair-L1            L1-Get and ristretto-Get alternately, 1024 of each at a
//	                   time; ns/op is per pair
//	pair-L1-redis      1024 L1-Get, then 16 redis-GET, alternately (the L1
//	                   hits run just after network I/O, with colder CPU
//	                   caches than in pair-L1)
//	pair-L2            L2-Get and redis-GET+decode alternately, 16 at a time
//
// Custom metrics:
//
//	x-ristretto          pair-L1: L1 hit time ÷ ristretto Get time (target ≤ 1.3)
//	x-faster-than-redis  pair-L1-redis: redis GET time ÷ L1 hit time
//	                     (target ≥ 500 on a real Redis)
//	x-redis-get+decode   pair-L2: L2 hit time ÷ GET+decode time (target ≤ 1.1)
//	x-...-mean           the same ratio of mean block times: it keeps the
//	                     slow blocks the median drops, whoever caused them
//	ns/L1-hit, ns/ristretto-Get, ns/redis-GET, ns/L2-hit, ns/redis-GET+decode
//	                     the pairs' sides: median time per op over the
//	                     blocks (per goroutine under RunParallel)
//	x-db-load            loader ns/op ÷ the fastest db-load ns/op of the run
//	L1-hit-%, L2-read-%, loads/op
//	                     zipf: share of reads L1 answered, Redis reads and
//	                     loads per read (concurrent misses share one read)
//
// The pairs give the ratios: they alternate the two sides in short blocks,
// so a change in machine load during the run hits both sides alike, and
// compare median block times, so blocks that another process preempted do
// not count; ratios of separate runs move with the load of a shared
// machine. x-db-load compares with a floor that ran earlier, and is absent
// if -bench filtered it out.
//
// The simulated database takes 1 ms, or TIERED_BENCH_DB_LATENCY (a Go
// duration). miniredis answers over loopback TCP but in-process, without a
// real server's work or a real network: its latencies are not Redis's. With
// REDIS_ADDR, every key lives under a fresh namespace that is deleted at the
// end (never FLUSHALL).
func BenchmarkTiers(b *testing.B) {
	env := newBenchEnv(b)
	for _, mode := range []string{"serial", "parallel"} {
		b.Run(mode, func(b *testing.B) {
			for _, bm := range append(env.benchmarks(), env.batchBenchmarks()...) {
				b.Run(bm.name, func(b *testing.B) {
					b.ReportAllocs()
					if bm.pair != nil {
						bm.pair(b, mode)
						return
					}
					bm.run(b, mode)
					env.record(b, mode, bm)
				})
			}
		})
	}
}

const (
	benchKeys  = 1024 // a power of two: keys are picked with i & (benchKeys-1)
	benchZipfS = 1.1
	benchZipfN = 1 << 16 // length of the precomputed Zipf key sequence
)

// benchValue is a realistic cached row: ~200 bytes of JSON, 136 bytes in
// memory plus its strings.
type benchValue struct {
	ID        int64     `json:"id"`
	Name      string    `json:"name"`
	Email     string    `json:"email"`
	Country   string    `json:"country"`
	Tags      []string  `json:"tags"`
	Score     float64   `json:"score"`
	Active    bool      `json:"active"`
	CreatedAt time.Time `json:"created_at"`
	Plan      string    `json:"plan"`
}

func newBenchValue(i int) *benchValue {
	return &benchValue{
		ID:        int64(100000 + i),
		Name:      fmt.Sprintf("User Number %05d", i),
		Email:     fmt.Sprintf("user.number.%05d@example.com", i),
		Country:   "NL",
		Tags:      []string{"beta", "newsletter", "mobile"},
		Score:     float64(i) * 1.25,
		Active:    i%3 != 0,
		CreatedAt: time.Date(2024, 3, 14, 15, 9, 26, 0, time.UTC),
		Plan:      "professional-annual",
	}
}

type benchEnv struct {
	rdb       *redis.Client
	dbLatency time.Duration

	cache   *Cache[*benchValue]                   // L1 holds every key
	loader  *Cache[*benchValue]                   // same namespace; fills its L1 with fresh keys
	zipf    *Cache[*benchValue]                   // same namespace; L1 holds ~10% of the keys
	l2      *Cache[*benchValue]                   // same namespace; L1 entries live 1 ms
	byValue *Cache[benchValue]                    // own namespace
	raw     *ristretto.Cache[string, *benchValue] // sized like our L1

	keys     []string      // cache keys, as filled
	readKeys []string      // copies of keys, as read (see readKeys in newBenchEnv)
	rawKeys  []string      // Redis keys of plain JSON copies, for the raw floors
	values   []*benchValue // values[i] is stored under keys[i]
	zipfSeq  []uint16      // a fixed Zipf-distributed sequence of key indexes
	loadSeq  atomic.Uint64 // names the loader benchmark's fresh keys

	mu     sync.Mutex
	floors map[string]map[*testing.B]float64 // "mode/name" -> run -> ns/op
}

func newBenchEnv(b *testing.B) *benchEnv {
	b.Helper()
	env := &benchEnv{dbLatency: time.Millisecond, floors: make(map[string]map[*testing.B]float64)}
	if s := os.Getenv("TIERED_BENCH_DB_LATENCY"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			b.Fatalf("TIERED_BENCH_DB_LATENCY=%q: want a non-negative Go duration such as 1ms", s)
		}
		env.dbLatency = d
	}
	useReal := os.Getenv("REDIS_ADDR") != ""
	if useReal {
		env.rdb = realRedis(b)
	} else {
		_, env.rdb = newMiniredis(b)
	}
	ns := uniqueNamespace(b)
	if useReal {
		b.Cleanup(func() {
			deleteBenchNamespace(b, env.rdb, ns)
			deleteBenchNamespace(b, env.rdb, ns+"-byvalue")
		})
	}
	opts := Options{Namespace: ns, RemoteTTL: 10 * time.Minute, LocalTTL: 10 * time.Minute} // longer than a run
	env.cache = newTestCache[*benchValue](b, env.rdb, opts)
	env.loader = newTestCache[*benchValue](b, env.rdb, opts)
	env.byValue = newTestCache[benchValue](b, env.rdb, Options{Namespace: ns + "-byvalue", RemoteTTL: opts.RemoteTTL})
	env.l2 = newTestCache[*benchValue](b, env.rdb, Options{Namespace: ns, RemoteTTL: opts.RemoteTTL, LocalTTL: time.Millisecond})
	// Room for ~100 entries (see entryCost).
	per, _ := entryCost(newBenchValue(0), nil)
	opts.LocalMaxBytes = 100 * per
	env.zipf = newTestCache[*benchValue](b, env.rdb, opts)

	raw, err := ristretto.NewCache(&ristretto.Config[string, *benchValue]{
		NumCounters:        defaultLocalMaxBytes / 512 * 10,
		MaxCost:            defaultLocalMaxBytes,
		BufferItems:        64,
		IgnoreInternalCost: true,
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(raw.Close)
	env.raw = raw

	ctx := context.Background()
	pipe := env.rdb.Pipeline()
	for i := range benchKeys {
		k, v := fmt.Sprintf("key-%04d", i), newBenchValue(i)
		env.keys, env.values = append(env.keys, k), append(env.values, v)
		env.rawKeys = append(env.rawKeys, ns+":raw:"+k)
		js, err := json.Marshal(v)
		if err != nil {
			b.Fatal(err)
		}
		if i == 0 && (len(js) < 180 || len(js) > 240) {
			b.Fatalf("benchValue is %d bytes of JSON, want ~200", len(js))
		}
		pipe.Set(ctx, env.rawKeys[i], js, opts.RemoteTTL)
		if err := env.cache.Set(ctx, k, v); err != nil {
			b.Fatal(err)
		}
		if err := env.byValue.Set(ctx, k, *v); err != nil {
			b.Fatal(err)
		}
		raw.Set(k, v, int64(len(js)+len(k)))
	}
	if _, err := pipe.Exec(ctx); err != nil {
		b.Fatal(err)
	}
	raw.Wait()
	// A service builds its key strings per request: reads must not find
	// the bytes of the key an entry was filled under in the same memory.
	for _, k := range env.keys {
		env.readKeys = append(env.readKeys, strings.Clone(k))
	}
	for _, k := range env.keys {
		if _, ok := raw.Get(k); !ok {
			b.Fatalf("raw ristretto did not keep %s", k)
		}
	}

	z := rand.NewZipf(rand.New(rand.NewPCG(1, 2)), benchZipfS, 1, benchKeys-1)
	env.zipfSeq = make([]uint16, benchZipfN)
	for i := range env.zipfSeq {
		env.zipfSeq[i] = uint16(z.Uint64())
	}
	return env
}

// deleteBenchNamespace deletes every key of ns from a shared Redis.
func deleteBenchNamespace(b *testing.B, rdb *redis.Client, ns string) {
	ctx := context.Background()
	iter := rdb.Scan(ctx, 0, ns+":*", 1000).Iterator()
	var batch []string
	for iter.Next(ctx) {
		if batch = append(batch, iter.Val()); len(batch) == 1000 {
			rdb.Unlink(ctx, batch...)
			batch = batch[:0]
		}
	}
	if len(batch) > 0 {
		rdb.Unlink(ctx, batch...)
	}
	if err := iter.Err(); err != nil {
		b.Logf("cleaning namespace %s: %v", ns, err)
	}
}

// load is the simulated database: it waits dbLatency and returns a row.
func (env *benchEnv) load(_ context.Context, key string) (*benchValue, error) {
	if env.dbLatency > 0 {
		time.Sleep(env.dbLatency)
	}
	return env.values[len(key)%benchKeys], nil
}

// warmL1 makes sure c's L1 holds every key, so that the next reads are hits.
func warmL1[V any](b *testing.B, env *benchEnv, c *Cache[V]) {
	b.Helper()
	ctx := context.Background()
	for _, k := range env.keys {
		for try := 0; ; try++ {
			if _, ok := c.local.get(k); ok {
				break
			}
			if try == 100 {
				b.Fatalf("L1 does not keep %s", k)
			}
			if _, err := c.Get(ctx, k); err != nil {
				b.Fatal(err)
			}
			c.local.store.Wait()
		}
	}
}

// benchOp is one iteration of a benchmark; i picks the key.
type benchOp func(ctx context.Context, i uint64) error

// tierBenchmark is a sub-benchmark of BenchmarkTiers: either op (with optional
// setup before timing and metrics after), or pair.
type tierBenchmark struct {
	name    string
	op      benchOp
	setup   func(b *testing.B)
	metrics func(b *testing.B, mode string, ns float64)
	pair    func(b *testing.B, mode string)
}

func (env *benchEnv) benchmarks() []tierBenchmark {
	const mask = benchKeys - 1
	c, load := env.cache, env.load // a method value, made once
	ristrettoGet := func(_ context.Context, i uint64) error {
		v, ok := env.raw.Get(env.readKeys[i&mask])
		if !ok {
			return ErrNotFound
		}
		return touchValue(v)
	}
	redisGetDecode := func(ctx context.Context, i uint64) error {
		js, err := env.rdb.Get(ctx, env.rawKeys[i&mask]).Bytes()
		if err != nil {
			return err
		}
		var v benchValue
		if err := json.Unmarshal(js, &v); err != nil {
			return err
		}
		return touchValue(&v)
	}
	redisGet := func(ctx context.Context, i uint64) error {
		return env.rdb.Get(ctx, env.rawKeys[i&mask]).Err()
	}
	l1Get := func(ctx context.Context, i uint64) error {
		v, err := c.Get(ctx, env.readKeys[i&mask])
		if err != nil {
			return err
		}
		return touchValue(v)
	}
	l2Get := func(ctx context.Context, i uint64) error {
		v, err := env.l2.Get(ctx, env.readKeys[i&mask])
		if err != nil {
			return err
		}
		return touchValue(v)
	}
	warmMain := func(b *testing.B) { warmL1(b, env, c) }
	var zipfBefore Stats
	return []tierBenchmark{
		{name: "ristretto-Get", op: ristrettoGet},
		{name: "redis-GET", op: redisGet},
		{name: "redis-GET+decode", op: redisGetDecode},
		{name: "db-load", op: func(ctx context.Context, i uint64) error {
			v, err := load(ctx, env.readKeys[i&mask])
			if err != nil {
				return err
			}
			return touchValue(v)
		}},
		{name: "L1-Get", setup: warmMain, op: l1Get},
		{name: "L1-GetOrLoad", setup: warmMain, op: func(ctx context.Context, i uint64) error {
			v, err := c.GetOrLoad(ctx, env.readKeys[i&mask], load)
			if err != nil {
				return err
			}
			return touchValue(v)
		}},
		{name: "L1-Get-byvalue", setup: func(b *testing.B) { warmL1(b, env, env.byValue) }, op: func(ctx context.Context, i uint64) error {
			v, err := env.byValue.Get(ctx, env.readKeys[i&mask])
			if err != nil {
				return err
			}
			return touchValue(&v)
		}},
		{name: "L2-Get", op: l2Get},
		{name: "loader", op: func(ctx context.Context, _ uint64) error {
			k := "load-" + strconv.FormatUint(env.loadSeq.Add(1), 10)
			v, err := env.loader.GetOrLoad(ctx, k, load)
			if err != nil {
				return err
			}
			return touchValue(v)
		}, metrics: env.ratio("x-db-load", "db-load", false)},
		{name: "zipf", setup: func(*testing.B) { zipfBefore = env.zipf.Stats() }, op: func(ctx context.Context, i uint64) error {
			v, err := env.zipf.GetOrLoad(ctx, env.keys[env.zipfSeq[i%benchZipfN]], load)
			if err != nil {
				return err
			}
			return touchValue(v)
		}, metrics: func(b *testing.B, _ string, _ float64) {
			s, n := env.zipf.Stats(), float64(b.N)
			b.ReportMetric(100*float64(s.LocalHits-zipfBefore.LocalHits)/n, "L1-hit-%")
			b.ReportMetric(100*float64(s.RemoteHits+s.RemoteMisses-zipfBefore.RemoteHits-zipfBefore.RemoteMisses)/n, "L2-read-%")
			b.ReportMetric(float64(s.Loads-zipfBefore.Loads)/n, "loads/op")
		}},
		{name: "pair-L1", pair: func(b *testing.B, mode string) {
			warmMain(b)
			runBenchPair(b, mode, benchPair{tier: l1Get, tierName: "L1-hit", tierBlock: 1024,
				floor: ristrettoGet, floorName: "ristretto-Get", floorBlock: 1024, unit: "x-ristretto"})
		}},
		{name: "pair-L1-redis", pair: func(b *testing.B, mode string) {
			warmMain(b)
			runBenchPair(b, mode, benchPair{tier: l1Get, tierName: "L1-hit", tierBlock: 1024,
				floor: redisGet, floorName: "redis-GET", floorBlock: 16, unit: "x-faster-than-redis", inverse: true})
		}},
		{name: "pair-L2", pair: func(b *testing.B, mode string) {
			runBenchPair(b, mode, benchPair{tier: l2Get, tierName: "L2-hit", tierBlock: 16,
				floor: redisGetDecode, floorName: "redis-GET+decode", floorBlock: 16, unit: "x-redis-get+decode"})
		}},
	}
}

// touchValue reads the value so that the compiler cannot drop the read, without
// writing shared memory (which would make parallel runs contend).
func touchValue(v *benchValue) error {
	if v == nil || v.ID == 0 {
		return fmt.Errorf("empty value")
	}
	return nil
}

func (bm tierBenchmark) run(b *testing.B, mode string) {
	ctx := context.Background()
	if bm.setup != nil {
		bm.setup(b)
	}
	if mode == "serial" {
		i := rand.Uint64()
		for b.Loop() {
			if err := bm.op(ctx, i); err != nil {
				b.Fatal(err)
			}
			i++
		}
		return
	}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := rand.Uint64()
		for pb.Next() {
			if err := bm.op(ctx, i); err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
}

// benchPair compares a tier with its floor.
type benchPair struct {
	tier, floor           benchOp
	tierName, floorName   string
	tierBlock, floorBlock int    // ops of each side in a row
	unit                  string // of the ratio: tier ÷ floor, or floor ÷ tier if inverse
	inverse               bool
}

// runBenchPair runs p's tier and floor alternately, a block of each at a time
// (in each goroutine, under RunParallel), and times every block. It
// reports each side's median block time per op and the ratio of the two
// medians. An iteration of the benchmark is one op of the tier, plus
// floorBlock/tierBlock ops of the floor, so ns/op is of such a mix.
//
// Alternating in short blocks exposes both sides to the same machine load,
// and the medians drop the blocks that another process preempted; a ratio
// of separate runs, or of sums, moves with the load of a shared machine.
func runBenchPair(b *testing.B, mode string, p benchPair) {
	ctx := context.Background()
	var mu sync.Mutex
	var tierNs, floorNs []float64 // per-op time of each block
	blocks := func(i uint64, n int, tierS, floorS *[]float64) error {
		nf := max(1, n*p.floorBlock/p.tierBlock)
		t0 := time.Now()
		for j := range nf {
			if err := p.floor(ctx, i+uint64(j)); err != nil {
				return err
			}
		}
		t1 := time.Now()
		for j := range n {
			if err := p.tier(ctx, i+uint64(j)); err != nil {
				return err
			}
		}
		t2 := time.Now()
		*floorS = append(*floorS, float64(t1.Sub(t0))/float64(nf))
		*tierS = append(*tierS, float64(t2.Sub(t1))/float64(n))
		return nil
	}
	merge := func(t, f []float64) {
		mu.Lock()
		tierNs, floorNs = append(tierNs, t...), append(floorNs, f...)
		mu.Unlock()
	}
	b.ResetTimer()
	if mode == "serial" {
		var t, f []float64
		i := rand.Uint64()
		for done := 0; done < b.N; done += p.tierBlock {
			n := min(p.tierBlock, b.N-done)
			if err := blocks(i, n, &t, &f); err != nil {
				b.Fatal(err)
			}
			i += uint64(n)
		}
		merge(t, f)
	} else {
		b.RunParallel(func(pb *testing.PB) {
			var t, f []float64
			defer func() { merge(t, f) }()
			i, n := rand.Uint64(), 0
			for pb.Next() {
				if n++; n == p.tierBlock {
					if err := blocks(i, n, &t, &f); err != nil {
						b.Error(err)
						return
					}
					i, n = i+uint64(n), 0
				}
			}
			if n > 0 {
				if err := blocks(i, n, &t, &f); err != nil {
					b.Error(err)
				}
			}
		})
	}
	b.StopTimer()
	if len(tierNs) == 0 {
		return
	}
	tm, fm := medianOf(tierNs), medianOf(floorNs)
	b.ReportMetric(tm, "ns/"+p.tierName)
	b.ReportMetric(fm, "ns/"+p.floorName)
	ratio := func(tier, floor float64, unit string) {
		switch {
		case tier == 0 || floor == 0:
		case p.inverse:
			b.ReportMetric(floor/tier, unit)
		default:
			b.ReportMetric(tier/floor, unit)
		}
	}
	ratio(tm, fm, p.unit)
	ratio(meanOf(tierNs), meanOf(floorNs), p.unit+"-mean")
}

func meanOf(xs []float64) float64 {
	var sum float64
	for _, x := range xs {
		sum += x
	}
	return sum / float64(len(xs))
}

func medianOf(xs []float64) float64 {
	slices.Sort(xs)
	return xs[len(xs)/2]
}

// record keeps this run's ns/op (for later benchmarks to compare with) and
// reports the benchmark's custom metrics.
func (env *benchEnv) record(b *testing.B, mode string, bm tierBenchmark) {
	if b.N == 0 {
		return
	}
	ns := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	env.mu.Lock()
	runs := env.floors[mode+"/"+bm.name]
	if runs == nil {
		runs = make(map[*testing.B]float64)
		env.floors[mode+"/"+bm.name] = runs
	}
	runs[b] = ns // the last round of a run overwrites the earlier ones
	env.mu.Unlock()
	if bm.metrics != nil {
		bm.metrics(b, mode, ns)
	}
}

// ratio returns a metrics func that reports, as unit, ns/op ÷ the fastest
// run of floor in the same mode, or its inverse.
func (env *benchEnv) ratio(unit, floor string, inverse bool) func(b *testing.B, mode string, ns float64) {
	return func(b *testing.B, mode string, ns float64) {
		env.mu.Lock()
		best := 0.0
		for _, f := range env.floors[mode+"/"+floor] {
			if best == 0 || f < best {
				best = f
			}
		}
		env.mu.Unlock()
		switch {
		case best == 0 || ns == 0:
		case inverse:
			b.ReportMetric(best/ns, unit)
		default:
			b.ReportMetric(ns/best, unit)
		}
	}
}

// BenchmarkFleetStampede measures a cold key that a whole fleet reads at
// once: N instances (each a Cache on a *redis.Client of its own, all on one
// Namespace), 20 goroutines in each, all call GetOrLoad on one key no tier
// has, with a loader that takes 2 ms. An iteration is one such key, a fresh
// one each time; the callers are released together once all are parked.
//
//	REDIS_ADDR=127.0.0.1:6379 go test -run '^$' -bench FleetStampede -benchtime=20x
//
// Without REDIS_ADDR it runs on an embedded miniredis. Custom metrics:
//
//	loads/key  loader calls per cold key, summed over the fleet: 1 when one
//	           load serves the fleet, up to N when each instance loads on
//	           its own (its 20 callers share one load either way)
//	p100-ms    the slowest caller's latency, from the release of the callers
//	           to its GetOrLoad's return, over every caller of every key
func BenchmarkFleetStampede(b *testing.B) {
	for _, n := range []int{1, 5, 20} {
		b.Run("instances="+strconv.Itoa(n), func(b *testing.B) { benchFleetStampede(b, n) })
	}
}

const (
	fleetCallers   = 20                   // goroutines per instance
	fleetLoadDelay = 2 * time.Millisecond // the loader's simulated database call
)

func benchFleetStampede(b *testing.B, instances int) {
	useReal := os.Getenv("REDIS_ADDR") != ""
	var first *redis.Client
	if useReal {
		first = realRedis(b)
	} else {
		_, first = newMiniredis(b)
	}
	ns := uniqueNamespace(b)
	if useReal {
		b.Cleanup(func() { deleteBenchNamespace(b, first, ns) }) // after the Caches close
	}
	caches := make([]*Cache[*benchValue], instances)
	for i := range caches {
		rdb := first
		if i > 0 {
			rdb = redis.NewClient(&redis.Options{Addr: first.Options().Addr})
			b.Cleanup(func() { _ = rdb.Close() })
		}
		// newTestCache returns once the Cache's subscription is confirmed
		// and healthy, so every instance is in the fleet when timing starts.
		caches[i] = newTestCache[*benchValue](b, rdb, Options{Namespace: ns, RemoteTTL: 10 * time.Minute})
	}
	var loads atomic.Int64
	value := newBenchValue(1)
	load := func(context.Context, string) (*benchValue, error) { // made once: no allocation per call
		loads.Add(1)
		time.Sleep(fleetLoadDelay)
		return value, nil
	}
	ctx := context.Background()
	prefix := fmt.Sprintf("stampede-%08x-", rand.Uint32())
	took := make([]time.Duration, instances*fleetCallers) // per caller, of the current key
	var worst time.Duration
	keys := 0
	for b.Loop() {
		key := prefix + strconv.Itoa(keys)
		keys++
		var parked, done sync.WaitGroup
		release := make(chan struct{})
		var t0 time.Time // written before release is closed, read after
		for i, c := range caches {
			for j := range fleetCallers {
				parked.Add(1)
				done.Add(1)
				go func(slot int) {
					defer done.Done()
					parked.Done()
					<-release
					v, err := c.GetOrLoad(ctx, key, load)
					took[slot] = time.Since(t0)
					if err == nil {
						err = touchValue(v)
					}
					if err != nil {
						b.Error(err)
					}
				}(i*fleetCallers + j)
			}
		}
		parked.Wait()
		t0 = time.Now()
		close(release)
		done.Wait()
		worst = max(worst, slices.Max(took))
	}
	if keys > 0 {
		b.ReportMetric(float64(loads.Load())/float64(keys), "loads/key")
		b.ReportMetric(float64(worst)/float64(time.Millisecond), "p100-ms")
	}
}

// L1 efficiency: how much of what its budget allows L1 keeps serving, in
// two access patterns, each beside raw ristretto given the same budget,
// counters, costs and reads. Each iteration replays the whole pattern on a
// fresh Cache (embedded miniredis); run one:
//
//	go test -run '^$' -bench 'L1Churn|L1Zipf' -benchtime=1x
//
// raw ristretto runs twice: "raw-paced" makes a Redis GET on every miss, as
// a cache in front of Redis does and as tiered does, and "raw-tight" does
// not. The difference is not the Redis call itself: ristretto drops access
// records its policy goroutine has no time for (Metrics.GetsDropped), and
// in a tight loop it drops nearly all of them, so its admission policy sees
// no frequencies and admits every Set.

// l1EfficiencyValue is the cached value of the efficiency benchmarks: a
// 200-byte string, which a Cache[string] holds as it is.
var l1EfficiencyValue = strings.Repeat("v", 200)

// l1EfficiencyCache returns a Cache[string] whose L1 holds entries
// entries of l1EfficiencyValue, and what one costs.
func l1EfficiencyCache(b *testing.B, rdb *redis.Client, entries int64) (*Cache[string], int64) {
	per, _ := entryCost(l1EfficiencyValue, nil)
	// Entries outlive the run: what is measured is the policy, not expiry.
	return newTestCache[string](b, rdb, Options{LocalMaxBytes: entries * per, LocalTTL: time.Hour}), per
}

// rawL1 returns a raw ristretto with c's L1 budget, with its own policy
// configured as L1's was when ristretto's policy was L1's: one admission
// counter per 128 bytes of budget (rawCounters).
func rawL1(b *testing.B, maxBytes int64) *ristretto.Cache[string, string] {
	raw, err := ristretto.NewCache(&ristretto.Config[string, string]{
		NumCounters: rawCounters(maxBytes), MaxCost: maxBytes, BufferItems: 64, IgnoreInternalCost: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(raw.Close)
	return raw
}

// rawRead reads key from raw, and on a miss (after a Redis GET if paced)
// sets it at cost per. It reports whether it hit.
func rawRead(ctx context.Context, raw *ristretto.Cache[string, string], rdb *redis.Client, paced bool, key string, per int64) bool {
	if _, ok := raw.Get(key); ok {
		return true
	}
	if paced {
		rdb.Get(ctx, key)
	}
	raw.Set(key, l1EfficiencyValue, per)
	return false
}

// rawCounters returns, for a budget of maxBytes, the number of admission
// counters L1 gave ristretto when ristretto's policy was L1's: one per 128
// bytes, rounded down to a power of two (at least 1024), 3 to 4 per entry
// of ~500 bytes. More made the Zipf pattern's hit ratio better by about a
// point per doubling and the churn pattern's worse.
func rawCounters(maxBytes int64) int64 {
	n := int64(1024)
	for n*2*128 <= maxBytes {
		n *= 2
	}
	return n
}

// BenchmarkL1Churn replays issue 12's churn pattern: an L1 with room for
// 10,000 entries, GetOrLoad of 20,000 keys twice in order, then once in
// reverse order. An L1 that keeps the entries read last serves the first
// 10,000 reads of the reverse pass (LRU does, exactly). Metrics:
//
//	reverse-hits            tiered's L1 hits in the reverse pass
//	raw-paced-reverse-hits  raw ristretto, a Redis GET per miss
//	raw-tight-reverse-hits  raw ristretto, no Redis GET
func BenchmarkL1Churn(b *testing.B) {
	const fit, keys = 10000, 20000
	ctx := context.Background()
	names := make([]string, keys)
	for i := range names {
		names[i] = fmt.Sprintf("key-%05d", i)
	}
	order := make([]string, 0, 3*keys)
	order = append(append(order, names...), names...)
	reverse := slices.Clone(names)
	slices.Reverse(reverse)
	load := func(context.Context, string) (string, error) { return l1EfficiencyValue, nil }
	var hits, rawHits [2]int
	for b.Loop() {
		_, rdb := newMiniredis(b)
		c, per := l1EfficiencyCache(b, rdb, fit)
		for _, k := range order {
			if _, err := c.GetOrLoad(ctx, k, load); err != nil {
				b.Fatal(err)
			}
		}
		before := c.Stats().LocalHits
		for _, k := range reverse {
			if _, err := c.GetOrLoad(ctx, k, load); err != nil {
				b.Fatal(err)
			}
		}
		hits[0] = int(c.Stats().LocalHits - before)
		for i, paced := range []bool{true, false} {
			raw := rawL1(b, c.opts.LocalMaxBytes)
			for _, k := range order {
				rawRead(ctx, raw, rdb, paced, k, per)
			}
			rawHits[i] = 0
			for _, k := range reverse {
				if rawRead(ctx, raw, rdb, paced, k, per) {
					rawHits[i]++
				}
			}
		}
	}
	b.ReportMetric(float64(hits[0]), "reverse-hits")
	b.ReportMetric(float64(rawHits[0]), "raw-paced-reverse-hits")
	b.ReportMetric(float64(rawHits[1]), "raw-tight-reverse-hits")
}

// BenchmarkL1Zipf reads 100,000 keys with Zipf(s=1.1) popularity through
// an L1 with room for 10,000 entries, in two traces: 200,000 reads to warm
// up then 200,000 measured (short), and 2,000,000 then 1,000,000 (steady:
// the popularity of the tail of the 10,000 most popular keys, each read
// about once per 200,000 reads, can only be learnt from a long history;
// an LFU that counts every read of the whole history serves 87.5% of the
// short trace and 88.8% of the steady one). The optimum is what an L1
// holding the 10,000 most popular keys serves: the sum of their
// probabilities. Metrics (%):
//
//	L1-hit-%            tiered's L1 hit share
//	optimum-%           the optimum
//	raw-paced-hit-%     raw ristretto, a Redis GET per miss
//	raw-tight-hit-%     raw ristretto, no Redis GET
func BenchmarkL1Zipf(b *testing.B) {
	const keys, fit = 100000, 10000
	optimum := zipfOptimum(keys, fit)
	names := make([]string, keys)
	for i := range names {
		names[i] = fmt.Sprintf("key-%05d", i)
	}
	for _, trace := range []struct {
		name           string
		warm, measured int
	}{{"short", 200000, 200000}, {"steady", 2000000, 1000000}} {
		b.Run(trace.name, func(b *testing.B) {
			z := rand.NewZipf(rand.New(rand.NewPCG(3, 4)), benchZipfS, 1, keys-1)
			seq := make([]string, trace.warm+trace.measured)
			for i := range seq {
				seq[i] = names[z.Uint64()]
			}
			share, rawShare := l1ZipfRun(b, seq, trace.warm, fit)
			b.ReportMetric(100*share, "L1-hit-%")
			b.ReportMetric(100*optimum, "optimum-%")
			b.ReportMetric(100*rawShare[0], "raw-paced-hit-%")
			b.ReportMetric(100*rawShare[1], "raw-tight-hit-%")
		})
	}
}

// zipfOptimum returns the share of reads of keys keys with Zipf(benchZipfS)
// popularity that an L1 holding the fit most popular ones serves.
func zipfOptimum(keys, fit int) float64 {
	var sum, top float64
	for i := range keys {
		p := math.Pow(float64(i+1), -benchZipfS) // rand.Zipf with v = 1: P(k) ∝ (1+k)^-s
		sum += p
		if i < fit {
			top += p
		}
	}
	return top / sum
}

// l1ZipfRun reads seq through tiered's L1 and through raw ristretto (paced
// and tight), and returns the shares of the reads after warm that hit.
func l1ZipfRun(b *testing.B, seq []string, warm, fit int) (share float64, rawShare [2]float64) {
	ctx := context.Background()
	measured := float64(len(seq) - warm)
	load := func(context.Context, string) (string, error) { return l1EfficiencyValue, nil }
	for b.Loop() {
		_, rdb := newMiniredis(b)
		c, per := l1EfficiencyCache(b, rdb, int64(fit))
		var before uint64
		for i, k := range seq {
			if i == warm {
				before = c.Stats().LocalHits
			}
			if _, err := c.GetOrLoad(ctx, k, load); err != nil {
				b.Fatal(err)
			}
		}
		share = float64(c.Stats().LocalHits-before) / measured
		for j, paced := range []bool{true, false} {
			raw := rawL1(b, c.opts.LocalMaxBytes)
			hits := 0
			for i, k := range seq {
				if rawRead(ctx, raw, rdb, paced, k, per) && i >= warm {
					hits++
				}
			}
			rawShare[j] = float64(hits) / measured
		}
	}
	return share, rawShare
}

// BenchmarkEntryCost measures the estimate of a value's memory that every
// fill, Set and carried message pays once (never a hit): a reflection walk
// of the decoded value.
//
//	go test -run '^$' -bench EntryCost
func BenchmarkEntryCost(b *testing.B) {
	ints := make([]int, 1000)
	attrs := make(map[string]string, 20)
	for i := range 20 {
		attrs["field-"+strconv.Itoa(i)] = "value-" + strconv.Itoa(i)
	}
	for _, bm := range []struct {
		name  string
		value any
	}{
		{"string", l1EfficiencyValue},
		{"[]int-1000", ints},
		{"*benchValue", newBenchValue(1)},
		{"map[string]string-20", attrs},
	} {
		b.Run(bm.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				entryCost(bm.value, nil)
			}
		})
	}
}
