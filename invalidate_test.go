package tiered

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Cross-instance invalidation (issue 3), on miniredis. An "instance" is a
// Cache on its own Redis client, as in another process: it has its own
// subscription and its own L1. The tests that need a real redis-server
// (CLIENT KILL, restart, stall, soak, latency) are in
// invalidate_redis_test.go.

// invWait bounds every wait for an event in these tests. It is a failure
// bound for a loaded 2-core machine under -race, not an expected time.
const invWait = 10 * time.Second

// newInstances returns n Caches sharing one namespace, each on a client of
// its own made by dial, each with its subscription healthy.
func newInstances[V any](t *testing.T, n int, dial func() redis.UniversalClient, opts Options) []*Cache[V] {
	t.Helper()
	if opts.Namespace == "" {
		opts.Namespace = uniqueNamespace(t)
	}
	cs := make([]*Cache[V], n)
	for i := range cs {
		cs[i] = newTestCache[V](t, dial(), opts)
	}
	return cs
}

// miniredisDialer returns a function making new clients on one miniredis.
func miniredisDialer(t *testing.T) func() redis.UniversalClient {
	mr, _ := newMiniredis(t)
	return func() redis.UniversalClient {
		rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
		t.Cleanup(func() { _ = rdb.Close() })
		return rdb
	}
}

// getWithSource returns c.Get(key) and whether L1 served it. The caller
// must be the only one using c at the time.
func getWithSource[V any](c *Cache[V], key string) (v V, fromL1 bool, err error) {
	before := c.Stats().LocalHits
	v, err = c.Get(context.Background(), key)
	return v, c.Stats().LocalHits > before, err
}

// mustHoldInL1 reads key on c until L1 serves it, failing if any read
// returns anything but want. A fill from Redis reaches L1 asynchronously
// (ristretto buffers new keys), hence the loop.
func mustHoldInL1[V comparable](t *testing.T, c *Cache[V], key string, want V) {
	t.Helper()
	waitUntil(t, invWait, fmt.Sprintf("L1 to serve %q", key), func() bool {
		v, fromL1, err := getWithSource(c, key)
		if err != nil || v != want {
			t.Fatalf("Get(%q) = %v, %v; want %v", key, v, err, want)
		}
		return fromL1
	})
}

// mustGet fails unless c.Get(key) returns want right now (no retry).
func mustGet[V comparable](t *testing.T, c *Cache[V], key string, want V) {
	t.Helper()
	v, fromL1, err := getWithSource(c, key)
	if err != nil || v != want {
		t.Fatalf("Get(%q) = %v (from L1: %v), %v; want %v", key, v, fromL1, err, want)
	}
}

// mustBeNotFound fails unless c.Get(key) returns ErrNotFound right now.
func mustBeNotFound[V any](t *testing.T, c *Cache[V], key string) {
	t.Helper()
	if v, fromL1, err := getWithSource(c, key); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get(%q) = %v (from L1: %v), %v; want ErrNotFound", key, v, fromL1, err)
	}
}

// awaitReceived waits until c has applied at least n invalidation
// messages from other instances (the counter moves after the keys are
// dropped from L1).
func awaitReceived[V any](t *testing.T, c *Cache[V], n uint64) {
	t.Helper()
	waitUntil(t, invWait, fmt.Sprintf("%d invalidations to be applied", n), func() bool {
		return c.Stats().InvalidationsReceived >= n
	})
}

// ---- Fan-out ----

func TestWriteOnOneInstanceInvalidatesTheOthers(t *testing.T) {
	checkFanOut(t, miniredisDialer(t))
}

// checkFanOut: every write (Set or Delete) on any of three instances makes
// the two others stop serving the value they hold in L1, as soon as its
// invalidation message has been applied.
func checkFanOut(t *testing.T, dial func() redis.UniversalClient) {
	ctx := context.Background()
	cs := newInstances[string](t, 3, dial, Options{})
	received := make([]uint64, len(cs))
	for w, writer := range cs {
		key := fmt.Sprintf("k%d", w)
		if err := writer.Set(ctx, key, "v1"); err != nil {
			t.Fatal(err)
		}
		for r, reader := range cs {
			if r != w {
				received[r]++
				awaitReceived(t, reader, received[r])
				mustHoldInL1(t, reader, key, "v1")
			}
		}

		if err := writer.Set(ctx, key, "v2"); err != nil {
			t.Fatal(err)
		}
		for r, reader := range cs {
			if r != w {
				received[r]++
				awaitReceived(t, reader, received[r])
				mustGet(t, reader, key, "v2") // not v1 from L1
				mustHoldInL1(t, reader, key, "v2")
			}
		}

		if err := writer.Delete(ctx, key); err != nil {
			t.Fatal(err)
		}
		for r, reader := range cs {
			if r != w {
				received[r]++
				awaitReceived(t, reader, received[r])
				mustBeNotFound(t, reader, key) // not v2 from L1
			}
		}
	}
	for i, c := range cs {
		s := c.Stats()
		if s.InvalidationsPublished != 3 || s.InvalidationsReceived != 6 || s.KeysInvalidated != 6 {
			t.Errorf("instance %d: published %d, received %d, keys invalidated %d; want 3, 6, 6",
				i, s.InvalidationsPublished, s.InvalidationsReceived, s.KeysInvalidated)
		}
	}
}

func TestDeleteOfManyKeysSendsOneInvalidation(t *testing.T) {
	ctx := context.Background()
	dial := miniredisDialer(t)
	cs := newInstances[string](t, 2, dial, Options{})
	a, b := cs[0], cs[1]
	keys := []string{"k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"}
	for _, k := range keys {
		if err := a.Set(ctx, k, "v"); err != nil {
			t.Fatal(err)
		}
	}
	awaitReceived(t, b, uint64(len(keys)))
	for _, k := range keys {
		mustHoldInL1(t, b, k, "v")
	}

	// Watch the channel as an outsider would.
	spy := dial().Subscribe(ctx, "tiered:inv:"+a.opts.Namespace)
	t.Cleanup(func() { _ = spy.Close() })
	if _, err := spy.Receive(ctx); err != nil { // the subscription's confirmation
		t.Fatal(err)
	}

	pa, rb, kb := a.Stats().InvalidationsPublished, b.Stats().InvalidationsReceived, b.Stats().KeysInvalidated
	if err := a.Delete(ctx, keys...); err != nil {
		t.Fatal(err)
	}
	if err := a.Set(ctx, "after", "v"); err != nil { // a marker: the next message
		t.Fatal(err)
	}
	awaitReceived(t, b, rb+2)
	if got := a.Stats().InvalidationsPublished - pa; got != 2 {
		t.Errorf("a published %d messages for Delete of %d keys and one Set; want 2", got, len(keys))
	}
	if got := b.Stats().KeysInvalidated - kb; got != uint64(len(keys))+1 {
		t.Errorf("b invalidated %d keys; want %d", got, len(keys)+1)
	}
	for _, k := range keys {
		mustBeNotFound(t, b, k)
	}

	// On the wire: one message naming every key, then the marker's.
	for i, want := range [][]string{keys, {"after"}} {
		msg, err := spy.ReceiveMessage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		m, err := decodeInvalidation(msg.Payload)
		if err != nil || m.origin != a.id || !slices.Equal(m.keys, want) {
			t.Errorf("message %d: origin %x, keys %q, %v; want origin %x (a), keys %q", i, m.origin, m.keys, err, a.id, want)
		}
	}
}

func TestInstanceIgnoresItsOwnInvalidations(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	if err := a.Set(ctx, "mine", "v"); err != nil {
		t.Fatal(err)
	}
	// b's message is published after a's own one on the same channel, so
	// once a has applied it, a has seen (and skipped) its own.
	if err := b.Set(ctx, "theirs", "w"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, a, 1)

	if s := a.Stats(); s.InvalidationsReceived != 1 || s.KeysInvalidated != 1 {
		t.Errorf("a received %d messages for %d keys; want only b's: 1 for 1", s.InvalidationsReceived, s.KeysInvalidated)
	}
	v, fromL1, err := getWithSource(a, "mine")
	if err != nil || v != "v" || !fromL1 {
		t.Errorf("a's Get of its own write = %q (from L1: %v), %v; want \"v\" from L1", v, fromL1, err)
	}
}

// ---- The fill race ----

// blockNextGet makes rdb hold the reply of its next GET (once armed) until
// release is closed; got is closed once the reply is in.
type blockNextGet struct {
	armed        atomic.Bool
	got, release chan struct{}
}

func holdNextGet(rdb *redis.Client) *blockNextGet {
	b := &blockNextGet{got: make(chan struct{}), release: make(chan struct{})}
	rdb.AddHook(processHook{process: func(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
		err := next(ctx, cmd)
		if cmd.Name() == "get" && b.armed.CompareAndSwap(true, false) {
			close(b.got)
			<-b.release
		}
		return err
	}})
	return b
}

// proxiedClients returns two clients on one miniredis: rdbA directly,
// rdbB through proxy, which can stall or kill rdbB's connections.
func proxiedClients(t *testing.T) (proxy *tcpProxy, rdbA, rdbB *redis.Client) {
	t.Helper()
	mr, _ := newMiniredis(t)
	proxy = startProxy(t, mr.Addr())
	rdbA = redis.NewClient(&redis.Options{Addr: mr.Addr()})
	rdbB = redis.NewClient(&redis.Options{Addr: proxy.Addr})
	t.Cleanup(func() { _ = rdbA.Close(); _ = rdbB.Close() })
	return proxy, rdbA, rdbB
}

// flushL1Buffer makes ristretto apply the Sets it has buffered, so that a
// stale fill, if it was stored, is visible to the next Get (a fill still in
// L1's own fill buffer already is). Without it a test could pass only
// because the fill had not landed yet.
func flushL1Buffer[V any](c *Cache[V]) { c.local.store.Wait() }

func TestRedisReadRacingAnotherInstancesSetIsNotServedFromL1(t *testing.T) {
	ctx := context.Background()
	mr, _ := newMiniredis(t)
	rdbA := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	rdbB := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { _ = rdbA.Close(); _ = rdbB.Close() })
	hold := holdNextGet(rdbB)
	a := newTestCache[string](t, rdbA, Options{})
	b := newTestCache[string](t, rdbB, Options{Namespace: a.opts.Namespace})
	if err := a.Set(ctx, "k", "old"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)

	// b's read of Redis returns "old" but is held before it fills L1.
	hold.armed.Store(true)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = b.Get(ctx, "k") // it may return "old": it began before the Set
	}()
	<-hold.got
	// a overwrites the key and b applies the invalidation, all while b's
	// read is still in flight.
	if err := a.Set(ctx, "k", "new"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 2)
	close(hold.release) // the read now fills L1 with "old"
	<-done
	flushL1Buffer(b)

	mustGet(t, b, "k", "new")
}

// loadRacingAWrite starts instance b loading key "k" (returning loaded),
// lets instance a write k with write while the load is held, waits until
// b has the invalidation, then lets the load finish. It returns b.
func loadRacingAWrite(t *testing.T, loaded string, write func(a *Cache[string]) error) *Cache[string] {
	t.Helper()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	finish := startHeldLoad(b, "k", loaded)
	if err := write(a); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)
	finish()
	return b
}

// A load that raced a Set on another instance loses to it in both tiers:
// its write-back (SET NX) finds the Set's value in Redis and stores nothing,
// so L1 keeps nothing of the load either. (With a plain SET, Redis would now
// hold the older, loaded value until its TTL.)
func TestLoadRacingAnotherInstancesSetLosesToItInBothTiers(t *testing.T) {
	ctx := context.Background()
	b := loadRacingAWrite(t, "loaded before the Set", func(a *Cache[string]) error { return a.Set(ctx, "k", "set") })

	raw, err := b.remote.client.Get(ctx, b.remote.key("k")).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	if payload, err := envelopePayload(raw); err != nil || string(payload) != "set" {
		t.Errorf("Redis holds %q (%v) after the racing load; want the Set's value", payload, err)
	}
	mustGet(t, b, "k", "set")
	mustHoldInL1(t, b, "k", "set")
}

// A load that raced a Delete on another instance is fenced out by its
// lease: the Delete removed the lease, so the write-back stores nothing, in
// either tier, and the next Get finds the key deleted.
func TestLoadRacingAnotherInstancesDeleteIsFencedOut(t *testing.T) {
	ctx := context.Background()
	b := loadRacingAWrite(t, "loaded before the Delete", func(a *Cache[string]) error { return a.Delete(ctx, "k") })
	mustBeNotFound(t, b, "k")
	if s := b.Stats(); s.FenceRejections != 1 {
		t.Errorf("FenceRejections = %d; want 1", s.FenceRejections)
	}
}

// A fill that began before a subscription gap (or inside it, before the
// resubscription was confirmed) may hold a value whose invalidation the gap
// lost; it must never be served after the subscription heals.
// With the invalidation log, b's heal replays the lost overwrite (which
// bumps the key's generation, so the held fill of "old", which began under
// the epoch the replay restores, is not served); without, it flushes.
func TestFillAcrossASubscriptionGapIsNotServedAfterHeal(t *testing.T) {
	for _, tc := range []struct {
		name string
		// readBegins is when b's read of the old value begins, relative to
		// the drop of its subscription.
		readBegins string
		log        time.Duration
	}{
		{"read begins before the drop, replayed", "before", 0},
		{"read begins after the drop, before the resubscription, replayed", "during", 0},
		{"read begins before the drop, flushed", "before", -1},
		{"read begins after the drop, before the resubscription, flushed", "during", -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			proxy, rdbA, rdbB := proxiedClients(t)
			hold := holdNextGet(rdbB)
			a := newTestCache[string](t, rdbA, Options{InvalidationLog: tc.log})
			b := newTestCache[string](t, rdbB, Options{Namespace: a.opts.Namespace, InvalidationLog: tc.log})
			if err := a.Set(ctx, "k", "old"); err != nil {
				t.Fatal(err)
			}
			awaitReceived(t, b, 1)
			if tc.log == 0 {
				awaitLogPosition(t, b)
			}

			done := make(chan struct{})
			read := func() {
				hold.armed.Store(true)
				go func() {
					defer close(done)
					_, _ = b.Get(ctx, "k")
				}()
				<-hold.got // b has read "old" from Redis; its fill is held
			}
			if tc.readBegins == "before" {
				read()
			}
			// Drop b's subscription so that it cannot come back yet: its
			// connection is killed and the new one is held by the proxy.
			proxy.StallSubscribers()
			if n := proxy.KillSubscribers(); n != 1 {
				t.Fatalf("killed %d subscriber connections; want 1", n)
			}
			waitUntil(t, invWait, "b to notice the drop", func() bool { return b.Stats().SubscriptionGaps >= 1 })
			if b.sub.healthy() {
				t.Fatal("b's subscription is healthy before it could resubscribe")
			}
			if tc.readBegins == "during" {
				read()
			}
			// The overwrite's invalidation is lost to b: b is not subscribed.
			if err := a.Set(ctx, "k", "new"); err != nil {
				t.Fatal(err)
			}
			proxy.Resume()
			waitUntil(t, invWait, "b's subscription to heal", b.sub.healthy)
			close(hold.release) // the fill of "old" lands now
			<-done
			flushL1Buffer(b)

			mustGet(t, b, "k", "new")
			// The overwrite's message must have been lost, or this test
			// proves nothing: received only by the replay, if any.
			want, st := Stats{InvalidationsReceived: 1, GapsFlushed: 1}, b.Stats()
			if tc.log == 0 {
				want = Stats{InvalidationsReceived: 2, GapsReplayed: 1, EntriesReplayed: 1}
			}
			if st.InvalidationsReceived != want.InvalidationsReceived || st.GapsReplayed != want.GapsReplayed ||
				st.EntriesReplayed != want.EntriesReplayed || st.GapsFlushed != want.GapsFlushed {
				t.Errorf("b received %d invalidations, %d gaps replayed (%d entries), %d flushed; want %d, %d (%d), %d",
					st.InvalidationsReceived, st.GapsReplayed, st.EntriesReplayed, st.GapsFlushed,
					want.InvalidationsReceived, want.GapsReplayed, want.EntriesReplayed, want.GapsFlushed)
			}
			mustHoldInL1(t, b, "k", "new") // and L1 is in use again
		})
	}
}

// startHeldLoad starts a GetOrLoad of key on c whose loader has begun and is
// held until finish is called; finish returns once the GetOrLoad returned
// and L1 has applied whatever it stored.
func startHeldLoad(c *Cache[string], key, value string) (finish func()) {
	loading, release := make(chan struct{}), make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = c.GetOrLoad(context.Background(), key, func(context.Context, string) (string, error) {
			close(loading)
			<-release
			return value, nil
		})
	}()
	<-loading
	return func() {
		close(release)
		<-done
		flushL1Buffer(c)
	}
}

// An invalidation bumps the generation slot its key hashes to, which makes
// every other L1 entry in that slot miss once. The table grows with L1, so
// that in a large L1 a write costs the other keys few misses.
func TestInvalidationsMakeFewOtherKeysMissInALargeL1(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{LocalMaxBytes: defaultLocalMaxBytes})
	const kept, deleted = 2000, 50
	for i := range kept {
		if _, err := c.GetOrLoad(ctx, "k"+strconv.Itoa(i), coreLoadString("v")); err != nil {
			t.Fatal(err)
		}
	}
	for i := range deleted {
		if err := c.Delete(ctx, "gone"+strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
	}
	before := c.Stats().LocalMisses
	for i := range kept {
		if _, err := c.GetOrLoad(ctx, "k"+strconv.Itoa(i), coreMustNotLoad[string](t)); err != nil {
			t.Fatal(err)
		}
	}
	// 50 deletes over the 16384 slots of a 64 MiB L1 touch the slots of ~6
	// of 2000 keys (Poisson: more than 25 once in 10^8 runs); with the
	// smallest table, 1024 slots, it would be ~93.
	if misses := c.Stats().LocalMisses - before; misses > 25 {
		t.Errorf("%d of %d keys missed L1 after %d deletes of other keys; want a few", misses, kept, deleted)
	}
}

// ---- Values in invalidations ----

func TestAnotherInstancesSetReplacesTheValueInL1(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[coreUser](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	if err := a.Set(ctx, "k", coreUser{ID: 1, Name: "old"}); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)
	mustHoldInL1(t, b, "k", coreUser{ID: 1, Name: "old"})

	before := b.Stats()
	if err := a.Set(ctx, "k", coreUser{ID: 1, Name: "new"}); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, before.InvalidationsReceived+1)
	v, fromL1, err := getWithSource(b, "k")
	if err != nil || v != (coreUser{ID: 1, Name: "new"}) || !fromL1 {
		t.Fatalf("b's Get after a's Set = %v (from L1: %v), %v; want the new value from L1", v, fromL1, err)
	}
	if s := b.Stats(); s.KeysReplaced != before.KeysReplaced+1 || s.RemoteHits != before.RemoteHits {
		t.Errorf("KeysReplaced +%d, RemoteHits +%d; want +1, +0", s.KeysReplaced-before.KeysReplaced, s.RemoteHits-before.RemoteHits)
	}
}

func TestAnotherInstancesSetOfAKeyNotInL1OnlyInvalidates(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	if err := a.Set(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)
	before := b.Stats()
	v, fromL1, err := getWithSource(b, "k")
	if err != nil || v != "v" || fromL1 {
		t.Fatalf("b's Get = %q (from L1: %v), %v; want v from Redis", v, fromL1, err)
	}
	if s := b.Stats(); s.KeysReplaced != 0 || s.RemoteHits != before.RemoteHits+1 {
		t.Errorf("KeysReplaced %d, RemoteHits +%d; want 0, +1", s.KeysReplaced, s.RemoteHits-before.RemoteHits)
	}
}

func TestValuesAbovePublishValueMaxBytesAreOnlyInvalidated(t *testing.T) {
	for _, tc := range []struct {
		name  string
		max   int
		value string
	}{
		{"larger than the limit", 8, "nine byte"},
		{"sending values disabled, even empty ones", -1, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			dial := miniredisDialer(t)
			a := newTestCache[string](t, dial(), Options{PublishValueMaxBytes: tc.max})
			b := newTestCache[string](t, dial(), Options{Namespace: a.opts.Namespace})
			if err := a.Set(ctx, "k", "v1"); err != nil {
				t.Fatal(err)
			}
			awaitReceived(t, b, 1)
			mustHoldInL1(t, b, "k", "v1")
			if err := a.Set(ctx, "k", tc.value); err != nil {
				t.Fatal(err)
			}
			awaitReceived(t, b, 2)
			v, fromL1, err := getWithSource(b, "k")
			if err != nil || v != tc.value || fromL1 {
				t.Fatalf("b's Get = %q (from L1: %v), %v; want %q from Redis", v, fromL1, err, tc.value)
			}
			if s := b.Stats(); s.KeysReplaced != 0 {
				t.Errorf("KeysReplaced = %d, want 0", s.KeysReplaced)
			}
		})
	}
}

// A message whose value does not decode still invalidates: the key is
// read from Redis next.
func TestUndecodableValueInAnInvalidationDropsTheKey(t *testing.T) {
	ctx := context.Background()
	dial := miniredisDialer(t)
	cs := newInstances[coreUser](t, 2, dial, Options{})
	a, b := cs[0], cs[1]
	if err := a.Set(ctx, "k", coreUser{ID: 1, Name: "v"}); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)
	mustHoldInL1(t, b, "k", coreUser{ID: 1, Name: "v"})
	before := b.Stats()
	msg := encodeValueMessage(12345, 1<<60, "k", encodeEnvelope(kindValue, time.Now().Add(time.Hour).UnixNano(), []byte("{not json")))
	if err := dial().Publish(ctx, b.remote.channel, msg).Err(); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, before.InvalidationsReceived+1)
	v, fromL1, err := getWithSource(b, "k")
	if err != nil || v != (coreUser{ID: 1, Name: "v"}) || fromL1 {
		t.Fatalf("b's Get = %v (from L1: %v), %v; want the value in Redis, read from Redis", v, fromL1, err)
	}
	if s := b.Stats(); s.CorruptValues != before.CorruptValues+1 || s.KeysReplaced != before.KeysReplaced {
		t.Errorf("CorruptValues +%d, KeysReplaced +%d; want +1, +0", s.CorruptValues-before.CorruptValues, s.KeysReplaced-before.KeysReplaced)
	}
}

func TestInvalidationMessagesRoundTripAndRejectGarbage(t *testing.T) {
	m, err := decodeInvalidation(string(encodeInvalidation(7, 42, "a", "", "ccc")))
	if err != nil || m.origin != 7 || m.version != 42 || !slices.Equal(m.keys, []string{"a", "", "ccc"}) || m.envelope != "" {
		t.Errorf("keys message decoded as %+v, %v", m, err)
	}
	m, err = decodeInvalidation(string(encodeValueMessage(9, 43, "key", []byte("envelope"))))
	if err != nil || m.origin != 9 || m.version != 43 || !slices.Equal(m.keys, []string{"key"}) || m.envelope != "envelope" {
		t.Errorf("value message decoded as %+v, %v", m, err)
	}
	for _, bad := range []string{
		"",
		"k1234567",               // too short for an origin
		"k1234567812345678",      // no key
		"x1234567812345678\x01a", // unknown kind
		string(encodeInvalidation(1, 1)) + "\x05ab",  // key longer than the rest
		string(encodeValueMessage(1, 1, "key", nil)), // no envelope
	} {
		if _, err := decodeInvalidation(bad); err == nil {
			t.Errorf("decodeInvalidation(%q) accepted garbage", bad)
		}
	}
}

// A message can reach an instance after that instance's own later write of
// the key (its subscription lags its command connection). The value it
// carries is then older than Redis's and must not replace the own write.
func TestALateMessageDoesNotReplaceALaterOwnWrite(t *testing.T) {
	b, resume := lateForeignWrite(t)
	before := b.Stats()
	resume()
	awaitReceived(t, b, before.InvalidationsReceived+1) // a's message, carrying vA
	mustGet(t, b, "k", "vB")
	if s := b.Stats(); s.KeysReplaced != before.KeysReplaced {
		t.Errorf("KeysReplaced +%d; want +0", s.KeysReplaced-before.KeysReplaced)
	}
}

// lateForeignWrite sets up two instances, a and b, where a's Set(k, vA)
// runs in Redis before b's Set(k, vB) but reaches b after it: b's
// subscription is stalled across both writes. It returns b and the
// function that lets b's subscription go on.
func lateForeignWrite(t *testing.T) (b *Cache[string], resume func()) {
	t.Helper()
	ctx := context.Background()
	proxy, rdbA, rdbB := proxiedClients(t)
	a := newTestCache[string](t, rdbA, Options{})
	b = newTestCache[string](t, rdbB, Options{Namespace: a.opts.Namespace})
	if err := b.Set(ctx, "k", "v0"); err != nil {
		t.Fatal(err)
	}
	mustHoldInL1(t, b, "k", "v0")
	proxy.StallSubscribers() // b's subscription lags, briefly: no gap
	if err := a.Set(ctx, "k", "vA"); err != nil {
		t.Fatal(err)
	}
	if err := b.Set(ctx, "k", "vB"); err != nil { // after a's in Redis
		t.Fatal(err)
	}
	return b, proxy.Resume
}

// Another instance's later value replaces an instance's own write in L1 at
// once: it carries a newer version.
func TestValuesReplaceAgainOnceTheOwnWriteHasComeBack(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	if err := b.Set(ctx, "k", "mine"); err != nil {
		t.Fatal(err)
	}
	mustHoldInL1(t, b, "k", "mine")
	before := b.Stats()
	if err := a.Set(ctx, "k", "theirs"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, before.InvalidationsReceived+1)
	v, fromL1, err := getWithSource(b, "k")
	if err != nil || v != "theirs" || !fromL1 {
		t.Fatalf("b's Get = %q (from L1: %v), %v; want theirs from L1", v, fromL1, err)
	}
	if s := b.Stats(); s.KeysReplaced != before.KeysReplaced+1 {
		t.Errorf("KeysReplaced +%d; want +1", s.KeysReplaced-before.KeysReplaced)
	}
}

// A write that failed here (its context ran out) can still run in Redis
// afterwards. A read in between fills L1 with the old value; the write's
// message, when it comes, must be applied although it is this instance's
// own.
func TestAWriteThatFailedHereButRanInRedisLaterIsApplied(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	var held struct {
		mu    sync.Mutex
		armed bool
		cmd   redis.Cmder
		next  redis.ProcessHook
	}
	rdb.AddHook(processHook{process: func(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
		held.mu.Lock()
		if held.armed && (cmd.Name() == "evalsha" || cmd.Name() == "eval") {
			held.armed, held.cmd, held.next = false, cmd, next
			held.mu.Unlock()
			<-ctx.Done() // on the wire when the caller gives up
			return ctx.Err()
		}
		held.mu.Unlock()
		return next(ctx, cmd)
	}})
	c := newTestCache[string](t, rdb, Options{})
	if err := c.Set(ctx, "k", "v0"); err != nil {
		t.Fatal(err)
	}
	held.mu.Lock()
	held.armed = true
	held.mu.Unlock()
	tctx, cancel := context.WithCancel(ctx)
	go func() {
		waitUntil(t, invWait, "the write to be on the wire", func() bool {
			held.mu.Lock()
			defer held.mu.Unlock()
			return held.cmd != nil
		})
		cancel()
	}()
	if err := c.Set(tctx, "k", "v1"); !errors.Is(err, context.Canceled) {
		t.Fatalf("Set = %v, want context.Canceled", err)
	}
	mustGet(t, c, "k", "v0")                         // fills L1 with v0
	if err := held.next(ctx, held.cmd); err != nil { // Redis runs the write now
		t.Fatal(err)
	}
	waitUntil(t, invWait, "L1 to serve v1, as Redis does", func() bool {
		v, err := c.Get(ctx, "k")
		return err == nil && v == "v1"
	})
}
