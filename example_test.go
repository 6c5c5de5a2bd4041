package tiered_test

import (
	"bytes"
	"context"
	"encoding/gob"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/tieredcache/tiered"
)

// The examples run on an embedded miniredis (github.com/alicebob/miniredis)
// so that they need no server; in a service, Options.Redis is your own
// client, e.g. redis.NewClient(&redis.Options{Addr: "127.0.0.1:6379"}).

type User struct {
	ID   string
	Name string
}

func ExampleNew() {
	mr, err := miniredis.Run() // an embedded Redis, for the example
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()

	users, err := tiered.New[User](tiered.Options{
		Redis:     rdb,        // required; never closed by the cache
		Namespace: "users:v1", // required; Redis keys are "users:v1:<key>"
		LocalTTL:  30 * time.Second,
		RemoteTTL: time.Hour,
	})
	if err != nil {
		panic(err)
	}
	defer users.Close()

	// Until its invalidation subscription is confirmed, the cache answers
	// from Redis only. Wait for it where L1 matters from the first request.
	ctx := context.Background()
	readyCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := users.WaitReady(readyCtx); err != nil {
		panic(err)
	}

	if err := users.Set(ctx, "42", User{ID: "42", Name: "Ada"}); err != nil {
		panic(err)
	}
	u, err := users.Get(ctx, "42")
	fmt.Println(u.Name, err)

	// Unusable options are reported by New.
	_, err = tiered.New[User](tiered.Options{Namespace: "users:v1"})
	fmt.Println(errors.Is(err, tiered.ErrInvalidOption))
	// Output:
	// Ada <nil>
	// true
}

// A Redis Cluster: pass a *redis.ClusterClient. This example only compiles
// (it has no output to check, so it is not run): it needs a real cluster.
func ExampleNew_cluster() {
	rdb := redis.NewClusterClient(&redis.ClusterOptions{
		Addrs: []string{"10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.3:6379"},
		// Reads must go to masters: New rejects a client with ReadOnly,
		// RouteByLatency or RouteRandomly (a lagging replica would put
		// overwritten values back into L1). The defaults need no tuning;
		// timeouts bound how long a slow node can hold a call.
		ReadTimeout:  time.Second,
		WriteTimeout: time.Second,
	})
	defer rdb.Close()

	users, err := tiered.New[User](tiered.Options{
		Redis:     rdb,
		Namespace: "users:v1",
		// Optional: Set and Delete return only once a replica has the write
		// (Redis WAIT), so a failover right after does not lose it.
		// WaitTimeout must be below the client's ReadTimeout.
		WaitReplicas: 1,
		WaitTimeout:  500 * time.Millisecond,
		// PublishValueMaxBytes is left at its default, which on a
		// ClusterClient sends invalidations without values.
	})
	if err != nil {
		panic(err)
	}
	defer users.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := users.WaitReady(ctx); err != nil {
		panic(err)
	}
	// Delete groups keys by hash slot: no CROSSSLOT errors.
	_ = users.Delete(ctx, "42", "43", "44")
}

func ExampleCache_GetOrLoad() {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()

	users, err := tiered.New[User](tiered.Options{
		Redis:       rdb,
		Namespace:   "users:v1",
		NegativeTTL: time.Minute, // remember "not found" for a minute
	})
	if err != nil {
		panic(err)
	}
	defer users.Close()
	ctx := context.Background()
	readyCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := users.WaitReady(readyCtx); err != nil {
		panic(err)
	}

	loads := 0
	loadUser := func(ctx context.Context, id string) (User, error) {
		loads++ // e.g. SELECT ... WHERE id = $1
		if id != "42" {
			return User{}, fmt.Errorf("user %s: %w", id, tiered.ErrNotFound)
		}
		return User{ID: id, Name: "Ada"}, nil
	}

	for range 3 {
		u, err := users.GetOrLoad(ctx, "42", loadUser) // L1, else Redis, else loadUser
		fmt.Println(u.Name, err)
	}
	for range 2 {
		_, err := users.GetOrLoad(ctx, "7", loadUser)
		fmt.Println(errors.Is(err, tiered.ErrNotFound))
	}
	fmt.Println("loads:", loads)
	// Output:
	// Ada <nil>
	// Ada <nil>
	// Ada <nil>
	// true
	// true
	// loads: 2
}

func ExampleCache_Set() {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()

	users, err := tiered.New[User](tiered.Options{Redis: rdb, Namespace: "users:v1"})
	if err != nil {
		panic(err)
	}
	defer users.Close()
	ctx := context.Background()
	readyCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := users.WaitReady(readyCtx); err != nil {
		panic(err)
	}

	// After the row changes: write through. Every other instance drops its
	// L1 copy; this one serves the new value at once.
	if err := users.Set(ctx, "42", User{ID: "42", Name: "Grace"}); err != nil {
		// Redis failed (errors.Is(err, tiered.ErrRemoteUnavailable)):
		// this instance's L1 no longer holds the key either.
		panic(err)
	}
	u, err := users.Get(ctx, "42")
	fmt.Println(u.Name, err)

	// After the row is deleted: Delete, everywhere.
	if err := users.Delete(ctx, "42"); err != nil {
		panic(err)
	}
	_, err = users.Get(ctx, "42")
	fmt.Println(errors.Is(err, tiered.ErrNotFound))
	// Output:
	// Grace <nil>
	// true
}

// Two instances of a service, each with its own Redis client, share a
// Namespace: a Set on one reaches the other's L1 through Redis pub/sub.
// Here both run in one process on one embedded Redis.
func Example_twoInstances() {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	ctx := context.Background()
	readyCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()

	// Each instance has its own client, as separate processes would.
	rdbA := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdbA.Close()
	rdbB := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdbB.Close()
	a, err := tiered.New[User](tiered.Options{Redis: rdbA, Namespace: "users:v1"})
	if err != nil {
		panic(err)
	}
	defer a.Close()
	b, err := tiered.New[User](tiered.Options{Redis: rdbB, Namespace: "users:v1"})
	if err != nil {
		panic(err)
	}
	defer b.Close()
	if err := a.WaitReady(readyCtx); err != nil {
		panic(err)
	}
	if err := b.WaitReady(readyCtx); err != nil {
		panic(err)
	}

	// waitForMessages waits, for at most 5 s, until b has applied n
	// invalidation messages from other instances. A service does not wait
	// for invalidations; the example does, to show their effect
	// deterministically.
	waitForMessages := func(n uint64) {
		for deadline := time.Now().Add(5 * time.Second); b.Stats().InvalidationsReceived < n; {
			if time.Now().After(deadline) {
				panic("invalidation did not arrive")
			}
			time.Sleep(time.Millisecond)
		}
	}

	if err := a.Set(ctx, "42", User{ID: "42", Name: "Ada"}); err != nil {
		panic(err)
	}
	waitForMessages(1)
	u, _ := b.Get(ctx, "42") // from Redis; b keeps it in L1
	fmt.Println("b reads:", u.Name)
	u, _ = b.Get(ctx, "42") // from b's L1
	fmt.Println("b reads:", u.Name)

	if err := a.Set(ctx, "42", User{ID: "42", Name: "Grace"}); err != nil {
		panic(err)
	}
	waitForMessages(2)
	u, _ = b.Get(ctx, "42") // the message replaced (or dropped) b's old copy
	fmt.Println("b reads:", u.Name)
	fmt.Println("invalidations b received:", b.Stats().InvalidationsReceived)
	// Output:
	// b reads: Ada
	// b reads: Ada
	// b reads: Grace
	// invalidations b received: 2
}

// Stats returns monotonic counters: export them as counters (the modules
// extra/tieredprom and extra/tieredotel do it for Prometheus and
// OpenTelemetry).
func ExampleCache_Stats() {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()

	users, err := tiered.New[User](tiered.Options{Redis: rdb, Namespace: "users:v1"})
	if err != nil {
		panic(err)
	}
	defer users.Close()
	ctx := context.Background()
	readyCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := users.WaitReady(readyCtx); err != nil {
		panic(err)
	}

	loadUser := func(ctx context.Context, id string) (User, error) {
		if id != "42" {
			return User{}, tiered.ErrNotFound
		}
		return User{ID: id, Name: "Ada"}, nil
	}
	for range 3 {
		_, _ = users.GetOrLoad(ctx, "42", loadUser) // a load, then two L1 hits
	}
	_, _ = users.GetOrLoad(ctx, "7", loadUser) // a load that finds nothing
	_, _ = users.Get(ctx, "8")                 // in neither tier

	s := users.Stats()
	fmt.Println("local_hits_total", s.LocalHits)
	fmt.Println("local_misses_total", s.LocalMisses)
	fmt.Println("remote_hits_total", s.RemoteHits)
	fmt.Println("remote_misses_total", s.RemoteMisses)
	fmt.Println("loads_total", s.Loads)
	fmt.Println("remote_errors_total", s.RemoteErrors)
	// Output:
	// local_hits_total 2
	// local_misses_total 3
	// remote_hits_total 0
	// remote_misses_total 3
	// loads_total 2
	// remote_errors_total 0
}

// GobCodec stores values in Redis as encoding/gob. Any encoding plugs in
// the same way, msgpack or protobuf say: two methods, safe for concurrent
// use. Every instance of a Namespace must use the same Codec.
type GobCodec struct{}

func (GobCodec) Marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	if err := gob.NewEncoder(&b).Encode(v); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

func (GobCodec) Unmarshal(data []byte, v any) error {
	return gob.NewDecoder(bytes.NewReader(data)).Decode(v)
}

func ExampleCodec() {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()

	users, err := tiered.New[User](tiered.Options{
		Redis:     rdb,
		Namespace: "users:v1",
		Codec:     GobCodec{}, // default: tiered.JSONCodec
	})
	if err != nil {
		panic(err)
	}
	defer users.Close()
	ctx := context.Background()

	if err := users.Set(ctx, "42", User{ID: "42", Name: "Ada"}); err != nil {
		panic(err)
	}
	// Another instance, with its own client and an empty L1, decodes the
	// value it reads from Redis with the same Codec.
	rdb2 := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb2.Close()
	other, err := tiered.New[User](tiered.Options{Redis: rdb2, Namespace: "users:v1", Codec: GobCodec{}})
	if err != nil {
		panic(err)
	}
	defer other.Close()
	u, err := other.Get(ctx, "42")
	fmt.Println(u.Name, err)
	// Output:
	// Ada <nil>
}

// Per-key L1 TTLs: Options.LocalTTLFunc picks the L1 TTL by key (here by
// prefix), WithLocalTTL overrides it for one call, and Options.LocalTTL
// applies to everything else. An L1 entry never outlives its Redis entry.
func ExampleWithLocalTTL() {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()

	cache, err := tiered.New[string](tiered.Options{
		Redis:     rdb,
		Namespace: "config:v1",
		LocalTTL:  time.Minute,
		LocalTTLFunc: func(key string) time.Duration {
			if strings.HasPrefix(key, "flag:") {
				return 5 * time.Second // feature flags: short-lived in L1
			}
			return 0 // 0: use LocalTTL
		},
	})
	if err != nil {
		panic(err)
	}
	defer cache.Close()
	ctx := context.Background()
	readyCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := cache.WaitReady(readyCtx); err != nil {
		panic(err)
	}

	_ = cache.Set(ctx, "flag:dark-mode", "on")                                        // L1 TTL 5s (LocalTTLFunc)
	_ = cache.Set(ctx, "flag:beta", "off", tiered.WithLocalTTL(time.Second))          // L1 TTL 1s (per call)
	_ = cache.Set(ctx, "motd", "hello", tiered.WithRemoteTTL(24*time.Hour))           // L1 TTL 1m (LocalTTL), Redis TTL ~24h
	_, _ = cache.GetOrLoad(ctx, "region", loadRegion, tiered.WithLocalTTL(time.Hour)) // L1 TTL 1h

	for _, key := range []string{"flag:dark-mode", "flag:beta", "motd", "region"} {
		v, err := cache.Get(ctx, key)
		fmt.Println(key, v, err)
	}
	// Output:
	// flag:dark-mode on <nil>
	// flag:beta off <nil>
	// motd hello <nil>
	// region eu-west <nil>
}

func loadRegion(ctx context.Context, key string) (string, error) { return "eu-west", nil }

// A list endpoint reads a page of products in one call: the L1 hits cost
// nothing, the rest is one Redis round trip, and what neither tier has is
// one database query (here a map), written back in one round trip.
func ExampleCache_GetOrLoadMany() {
	mr, err := miniredis.Run() // an embedded Redis, for the example
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	products, err := tiered.New[string](tiered.Options{Redis: rdb, Namespace: "products:v1", NegativeTTL: time.Minute})
	if err != nil {
		panic(err)
	}
	defer products.Close()

	db := map[string]string{"p1": "kettle", "p2": "teapot", "p3": "mug"}
	// One query for every key neither tier has (SELECT ... WHERE id IN
	// (...)). A key it leaves out is not found: with NegativeTTL, that is
	// remembered and not asked for again.
	queries := 0
	loadProducts := func(_ context.Context, ids []string) (map[string]string, error) {
		queries++
		found := make(map[string]string, len(ids))
		for _, id := range ids {
			if name, ok := db[id]; ok {
				found[id] = name
			}
		}
		return found, nil
	}
	listPage := func(ctx context.Context, ids []string) []string {
		byID, err := products.GetOrLoadMany(ctx, ids, loadProducts)
		if err != nil {
			// The database failed: byID holds what the cache had.
			fmt.Println("partial page:", err)
		}
		var names []string
		for _, id := range ids {
			if name, ok := byID[id]; ok {
				names = append(names, name)
			}
		}
		return names
	}

	ctx := context.Background()
	fmt.Println(listPage(ctx, []string{"p1", "p2", "gone"}), queries)
	fmt.Println(listPage(ctx, []string{"p1", "p2", "p3", "gone"}), queries) // only p3 is queried

	// GetMany reads without loading.
	cached, err := products.GetMany(ctx, []string{"p3", "p4"})
	fmt.Println(cached, err)
	// Output:
	// [kettle teapot] 1
	// [kettle teapot mug] 2
	// map[p3:mug] <nil>
}

// Options.Cost charges L1 entries what the caller knows their values hold
// in memory, in place of the reflection estimate: here a []byte is charged
// its capacity (plus the entry's own ~200 bytes, always added).
func ExampleOptions_cost() {
	mr, err := miniredis.Run() // an embedded Redis, for the example
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()

	thumbs, err := tiered.New[[]byte](tiered.Options{
		Redis:         rdb,
		Namespace:     "thumbs:v1",
		LocalMaxBytes: 32 << 20,
		Cost:          func(v any) int64 { return int64(cap(v.([]byte))) },
	})
	if err != nil {
		panic(err)
	}
	defer thumbs.Close()

	ctx := context.Background()
	if err := thumbs.Set(ctx, "cat.png", []byte("\x89PNG...")); err != nil {
		panic(err)
	}
	b, err := thumbs.Get(ctx, "cat.png")
	fmt.Println(len(b), err)
	// Output: 7 <nil>
}

// Options.RefreshAfter refreshes a value in the background once it is old
// enough, while readers keep getting the current one; Options.StaleIfError
// serves the last value when a load fails shortly after it expired.
func Example_freshness() {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	prices, err := tiered.New[string](tiered.Options{
		Redis:           rdb,
		Namespace:       "prices",
		RemoteTTL:       time.Second, // short, for the example
		RemoteTTLJitter: -1,
		RefreshAfter:    100 * time.Millisecond, // refreshed from 50-100 ms of age on
		StaleIfError:    time.Minute,            // kept a minute past expiry, for failed loads
	})
	if err != nil {
		panic(err)
	}
	defer prices.Close()
	ctx := context.Background()
	if err := prices.WaitReady(ctx); err != nil {
		panic(err)
	}
	price := func(v string, err error) func(context.Context, string) (string, error) {
		return func(context.Context, string) (string, error) { return v, err }
	}

	p, _ := prices.GetOrLoad(ctx, "apple", price("1.00", nil))
	fmt.Println("loaded:", p)

	time.Sleep(150 * time.Millisecond) // the value ages past its refresh point
	p, _ = prices.GetOrLoad(ctx, "apple", price("1.10", nil))
	fmt.Println("past RefreshAfter, returned at once:", p)
	for deadline := time.Now().Add(5 * time.Second); p != "1.10" && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
		p, _ = prices.Get(ctx, "apple")
	}
	fmt.Println("refreshed in the background:", p)

	time.Sleep(1100 * time.Millisecond) // the value expires...
	mr.FastForward(1100 * time.Millisecond)
	p, err = prices.GetOrLoad(ctx, "apple", price("", errors.New("database down")))
	fmt.Println("load failed, within StaleIfError:", p, err) // ... and is served on a failed load

	s := prices.Stats()
	fmt.Println("refreshes:", s.RefreshesStarted, "stale served:", s.StaleServed)
	// Output:
	// loaded: 1.00
	// past RefreshAfter, returned at once: 1.00
	// refreshed in the background: 1.10
	// load failed, within StaleIfError: 1.10 <nil>
	// refreshes: 1 stale served: 1
}
