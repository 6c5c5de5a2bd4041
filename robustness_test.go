package tiered

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Bad input, bad user code and bad clients (issue 9): each gets a clear
// error or is contained, and loses nothing.

// Only clients whose invalidations the cache can watch are accepted.
func TestNewRejectsClientsItCannotWatch(t *testing.T) {
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1", "b": "127.0.0.1:2"}})
	t.Cleanup(func() { _ = ring.Close() })
	_, rdb := newMiniredis(t)
	for name, client := range map[string]redis.UniversalClient{
		"a Ring":            ring,
		"a wrapped client":  wrappedClient{rdb},
		"a wrapped cluster": wrappedClient{redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"127.0.0.1:1"}})},
	} {
		_, err := New[string](Options{Redis: client, Namespace: "ns"})
		if !errors.Is(err, ErrInvalidOption) {
			t.Errorf("New with %s = %v; want ErrInvalidOption", name, err)
		}
	}
}

// wrappedClient is a UniversalClient the cache knows nothing about.
type wrappedClient struct{ redis.UniversalClient }

func TestNewRejectsUnusableNumbers(t *testing.T) {
	_, rdb := newMiniredis(t)
	for name, opts := range map[string]Options{
		"NaN jitter":       {RemoteTTLJitter: math.NaN()},
		"infinite jitter":  {RemoteTTLJitter: math.Inf(-1)},
		"huge value sends": {PublishValueMaxBytes: 2 << 20},
	} {
		opts.Redis, opts.Namespace = rdb, "ns"
		if _, err := New[string](opts); !errors.Is(err, ErrInvalidOption) {
			t.Errorf("New with %s = %v; want ErrInvalidOption", name, err)
		}
	}
}

// panickyCodec is JSON, except that it panics decoding "boom".
type panickyCodec struct{ JSONCodec }

func (panickyCodec) Unmarshal(data []byte, v any) error {
	if strings.Contains(string(data), "boom") {
		panic("codec exploded")
	}
	return json.Unmarshal(data, v)
}

type doc struct{ Text string }

// A codec that panics on a value carried in an invalidation does not kill
// the process or the subscriber: the key is dropped, and later messages are
// still applied.
func TestACodecPanicOnAMessageValueDropsTheKey(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[doc](t, 2, miniredisDialer(t), Options{Codec: panickyCodec{}})
	a, b := cs[0], cs[1]
	if err := a.Set(ctx, "k", doc{"fine"}); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)
	mustHoldInL1(t, b, "k", doc{"fine"})
	before := b.Stats()
	if err := a.Set(ctx, "k", doc{"boom"}); !errors.Is(err, ErrEncode) {
		// Set reads its encoding back, so the panic surfaces here first.
		t.Fatalf("Set of a value the codec cannot read back = %v; want ErrEncode", err)
	}
	// Another instance wrote it without reading it back: publish the value
	// as that instance's write script would.
	env := encodeEnvelope(kindValue, time.Now().Add(time.Hour).UnixNano(), []byte(`{"Text":"boom"}`))
	if err := a.remote.client.Publish(ctx, a.remote.channel, encodeValueMessage(999, 1<<60, "k", env)).Err(); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, before.InvalidationsReceived+1)
	if _, fromL1, _ := getWithSource(b, "k"); fromL1 {
		t.Error("L1 still serves the key whose new value did not decode")
	}
	if s := b.Stats(); s.CorruptValues != before.CorruptValues+1 {
		t.Errorf("CorruptValues +%d; want +1", s.CorruptValues-before.CorruptValues)
	}
	if err := a.Set(ctx, "other", doc{"after"}); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, before.InvalidationsReceived+2) // the subscriber lives
}

// A LocalTTLFunc that panics, called for a value that came with an
// invalidation, does not kill the subscriber: LocalTTL applies.
func TestALocalTTLFuncPanicIsContained(t *testing.T) {
	ctx := context.Background()
	var armed sync.Once
	panics := make(chan struct{})
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{LocalTTLFunc: func(key string) time.Duration {
		if key == "bad" {
			armed.Do(func() { close(panics) })
			panic("ttl func exploded")
		}
		return 0
	}})
	a, b := cs[0], cs[1]
	if err := b.Set(ctx, "bad", "v0"); err != nil {
		t.Fatal(err)
	}
	mustHoldInL1(t, b, "bad", "v0")
	if err := a.Set(ctx, "bad", "v1"); err != nil {
		t.Fatal(err)
	}
	<-panics
	awaitReceived(t, b, 1)
	mustHoldInL1(t, b, "bad", "v1")
}

// A loader that never returns does not wedge its key: at LoadTimeout its
// callers get an error wrapping context.DeadlineExceeded, the next caller's
// loader runs, and the late result is not cached.
func TestAHungLoaderEndsItsFlightAtLoadTimeout(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{LoadTimeout: 50 * time.Millisecond})
	release := make(chan struct{})
	defer close(release)
	_, err := c.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) {
		<-release // ignores its context
		return "late", nil
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("GetOrLoad with a hung loader = %v; want context.DeadlineExceeded", err)
	}
	v, err := c.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "fresh", nil })
	if err != nil || v != "fresh" {
		t.Fatalf("next GetOrLoad = %q, %v; want its own loader's fresh", v, err)
	}
	if s := c.Stats(); s.LoadTimeouts != 1 {
		t.Errorf("LoadTimeouts = %d; want 1", s.LoadTimeouts)
	}
}

// A load whose result comes after LoadTimeout is not cached.
func TestALateLoadIsNotCached(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{LoadTimeout: 50 * time.Millisecond})
	returned := make(chan struct{})
	_, err := c.GetOrLoad(ctx, "k", func(ctx context.Context, _ string) (string, error) {
		defer close(returned)
		<-ctx.Done()
		return "late", nil
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("GetOrLoad = %v; want context.DeadlineExceeded", err)
	}
	<-returned
	if _, err := c.Get(ctx, "k"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after the late load = %v; want ErrNotFound", err)
	}
}

// Blocking commands holding every connection of the command pool do not
// make the subscription look dead: its liveness is proven on its own
// connection.
func TestABusyCommandPoolDoesNotMakeTheSubscriptionLookDead(t *testing.T) {
	mr, _ := newMiniredis(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), PoolSize: 4})
	t.Cleanup(func() { _ = rdb.Close() })
	const hb = 20 * time.Millisecond
	c := newTestCache[string](t, rdb, Options{HeartbeatInterval: hb})
	ctx := context.Background()
	if err := c.Set(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	before := c.Stats()
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = rdb.BLPop(ctx, 0, "list-"+c.opts.Namespace).Err()
		}()
	}
	waitUntil(t, invWait, "the pool to be taken", func() bool { return rdb.PoolStats().IdleConns == 0 && rdb.PoolStats().TotalConns >= 4 })
	// Ten intervals: a missed ping would be declared after three.
	pings := c.sub.pingSeq.Load()
	waitUntil(t, invWait, "ten pings", func() bool { return c.sub.pingSeq.Load() >= pings+10 })
	s := c.Stats()
	if s.SubscriptionGaps != before.SubscriptionGaps || s.HeartbeatMisses != before.HeartbeatMisses {
		t.Errorf("gaps +%d, heartbeat misses +%d with a busy pool; want none",
			s.SubscriptionGaps-before.SubscriptionGaps, s.HeartbeatMisses-before.HeartbeatMisses)
	}
	if _, fromL1, err := getWithSource(c, "k"); err != nil || !fromL1 {
		t.Errorf("Get with a busy pool: from L1 %v, %v; want an L1 hit", fromL1, err)
	}
	admin := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer admin.Close()
	for range 4 {
		admin.RPush(ctx, "list-"+c.opts.Namespace, "x")
	}
	wg.Wait()
}

// TTLs of a century and beyond mean "practically never": values are read
// back, not taken for corrupt, and L1 serves them.
func TestAbsurdlyLongTTLsWork(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	century := 100 * 365 * 24 * time.Hour
	a := newTestCache[string](t, rdb, Options{RemoteTTL: century, LocalTTLFunc: func(string) time.Duration { return math.MaxInt64 }})
	b := newTestCache[string](t, coreOtherClient(t, mr), Options{Namespace: a.opts.Namespace, RemoteTTL: century})
	if err := a.Set(ctx, "set", "v"); err != nil {
		t.Fatal(err)
	}
	mustGet(t, b, "set", "v")
	if s := b.Stats(); s.CorruptValues != 0 {
		t.Errorf("CorruptValues = %d; want 0", s.CorruptValues)
	}
	mustHoldInL1(t, a, "set", "v")
	loads := 0
	for range 3 {
		v, err := a.GetOrLoad(ctx, "loaded", func(context.Context, string) (string, error) { loads++; return "l", nil })
		if err != nil || v != "l" {
			t.Fatalf("GetOrLoad = %q, %v", v, err)
		}
	}
	if loads != 1 {
		t.Errorf("%d loads; want 1 (the write-back is read back)", loads)
	}
	mustHoldInL1(t, a, "loaded", "l")
}

// A value of another Redis type under our key is a corrupt value: counted,
// and replaced by the next load, which is then read back.
func TestAValueOfAnotherRedisTypeIsReplacedByTheNextLoad(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	if err := rdb.HSet(ctx, c.remote.key("k"), "field", "x").Err(); err != nil {
		t.Fatal(err)
	}
	loads := 0
	for range 3 {
		c.local.invalidate("k") // read Redis each time
		v, err := c.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { loads++; return "loaded", nil })
		if err != nil || v != "loaded" {
			t.Fatalf("GetOrLoad = %q, %v; want loaded", v, err)
		}
	}
	if loads != 1 {
		t.Errorf("%d loads; want 1: the hash is replaced", loads)
	}
	if s := c.Stats(); s.CorruptValues != 1 || s.RemoteErrors != 0 {
		t.Errorf("CorruptValues %d, RemoteErrors %d; want 1, 0", s.CorruptValues, s.RemoteErrors)
	}
	if typ := rdb.Type(ctx, c.remote.key("k")).Val(); typ != "string" {
		t.Errorf("Redis holds a %s; want our string", typ)
	}
}

// A Set during the load replaces a foreign value first and wins.
func TestAForeignValueReplacedBySetDuringALoadKeepsTheSet(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	if err := rdb.HSet(ctx, c.remote.key("k"), "field", "x").Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetOrLoad(ctx, "k", func(ctx context.Context, _ string) (string, error) {
		if err := c.Set(ctx, "k", "set"); err != nil {
			t.Error(err)
		}
		return "loaded", nil
	}); err != nil {
		t.Fatal(err)
	}
	if v := redisValue(t, rdb, c, "k"); v != "set" {
		t.Errorf("Redis holds %q; want the Set's value", v)
	}
}

func TestEveryMethodOfAClosedCacheReturnsErrClosed(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	_ = c.Close()
	if err := c.Delete(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("Delete() = %v; want ErrClosed", err)
	}
	if err := c.Delete(ctx, "k"); !errors.Is(err, ErrClosed) {
		t.Errorf("Delete(k) = %v; want ErrClosed", err)
	}
	if err := c.Set(ctx, "k", "v"); !errors.Is(err, ErrClosed) {
		t.Errorf("Set = %v; want ErrClosed", err)
	}
	if _, err := c.Get(ctx, "k"); !errors.Is(err, ErrClosed) {
		t.Errorf("Get = %v; want ErrClosed", err)
	}
	if _, err := c.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "", nil }); !errors.Is(err, ErrClosed) {
		t.Errorf("GetOrLoad = %v; want ErrClosed", err)
	}
}

// A Delete of many long keys is split into messages that stay far below
// Redis' pub/sub output-buffer limit, and every other instance gets them
// all. A key too long to name in a message is refused.
func TestLargeDeletesAreSplitIntoBoundedMessages(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	cs := newInstances[string](t, 2, func() redis.UniversalClient { return coreOtherClient(t, mr) }, Options{})
	a, b := cs[0], cs[1]
	var keys []string
	for i := range 200 {
		keys = append(keys, strings.Repeat("x", 1000)+string(rune('a'+i%26))+strings.Repeat("y", i))
	}
	sub := rdb.Subscribe(ctx, a.remote.channel)
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Delete(ctx, keys...); err != nil {
		t.Fatal(err)
	}
	sent := a.Stats().InvalidationsPublished
	if sent < 2 {
		t.Errorf("%d messages for 200 KB of keys; want it split", sent)
	}
	named := 0
	for range sent {
		m, err := sub.ReceiveMessage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(m.Payload) > maxMessageKeyBytes+64*1024 {
			t.Errorf("a message of %d bytes", len(m.Payload))
		}
		invs, err := decodeMessage(m.Payload)
		if err != nil {
			t.Fatal(err)
		}
		for _, inv := range invs {
			named += len(inv.keys)
		}
	}
	if named != len(keys) {
		t.Errorf("messages named %d keys; want %d", named, len(keys))
	}
	awaitReceived(t, b, sent)
	if err := a.Set(ctx, strings.Repeat("k", maxKeyBytes+1), "v"); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Set of a %d-byte key = %v; want ErrInvalidKey", maxKeyBytes+1, err)
	}
}

// WaitReady returns once L1 is in use, so a Set right after it is served
// from L1; Ready says the same without blocking.
func TestWaitReadyReturnsOnceL1IsInUse(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c, err := New[string](Options{Redis: rdb, Namespace: uniqueNamespace(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if !c.Ready() {
		t.Error("Ready() = false after WaitReady")
	}
	if err := c.Set(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	if _, fromL1, err := getWithSource(c, "k"); err != nil || !fromL1 {
		t.Errorf("Get after WaitReady and Set: from L1 %v, %v; want an L1 hit", fromL1, err)
	}
	_ = c.Close()
	if c.Ready() {
		t.Error("Ready() = true after Close")
	}
	if err := c.WaitReady(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("WaitReady after Close = %v; want ErrClosed", err)
	}
}

// WaitReady gives up when its context ends: with Redis down the cache
// never becomes ready.
func TestWaitReadyEndsWithItsContext(t *testing.T) {
	mr, rdb := coreOutageMiniredis(t)
	mr.Close()
	c, err := New[string](Options{Redis: rdb, Namespace: uniqueNamespace(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := c.WaitReady(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitReady with Redis down = %v; want context.DeadlineExceeded", err)
	}
}

// A message whose "value" is a lease envelope (no script of ours sends one)
// drops the key instead of serving an empty value.
func TestALeaseCarriedAsAMessageValueIsNotServed(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	if err := a.Set(ctx, "k", "real"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)
	mustHoldInL1(t, b, "k", "real")
	lease := encodeEnvelope(kindLease, time.Now().Add(time.Hour).UnixNano(), newLeaseToken())
	if err := a.remote.client.Publish(ctx, a.remote.channel, encodeValueMessage(999, 1<<60, "k", lease)).Err(); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 2)
	mustGet(t, b, "k", "real") // from Redis
}

// A value loaded while Redis fails lives no longer than the breaker stays
// open: no invalidation can reach it, and the success that would drop it
// may never come if every read is an L1 hit.
func TestAValueLoadedInAnOutageLivesNoLongerThanTheBreakerIsOpen(t *testing.T) {
	ctx := context.Background()
	mr, rdb := coreOutageMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	mr.Close()
	waitUntil(t, invWait, "the outage to be noticed", func() bool { return !c.sub.healthy() })
	if v, err := c.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "v", nil }); err != nil || v != "v" {
		t.Fatalf("GetOrLoad in an outage = %q, %v", v, err)
	}
	e, ok := c.local.get("k")
	if !ok {
		t.Fatal("the loaded value is not in L1")
	}
	if until := c.remote.breaker.openUntil.Load(); until == 0 || e.expires > until {
		t.Errorf("the value expires at %d, after the breaker closes at %d", e.expires, until)
	}
}

// A load that replaces a foreign value does not write back if the key was
// deleted meanwhile: the Delete wins.
func TestADeleteDuringALoadThatReplacesAForeignValueWins(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	if err := rdb.HSet(ctx, c.remote.key("k"), "f", "x").Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetOrLoad(ctx, "k", func(ctx context.Context, _ string) (string, error) {
		if err := c.Delete(ctx, "k"); err != nil {
			t.Error(err)
		}
		return "old row", nil
	}); err != nil {
		t.Fatal(err)
	}
	if n := rdb.Exists(ctx, c.remote.key("k")).Val(); n != 0 {
		t.Errorf("Redis holds the key after a Delete during its load")
	}
}

// Something that looks like a lease but never expires (no script of ours
// writes one) does not make GetOrLoad wait: it takes the key over.
func TestALeaseWithoutATTLIsTakenOver(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	lease := encodeEnvelope(kindLease, time.Now().Add(time.Hour).UnixNano(), newLeaseToken())
	if err := rdb.Set(ctx, c.remote.key("k"), lease, 0).Err(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(ctx, invWait) // a failure bound
	defer cancel()
	v, err := c.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "loaded", nil })
	if err != nil || v != "loaded" {
		t.Errorf("GetOrLoad = %q, %v; want the loader's value", v, err)
	}
}

// Close ends a WaitReady in progress with ErrClosed.
func TestCloseEndsWaitReady(t *testing.T) {
	mr, rdb := coreOutageMiniredis(t)
	mr.Close()
	c, err := New[string](Options{Redis: rdb, Namespace: uniqueNamespace(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), invWait) // a failure bound
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.WaitReady(ctx) }()
	_ = c.Close()
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Errorf("WaitReady across Close = %v; want ErrClosed", err)
	}
}
