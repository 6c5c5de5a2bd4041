package tiered

import (
	"context"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Consistency rules that races between instances and flights used to
// break (issue 9): each test states the rule in its name.

// settle waits until every message published before the call has been
// applied by each of cs: each instance writes a marker key, and messages
// from one Redis arrive in the order it ran the writes, so once every
// instance has seen every marker, it has seen everything before it.
func settle[V any](t *testing.T, marker V, cs ...*Cache[V]) {
	t.Helper()
	ctx := context.Background()
	before := make([]uint64, len(cs))
	for i, c := range cs {
		before[i] = c.Stats().InvalidationsReceived
	}
	for i, c := range cs {
		if err := c.Set(ctx, fmt.Sprintf("settle-%d", i), marker); err != nil {
			t.Fatal(err)
		}
	}
	for i, c := range cs {
		awaitReceived(t, c, before[i]+uint64(len(cs)-1))
	}
}

// redisValue returns what Redis holds for key of c, decoded.
func redisValue(t *testing.T, rdb redis.UniversalClient, c *Cache[string], key string) string {
	t.Helper()
	raw, err := rdb.Get(context.Background(), c.remote.key(key)).Bytes()
	if err != nil {
		t.Fatalf("GET %s: %v", key, err)
	}
	p, err := envelopePayload(raw)
	if err != nil {
		t.Fatal(err)
	}
	return string(p)
}

// Two instances write each of many cold keys at the same moment. Once the
// messages published have arrived, both serve what Redis holds, from L1 or
// not: a foreign message that lands between an instance's write and its
// store into L1 must not leave the older value there.
func TestConcurrentSetsOfOneKeyOnTwoInstancesEndAsRedisHolds(t *testing.T) {
	for _, tc := range []struct {
		name string
		dial func(t *testing.T) func() redis.UniversalClient
	}{
		{"miniredis", miniredisDialer},
		{"real Redis", func(t *testing.T) func() redis.UniversalClient {
			addr := realRedis(t).Options().Addr
			return dialerOn(t, addr)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dial := tc.dial(t)
			admin := dial()
			cs := newInstances[string](t, 2, dial, Options{})
			a, b := cs[0], cs[1]
			ctx := context.Background()
			const keys = 1000
			for i := range keys {
				k := fmt.Sprintf("k%d", i)
				var wg sync.WaitGroup
				start := make(chan struct{})
				for _, c := range cs {
					wg.Add(1)
					go func() {
						defer wg.Done()
						<-start
						if err := c.Set(ctx, k, fmt.Sprintf("from %p", c)); err != nil {
							t.Error(err)
						}
					}()
				}
				close(start)
				wg.Wait()
			}
			settle(t, "settled", a, b)
			stale := 0
			for i := range keys {
				k := fmt.Sprintf("k%d", i)
				want := redisValue(t, admin, a, k)
				for _, c := range cs {
					if v, err := c.Get(ctx, k); err != nil || v != want {
						stale++
						if stale <= 5 {
							t.Errorf("%s: instance %p serves %q, %v; Redis holds %q", k, c, v, err, want)
						}
					}
				}
			}
			if stale > 0 {
				t.Errorf("%d of %d reads disagree with Redis after the messages arrived", stale, 2*keys)
			}
		})
	}
}

// startHeldGetOrLoad starts a GetOrLoad of key on c whose loader has begun
// and returns value once release is closed. The returned channel yields
// the call's result.
func startHeldGetOrLoad(c *Cache[string], key, value string, release <-chan struct{}) <-chan string {
	loading, result := make(chan struct{}), make(chan string, 1)
	go func() {
		v, err := c.GetOrLoad(context.Background(), key, func(context.Context, string) (string, error) {
			close(loading)
			<-release
			return value, nil
		})
		if err != nil {
			v = "error: " + err.Error()
		}
		result <- v
	}()
	<-loading
	return result
}

// A GetOrLoad that begins after an invalidation of its key was applied does
// not join a load that began before it: that load may return the value the
// invalidation replaced.
func TestGetOrLoadAfterAnInvalidationDoesNotJoinAnOlderLoad(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	release := make(chan struct{})
	first := startHeldGetOrLoad(b, "k", "v1 (loaded before the Set)", release)
	if err := a.Set(ctx, "k", "v2"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)
	v, err := b.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) {
		t.Error("loader called, but Redis has v2")
		return "", nil
	})
	if err != nil || v != "v2" {
		t.Errorf("GetOrLoad after the invalidation = %q, %v; want v2", v, err)
	}
	close(release)
	<-first
	mustGet(t, b, "k", "v2")
}

// On the instance that deletes a key, a GetOrLoad that begins after the
// Delete does not get the deleted value from a load that began before it.
func TestGetOrLoadAfterOwnDeleteDoesNotJoinAnOlderLoad(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	release := make(chan struct{})
	first := startHeldGetOrLoad(c, "k", "deleted row", release)
	if err := c.Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	v, err := c.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "current row", nil })
	if err != nil || v != "current row" {
		t.Errorf("GetOrLoad after Delete = %q, %v; want the current row", v, err)
	}
	close(release)
	<-first
}

// Callers who miss at the same time, with no invalidation between, still
// share one load.
func TestConcurrentMissesWithoutAnInvalidationShareOneLoad(t *testing.T) {
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	release := make(chan struct{})
	first := startHeldGetOrLoad(c, "k", "v", release)
	second := make(chan string, 1)
	go func() {
		v, _ := c.GetOrLoad(context.Background(), "k", func(context.Context, string) (string, error) {
			return "a second load", nil
		})
		second <- v
	}()
	waitUntil(t, invWait, "the second caller to join", func() bool {
		c.loads.mu.Lock()
		defer c.loads.mu.Unlock()
		call := c.loads.calls["k"]
		return call != nil && call.done != nil
	})
	close(release)
	if v1, v2 := <-first, <-second; v1 != "v" || v2 != "v" {
		t.Errorf("results %q and %q; want both from the one load", v1, v2)
	}
}

// stamped is a value whose Go form differs from its codec round trip: an
// unexported field JSON drops, and a time.Time with a monotonic reading
// and a zone.
type stamped struct {
	Name    string
	At      time.Time
	private string
}

// Every tier of every instance returns the same value for one write: the
// codec's round trip, also on the instance that wrote it.
func TestTheWriterServesWhatOtherInstancesGet(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[stamped](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	v := stamped{Name: "n", At: time.Now().In(time.FixedZone("X", 3600)), private: "lost in JSON"}
	if err := a.Set(ctx, "k", v); err != nil {
		t.Fatal(err)
	}
	fromA, err := a.Get(ctx, "k")
	if err != nil {
		t.Fatal(err)
	}
	fromB, err := b.Get(ctx, "k")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(fromA, fromB) {
		t.Errorf("writer serves %#v, the other instance %#v", fromA, fromB)
	}
	loaded, err := a.GetOrLoad(ctx, "loaded", func(context.Context, string) (stamped, error) { return v, nil })
	if err != nil {
		t.Fatal(err)
	}
	fromB, err = b.Get(ctx, "loaded")
	if err != nil || !reflect.DeepEqual(loaded, fromB) {
		t.Errorf("GetOrLoad returned %#v, the other instance reads %#v, %v", loaded, fromB, err)
	}
}

// A []byte passed to Set is copied: a caller reusing its buffer does not
// change what L1 serves.
func TestSetCopiesAByteSlice(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[[]byte](t, rdb, Options{})
	buf := []byte("original")
	if err := c.Set(ctx, "k", buf); err != nil {
		t.Fatal(err)
	}
	copy(buf, "XXXXXXXX")
	v, fromL1, err := getWithSource(c, "k")
	if err != nil || string(v) != "original" || !fromL1 {
		t.Errorf("Get = %q (from L1 %v), %v; want original from L1", v, fromL1, err)
	}
}
