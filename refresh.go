package tiered

import (
	"context"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Refresh-ahead (Options.RefreshAfter) and stale-if-error
// (Options.StaleIfError).
//
// A value's age is read from its version, which is Redis' clock when it
// was written (see envelope.go). When a GetOrLoad hit finds a value past its
// refresh point, it returns the value and starts a refresh: a load, on a
// goroutine of its own, bounded by LoadTimeout. Within one process there is
// one refresh per key at a time (refreshes), and across the fleet one per
// value: the refresh first takes the value's refresh lease, a field of the
// value's envelope that a script sets in place (refreshLeaseScript),
// leaving the value served meanwhile. A lease in a key of its own would be
// simpler to read but must live in the value's Cluster slot, which no
// suffix of a key that may hold braces guarantees; inside the value it
// also disappears with the value, whatever replaces it. The refresh's
// write-back is fenced like a load's: it lands only if the key still holds
// the version the refresh began from and its lease (fillVersion), so a Set
// or Delete during the refresh wins, and is published like a Set, so every
// instance replaces or drops the old value. A refresh that failed (or found
// the lease taken) is not tried again on this instance before
// RefreshAfter/10.
//
// The refresh point is drawn once per L1 entry, when it is stored, so that
// a hit costs one comparison with the coarse clock: it is
//
//	written + RefreshAfter - min(RefreshAfter/10 · -ln(U), RefreshAfter/2)
//
// with U uniform in (0, 1]: XFetch's early start (Vattani et al., VLDB
// 2015) with the recomputation time taken as RefreshAfter/10 and β = 1.
// Instances draw apart, so the fleet does not refresh a key in lockstep,
// and the first instance past its point refreshes it for all (on average
// RefreshAfter/10 early; later than RefreshAfter/2 in 99.3% of draws).
//
// With StaleIfError, Redis keeps a value StaleIfError past its logical
// expiry (the one in its envelope), and so does L1 (entry.staleUntil).
// Neither serves it as fresh: a GetOrLoad that finds it in Redis loads
// under its refresh lease (without the lease, if another instance holds
// it: that load is fenced by the version alone) and keeps it in L1, and if
// the load fails (an error, a panic, LoadTimeout), returns the value L1
// kept, as long as its grace lasts and no invalidation removed it.

// refreshes holds, per key, the time until which this instance starts no
// refresh of it: one is running, or one failed. A refresh whose loader
// ignores its context runs on past LoadTimeout, when it has failed: it
// holds its key until RefreshAfter/10 after that.
type refreshes struct {
	mu sync.Mutex
	m  map[string]int64
}

// refreshesPruned is the size of the table above which start drops the
// keys that may be refreshed again.
const refreshesPruned = 1024

// start reports whether a refresh of key may start at now, and if so holds
// the key until busyUntil.
func (r *refreshes) start(key string, now, busyUntil int64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if until, ok := r.m[key]; ok && now < until {
		return false
	}
	if r.m == nil {
		r.m = make(map[string]int64)
	}
	if len(r.m) >= refreshesPruned {
		for k, until := range r.m {
			if now >= until {
				delete(r.m, k)
			}
		}
	}
	r.m[key] = busyUntil
	return true
}

// end ends the refresh of key: the next may start at once (it succeeded),
// or from retryAt.
func (r *refreshes) end(key string, succeeded bool, retryAt int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if succeeded {
		delete(r.m, key)
	} else {
		r.m[key] = retryAt
	}
}

// neverRefresh is the refresh point of a value that is not refreshed.
const neverRefresh = math.MaxInt64

// refreshPoint returns when a value of version should be refreshed
// (UnixNano), drawn as the comment above says; neverRefresh with
// RefreshAfter off, or for a value without a version (kept in an outage).
func (c *Cache[V]) refreshPoint(version uint64) int64 {
	after := int64(c.opts.RefreshAfter)
	if after <= 0 || version == 0 || version > math.MaxInt64/1000 {
		return neverRefresh
	}
	early := min(float64(after/10)*-math.Log(1-rand.Float64()), float64(after/2))
	return addSat(int64(version)*1000, after-int64(early))
}

// maybeRefresh starts a refresh of key, whose value of version was read by
// a GetOrLoad (or a batch read with a loader), if its refresh point has
// passed. It is the one refresh decision of every read path: an L1 hit
// passes its entry's refreshAt (the first hit past it moves it on by
// RefreshAfter/10, so that one hit, not every hit, goes on to the table of
// refreshes), a Redis hit nil (the point is drawn from version).
func (c *Cache[V]) maybeRefresh(ctx context.Context, key string, refreshAt *atomic.Int64, version uint64,
	load func(context.Context, string) (V, error), opts []ItemOption) {
	now := c.clock.now()
	if refreshAt != nil {
		at := refreshAt.Load()
		if at > now || !refreshAt.CompareAndSwap(at, addSat(now, int64(c.opts.RefreshAfter/10))) {
			return
		}
	} else if c.refreshPoint(version) > now {
		return
	}
	localTTL, remoteTTL, err := c.ttls(key, opts)
	if err != nil {
		return // the read that called us returns the same error, or will
	}
	c.refresh(ctx, key, version, load, localTTL, remoteTTL)
}

// refresh starts a refresh of key's value of version, stored with the
// given TTLs, unless one runs or failed lately on this instance.
func (c *Cache[V]) refresh(ctx context.Context, key string, version uint64,
	load func(context.Context, string) (V, error), localTTL, remoteTTL time.Duration) {
	if c.closed.Load() {
		return
	}
	now := c.clock.now()
	if !c.refreshing.start(key, now, addSat(now, int64(c.opts.LoadTimeout+c.opts.RefreshAfter/10))) {
		return
	}
	go func() {
		ok := c.refreshOnce(ctx, key, version, load, localTTL, remoteTTL)
		c.refreshing.end(key, ok, addSat(c.clock.now(), int64(c.opts.RefreshAfter/10)))
	}()
}

// refreshOnce takes the refresh lease of key's value of version and, if it
// got it, loads key and writes the value back (fenced: see c.load). It
// reports whether there is nothing to retry: the lease is held elsewhere
// or the value moved on (false: that instance's refresh may fail), or the
// load succeeded.
func (c *Cache[V]) refreshOnce(ctx context.Context, key string, version uint64,
	load func(context.Context, string) (V, error), localTTL, remoteTTL time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.LoadTimeout)
	defer cancel()
	token, err := c.remote.refreshLease(ctx, key, version, c.refreshLeaseTTL())
	if err != nil {
		c.remoteFailed(err)
		return false
	}
	if token == nil {
		return false
	}
	c.stats.refreshes.Add(1)
	t := c.local.begin(key)
	_, err = c.loads.guard(func() (V, error) {
		return c.load(ctx, key, t, load, fetchHit, held{mode: fillVersion, version: version, value: token}, localTTL, remoteTTL)
	})
	if err != nil {
		c.stats.refreshesFailed.Add(1)
		c.refreshLog.warn("tiered: refresh failed; the current value stays", "key", key, "err", err)
		return false
	}
	return true
}

// refreshLeaseTTL is how long a refresh holds its lease: LoadLease, or, with
// leases off, LoadTimeout (a refresh always takes one: it would otherwise
// make one load per instance).
func (c *Cache[V]) refreshLeaseTTL() time.Duration {
	if c.opts.LoadLease > 0 {
		return c.opts.LoadLease
	}
	return c.opts.LoadTimeout
}

// stale returns the value L1 kept of key past its expiry, for a load of
// key that failed with err: the value, if StaleIfError is on and its grace
// lasts, counted and logged.
func (c *Cache[V]) stale(key string, err error) (V, bool) {
	var zero V
	if c.opts.StaleIfError <= 0 {
		return zero, false
	}
	e, ok := c.local.stale(key)
	if !ok {
		return zero, false
	}
	c.stats.staleServed.Add(1)
	c.staleLog.warn("tiered: load failed; serving the expired value (StaleIfError)", "key", key, "err", err)
	return e.value, true
}
