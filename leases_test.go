package tiered

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Leases (issue 10): a Delete during a slow load wins, and a fleet loads a
// cold key once.

// With NegativeTTL, a load that found no row and raced a Delete (the row
// was inserted, then the key deleted) must not leave "not found" behind.
func TestANotFoundLoadRacingADeleteIsNotRemembered(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{NegativeTTL: time.Hour})
	a, b := cs[0], cs[1]
	release := make(chan struct{})
	done := make(chan error, 1)
	loading := make(chan struct{})
	go func() {
		_, err := b.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) {
			close(loading)
			<-release
			return "", ErrNotFound // read before the row was inserted
		})
		done <- err
	}()
	<-loading
	if err := a.Delete(ctx, "k"); err != nil { // after inserting the row
		t.Fatal(err)
	}
	awaitReceived(t, b, 1)
	close(release)
	if err := <-done; !errors.Is(err, ErrNotFound) {
		t.Fatalf("the racing load returned %v; want its own ErrNotFound", err)
	}
	v, err := b.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "row", nil })
	if err != nil || v != "row" {
		t.Errorf("GetOrLoad after the Delete = %q, %v; want the row (not a remembered not-found)", v, err)
	}
}

// A Delete on the instance that is loading the key also wins.
func TestADeleteRacingALoadOnTheSameInstanceWins(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	finish := startHeldLoad(c, "k", "old row")
	if err := c.Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	finish()
	mustBeNotFound(t, c, "k")
	if n, _ := rdb.Exists(ctx, c.remote.key("k")).Result(); n != 0 {
		t.Errorf("Redis holds the key after the fenced load")
	}
}

// Without leases a load's write-back is a SET NX: a Delete during the load
// does not stop it. This is what LoadLease < 0 gives up.
func TestWithoutLeasesADeleteDuringALoadLoses(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{LoadLease: -1})
	finish := startHeldLoad(c, "k", "old row")
	if err := c.Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	finish()
	if v := redisValue(t, rdb, c, "k"); v != "old row" {
		t.Errorf("Redis holds %q; want the loaded old row (no fence)", v)
	}
	if s := c.Stats(); s.LeasesGranted != 0 {
		t.Errorf("LeasesGranted = %d; want 0 with leases off", s.LeasesGranted)
	}
}

// Five instances, forty callers each, one cold key and a slow loader: one
// load in the whole fleet, and every caller gets its value.
func TestAFleetLoadsAColdKeyOnce(t *testing.T) {
	const instances, callers = 5, 40
	cs := newInstances[string](t, instances, miniredisDialer(t), Options{})
	var loads atomic.Int32
	load := func(context.Context, string) (string, error) {
		loads.Add(1)
		time.Sleep(100 * time.Millisecond) // the database
		return "row", nil
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first, last time.Duration
	start := time.Now()
	for _, c := range cs {
		for range callers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				v, err := c.GetOrLoad(context.Background(), "cold", load)
				took := time.Since(start)
				if err != nil || v != "row" {
					t.Errorf("GetOrLoad = %q, %v; want row", v, err)
				}
				mu.Lock()
				defer mu.Unlock()
				if first == 0 || took < first {
					first = took
				}
				last = max(last, took)
			}()
		}
	}
	wg.Wait()
	if n := loads.Load(); n != 1 {
		t.Errorf("%d loader calls across %d instances; want 1", n, instances)
	}
	var granted, waits uint64
	for _, c := range cs {
		s := c.Stats()
		granted += s.LeasesGranted
		waits += s.LeaseWaits
	}
	if granted != 1 || waits < 1 {
		t.Errorf("leases granted %d, waits %d; want 1 and at least 1", granted, waits)
	}
	t.Logf("first caller returned after %v, last after %v", first, last)
}

// waitingFor returns once b waits for another instance's lease of a key.
func waitingFor[V any](t *testing.T, b *Cache[V]) {
	t.Helper()
	waitUntil(t, invWait, "b to wait for the lease", func() bool { return b.Stats().LeaseWaits > 0 })
}

// A holder whose load fails gives the lease up: an instance waiting for it
// takes it over and loads, and does not get the holder's error.
func TestAWaiterTakesOverTheLeaseOfAFailedLoad(t *testing.T) {
	for name, fail := range map[string]func() (string, error){
		"error": func() (string, error) { return "", errors.New("db down") },
		"panic": func() (string, error) { panic("loader bug") },
	} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
			a, b := cs[0], cs[1]
			release, loading := make(chan struct{}), make(chan struct{})
			holder := make(chan error, 1)
			go func() {
				_, err := a.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) {
					close(loading)
					<-release
					return fail()
				})
				holder <- err
			}()
			<-loading
			waiter := make(chan string, 1)
			go func() {
				v, err := b.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "b's load", nil })
				if err != nil {
					v = "error: " + err.Error()
				}
				waiter <- v
			}()
			waitingFor(t, b)
			close(release)
			if err := <-holder; err == nil {
				t.Error("the holder's callers got no error")
			}
			if v := <-waiter; v != "b's load" {
				t.Errorf("the waiter got %q; want its own load after taking the lease over", v)
			}
			if s := b.Stats(); s.LeaseTakeovers != 1 {
				t.Errorf("LeaseTakeovers = %d; want 1", s.LeaseTakeovers)
			}
		})
	}
}

// A holder whose loader hangs past LoadTimeout gives the lease up then, so
// that a waiter loads without waiting for the loader or the lease's end.
func TestAWaiterTakesOverTheLeaseOfAHungLoad(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{LoadTimeout: 200 * time.Millisecond, LoadLease: time.Hour})
	a, b := cs[0], cs[1]
	hang, loading := make(chan struct{}), make(chan struct{})
	defer close(hang)
	go func() {
		_, _ = a.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) {
			close(loading)
			<-hang // ignores its context
			return "never", nil
		})
	}()
	<-loading
	v, err := b.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "b's load", nil })
	if err != nil || v != "b's load" {
		t.Errorf("the waiter got %q, %v; want its own load", v, err)
	}
}

// A Set while others wait for a lease ends their wait with its value.
func TestASetEndsTheWaitForALease(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 3, miniredisDialer(t), Options{})
	a, b, writer := cs[0], cs[1], cs[2]
	release, loading := make(chan struct{}), make(chan struct{})
	defer close(release)
	go func() {
		_, _ = a.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) {
			close(loading)
			<-release
			return "stale load", nil
		})
	}()
	<-loading
	got := make(chan string, 1)
	go func() {
		v, _ := b.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "b's load", nil })
		got <- v
	}()
	waitingFor(t, b)
	if err := writer.Set(ctx, "k", "written"); err != nil {
		t.Fatal(err)
	}
	if v := <-got; v != "written" {
		t.Errorf("the waiter got %q; want the Set's value", v)
	}
}

// Get does not wait for a lease: a key being loaded elsewhere is not found.
func TestGetDoesNotWaitForALease(t *testing.T) {
	ctx := context.Background()
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	finish := startHeldLoad(a, "k", "v")
	defer finish()
	if _, err := b.Get(ctx, "k"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get of a leased key = %v; want ErrNotFound", err)
	}
}

// A waiter's own context bounds its wait.
func TestAWaiterLeavesWhenItsContextEnds(t *testing.T) {
	cs := newInstances[string](t, 2, miniredisDialer(t), Options{})
	a, b := cs[0], cs[1]
	finish := startHeldLoad(a, "k", "v")
	defer finish()
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		waitingFor(t, b)
		cancel()
	}()
	if _, err := b.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "b", nil }); !errors.Is(err, context.Canceled) {
		t.Errorf("GetOrLoad = %v; want context.Canceled", err)
	}
}

// stampedEnvelope is the envelope of a value v written as version.
func stampedEnvelope(kind byte, v string, version uint64) []byte {
	env := encodeEnvelope(kind, time.Now().Add(time.Hour).UnixNano(), []byte(v))
	binary.BigEndian.PutUint64(env[versionAt:], version)
	return env
}

// A lease waiter is not handed a value older than one L1 kept already:
//
//	A: GetOrLoad(k) waits for another instance's lease on k
//	A: Set(k, v2) returns; L1 keeps v2 (its message is still on its way)
//	A: the late message of the other instance's write-back of v1 (older
//	   than v2 in Redis) wakes the waiter
//
// Were the waiter to keep v1 under a ticket taken then, L1 would serve v1
// once v2's own message, finding v2 kept, had moved nothing. It reads
// Redis again instead.
func TestALeaseWaiterDoesNotKeepAValueOlderThanAnOwnWrite(t *testing.T) {
	mr, rdb := newMiniredis(t)
	c := newTestCache[string](t, rdb, Options{})
	ctx := context.Background()
	const lease, v1, v2 = 1000, 2000, 3000
	leaseEnv := stampedEnvelope(kindLease, string(newLeaseToken()), lease)
	if err := rdb.Set(ctx, c.remote.key("k"), leaseEnv, 10*time.Second).Err(); err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	go func() {
		v, err := c.GetOrLoad(ctx, "k", func(context.Context, string) (string, error) { return "loaded", nil })
		if err != nil {
			v = err.Error()
		}
		got <- v
	}()
	waitUntil(t, 5*time.Second, "the GetOrLoad to wait for the lease", func() bool { return c.waits.n.Load() == 1 })

	// A's own write of v2: in Redis, and kept in L1, its message not yet here.
	mr.Set(c.remote.key("k"), string(stampedEnvelope(kindValue, "v2", v2)))
	e := c.entry("k", "v2", false, 2, time.Minute, time.Now().Add(time.Hour).UnixNano(), v2)
	c.local.wrote(c.local.begin("k"), e)

	c.invalidated(string(encodeValueMessage(c.id+1, v1, "k", stampedEnvelope(kindValue, "v1", v1))))
	select {
	case v := <-got:
		if v != "v2" {
			t.Fatalf("the waiter woken by an older write's message returned %q; want v2, read again from Redis", v)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter did not return")
	}
	c.invalidated(string(encodeValueMessage(c.id, v2, "k", stampedEnvelope(kindValue, "v2", v2))))
	if v, src, err := c.GetFrom(ctx, "k"); v != "v2" || err != nil {
		t.Fatalf("Get after both messages = %q from %v, %v; want v2", v, src, err)
	}
}
