package tiered

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"
)

// policyHolds checks, on a quiet L1, that the policy counts exactly the
// entries ristretto holds (of keys) and that its queues and ghost are
// within their bounds.
func policyHolds[V any](t *testing.T, name string, c *Cache[V], keys []string) {
	t.Helper()
	l, p := c.local, c.local.policy
	settleL1(c)
	minCost, _ := entryCost(*new(V), nil)
	held := map[*entry[V]]bool{}
	var heldBytes int64
	for _, k := range keys {
		if e, ok := l.store.Get(l.hash(k)); ok {
			held[e] = true
			heldBytes += e.cost
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	counted, live := 0, p.small.live+p.main.live
	for _, q := range []*fifo[V]{&p.small, &p.main} {
		for _, s := range q.slots[q.head:] {
			if s.e == nil {
				continue
			}
			counted++
			if !held[s.e] {
				t.Errorf("%s: the policy counts an entry (%d bytes) ristretto does not hold", name, s.e.cost)
			}
		}
	}
	for e := range held {
		if e.where == inNone {
			t.Errorf("%s: ristretto holds an entry (%d bytes) the policy does not count", name, e.cost)
		}
	}
	if got := p.small.bytes + p.main.bytes; got != heldBytes || counted != live || live != len(held) {
		t.Errorf("%s: the policy counts %d entries (%d live), %d bytes; ristretto holds %d, %d bytes",
			name, counted, live, got, len(held), heldBytes)
	}
	if got := p.small.bytes + p.main.bytes; got > p.max {
		t.Errorf("%s: the policy counts %d bytes, over its budget %d", name, got, p.max)
	}
	if n := len(p.small.slots) + len(p.main.slots); n > 2*live+2*64+2 {
		t.Errorf("%s: %d queue slots for %d entries", name, n, live)
	}
	// The ghost holds at most as many hashes as L1 held entries when it
	// last took one: bounded by what the budget holds.
	most := p.max / minCost
	if n := len(p.ghost.of); int64(n) > most {
		t.Errorf("%s: the ghost holds %d hashes, more than the %d entries the budget holds", name, n, most)
	}
	// After an add, the ring's live part is at most 2 slots per hash + 64
	// (else compacted) and its dead part at most 64 or as long as the live
	// one; takes shrink the hashes, not the ring, until the next add. So
	// the ring is bounded by the budget, not by the hashes held now.
	if n := len(p.ghost.ring); int64(n) > 4*most+3*64 {
		t.Errorf("%s: the ghost's ring has %d slots, more than 4 per entry the budget holds (%d) + 192", name, n, most)
	}
}

// After a storm of concurrent Sets, Deletes, loads, hits and invalidations
// on two instances whose L1s are full and churning, each policy counts
// exactly what its ristretto holds: nothing it lets go of, nothing twice.
func TestThePolicyCountsWhatRistrettoHoldsAfterAStorm(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	opts := Options{Namespace: uniqueNamespace(t), LocalMaxBytes: 64 << 10, LocalTTL: 50 * time.Millisecond}
	a := newCoreCache[string](t, rdb, opts)
	b := newCoreCache[string](t, rdb, opts)
	keys := make([]string, 600)
	for i := range keys {
		keys[i] = "k" + strconv.Itoa(i)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		c := a
		if g%2 == 1 {
			c = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 7))
			for i := range 1000 {
				k := keys[r.IntN(len(keys))]
				switch r.IntN(10) {
				case 0, 1:
					_ = c.Set(ctx, k, k+"-"+strconv.Itoa(i))
				case 2:
					_ = c.Delete(ctx, k)
				case 3:
					c.local.invalidate(k)
				default:
					_, _ = c.GetOrLoad(ctx, k, func(context.Context, string) (string, error) {
						return k + "-loaded", nil
					})
				}
			}
		}()
	}
	wg.Wait()
	// Each instance's last message is heard by the other after all of
	// the other's own (one channel, in publish order).
	_ = b.Set(ctx, "sentinel-b", "x")
	_ = a.Set(ctx, "sentinel-a", "x")
	waitUntil(t, 10*time.Second, "every message heard", func() bool {
		return a.Stats().InvalidationsReceived == b.Stats().InvalidationsPublished &&
			b.Stats().InvalidationsReceived == a.Stats().InvalidationsPublished
	})
	keys = append(keys, "sentinel-a", "sentinel-b")
	policyHolds(t, "a", a, keys)
	policyHolds(t, "b", b, keys)
}

// A Set that races a Del of its key (an invalidation, or an eviction's Del
// of a victim) is counted by the policy as long as ristretto holds it, and
// no longer: whichever of Set's count and Del's report comes first.
func TestThePolicyCountsASetThatRacesADel(t *testing.T) {
	_, rdb := newMiniredis(t)
	c := newCoreCache[string](t, rdb, Options{LocalMaxBytes: 1 << 20})
	l := c.local
	keys := []string{"a", "b", "c", "d"}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for i := range 2000 {
				k := keys[(g+i)%len(keys)]
				l.put(l.hash(k), &entry[string]{value: k, check: l.check(k), cost: 500, expires: 1 << 62})
			}
		}()
		go func() {
			defer wg.Done()
			for i := range 2000 {
				l.drop(l.hash(keys[(g+i)%len(keys)]))
			}
		}()
	}
	wg.Wait()
	policyHolds(t, "L1", c, keys)
}

// LocalMaxBytes bounds the live heap under updates too: values replaced
// over and over (fills, writes kept with their version, invalidations that
// drop entries, fills while Redis fails, that wait for ristretto, and
// entries that expire unread) keep no replaced value alive beyond the
// budget.
func TestLocalMaxBytesBoundsTheLiveHeapUnderUpdates(t *testing.T) {
	const maxBytes = 8 << 20
	_, rdb := newMiniredis(t)
	c := newCoreCache[[]byte](t, rdb, Options{LocalMaxBytes: maxBytes})
	value := func(i, round int) []byte { return []byte(fmt.Sprintf("%01000d", i*10+round)) }
	const n = 8000 // about half of them fit
	before := liveHeap()
	var version uint64
	for round := range 6 {
		for i := range n {
			k := "k" + strconv.Itoa(i)
			switch (i + round) % 6 {
			case 0: // a write of this instance, kept under its version
				version++
				_, d, _ := c.codec.roundTrip(value(i, round))
				e := c.entry(k, d, false, 0, time.Hour, math.MaxInt64, version)
				c.local.wrote(c.local.begin(k), e)
			case 1: // an invalidation of another instance's write, with the new value
				version++
				_, d, _ := c.codec.roundTrip(value(i, round))
				c.local.heard(k, version, func() *entry[[]byte] {
					return c.entry(k, d, false, 0, time.Hour, math.MaxInt64, version)
				})
			case 2:
				c.local.invalidate(k)
			case 3: // a fill while Redis failed: handed to ristretto at once
				_, d, _ := c.codec.roundTrip(value(i, round))
				c.keep(k, c.local.begin(k), d, false, 0, time.Hour, math.MaxInt64, 0, true)
			case 4: // expires at once, and nobody reads it again
				_, d, _ := c.codec.roundTrip(value(i, round))
				c.keep(k, c.local.begin(k), d, false, 0, time.Nanosecond, math.MaxInt64, 0, false)
			default:
				fillL1(t, c, k, value(i, round))
			}
		}
	}
	settleL1(c)
	grown := liveHeap() - before
	kept := 0
	for i := range n {
		if _, ok := c.local.store.Get(c.local.hash("k" + strconv.Itoa(i))); ok {
			kept++
		}
	}
	t.Logf("live heap grew %.2f MiB (%.3f × LocalMaxBytes), %d entries kept", float64(grown)/(1<<20), float64(grown)/maxBytes, kept)
	if limit := int64(1.125*maxBytes) + 2<<20; grown > limit {
		t.Errorf("live heap grew %d bytes, over 1.125 × LocalMaxBytes + 2 MiB = %d", grown, limit)
	}
	keys := make([]string, n)
	for i := range keys {
		keys[i] = "k" + strconv.Itoa(i)
	}
	policyHolds(t, "L1", c, keys)
	runtime.KeepAlive(c)
}
