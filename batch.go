package tiered

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Batch reads are the single-key calls run for many keys at once, with the
// Redis work of all keys sent together: one round trip for the read, one
// for the write-back, one loader call. Every rule of the single-key path
// holds per key, because each key goes through the same steps: a ticket
// taken before the read (fetched keeps a value under it), a flight in the
// GetOrLoad table (so a load is shared with concurrent GetOrLoad and
// GetOrLoadMany calls either way), a lease per empty key, and a write-back
// by fillScript, fenced by that lease (filled keeps and counts it).
//
// A key another instance is loading is handed, alone, to GetOrLoad's own
// flight work (loadRead), which waits for that load's value. If that load
// fails, the waiter takes the lease over and loads the key: then load is
// called once more, for that key alone. The same work finishes a key whose
// read failed because the caller's ctx ended, if another caller waits for
// it (as GetOrLoad's leader does, see flight.gaveUp): load is then called
// for that key alone, after the batch returned. Those are the only cases in
// which a batch calls load more than once (besides a flight it joined
// whose leader gave up in the instant it joined: the key is then tried
// again).

// GetMany returns the values of keys found in L1 or Redis; keys found
// nowhere (or remembered as not found) are absent from the map.
//
// L1 hits cost no Redis call. All L1 misses are read in one round trip:
// MGETs of at most 500 keys, pipelined; on a Cluster, grouped by hash slot,
// one pipeline per master, in parallel. A key that holds a value of another
// Redis type reads as absent (MGET does not tell it apart). If Redis cannot
// be asked, GetMany returns the L1 hits (and whatever Redis did answer) and
// an error wrapping ErrRemoteUnavailable. An empty key anywhere is
// ErrInvalidKey, with nothing done; duplicates are fine.
func (c *Cache[V]) GetMany(ctx context.Context, keys []string) (map[string]V, error) {
	if err := c.usableKeys(keys); err != nil {
		return nil, err
	}
	c.stats.batchCalls.Add(1)
	out := make(map[string]V, len(keys))
	misses := c.missesOf(ctx, keys, out, nil, nil)
	if len(misses) == 0 {
		return out, nil
	}
	if err := ctx.Err(); err != nil {
		return out, err
	}
	reads := c.remote.getMany(ctx, namesOf(misses))
	var err error
	for i, k := range misses {
		r := &reads[i]
		v, res, _, _, rerr := c.fetched(k.key, k.t, k.localTTL, r.b, r.present, r.err, false)
		if res == fetchHit {
			out[k.key] = v
		}
		if err == nil {
			err = rerr
		}
	}
	return out, err
}

// GetOrLoadMany is GetMany that calls load for the keys missing from both
// tiers, and caches what load returns in both tiers.
//
// load is called once, with each missing key once, and never with a key
// that a concurrent GetOrLoad or GetOrLoadMany in this process is loading:
// that key's result is waited for and used. Keys another instance holds the
// lease of are waited for, not loaded (see the package documentation); if
// that instance's load fails, this call takes the lease over and loads the
// key by one more call of load, with that key alone, as GetOrLoad would. A
// key load leaves out of its map is not found: absent from the result, and
// remembered for Options.NegativeTTL if set (load returning an error
// wrapping ErrNotFound means that none was found). Loaded values are
// written back in one round trip, each fenced like GetOrLoad's: a Set or
// Delete of the key during the load wins. ItemOptions apply to every key
// stored; Options.LocalTTLFunc is asked per key.
//
// As for GetOrLoad, load runs with a context that keeps ctx's values but
// not its cancellation, bounded by Options.LoadTimeout, and GetOrLoadMany
// returns as soon as ctx is done, with the values it has and ctx's error.
// If ctx ends while Redis is being read, keys another caller waits for are
// still read, and loaded if need be, for that caller, each by a call of
// load with that key alone. If load returns an error, GetOrLoadMany
// returns the values it already has and that error, and caches nothing
// load returned. If load panics, every caller waiting for one of its keys
// gets an error wrapping ErrLoaderPanic. If Redis is down, every L1 miss
// is loaded (and kept in L1). An empty key anywhere is ErrInvalidKey, with
// nothing done; duplicates are fine.
func (c *Cache[V]) GetOrLoadMany(ctx context.Context, keys []string,
	load func(ctx context.Context, keys []string) (map[string]V, error), opts ...ItemOption) (map[string]V, error) {
	if err := c.usableKeys(keys); err != nil {
		return nil, err
	}
	if load == nil {
		return nil, fmt.Errorf("%w: nil loader", ErrInvalidOption)
	}
	if len(keys) == 0 {
		return map[string]V{}, nil
	}
	if _, _, err := c.ttls(keys[0], opts); err != nil {
		return nil, err
	}
	c.stats.batchCalls.Add(1)
	out := make(map[string]V, len(keys))
	var err error
	var refresh func(context.Context, string) (V, error) // for refresh-ahead, which loads one key
	if c.opts.RefreshAfter > 0 {
		refresh = loadOne(load)
	}
	for pending := c.missesOf(ctx, keys, out, opts, refresh); len(pending) > 0 && err == nil; {
		pending, err = c.loadMany(ctx, pending, load, out)
	}
	return out, err
}

// batchKey is a key of a batch call that L1 did not have.
type batchKey[V any] struct {
	key                 string
	t                   ticket // taken before the read
	wt                  ticket // taken before the write-back
	localTTL, remoteTTL time.Duration

	call     *flightCall[V] // the key's GetOrLoad flight, led or joined
	led      bool
	resolved bool // by the read: its result is in the output already

	res   fetchResult // what the read found
	found held        // what the write-back may replace
	w     backfill[V]
	val   V // the flight's result, once loaded
	err   error
}

// usableKeys is usable for every key, before anything is done.
func (c *Cache[V]) usableKeys(keys []string) error {
	if c.closed.Load() {
		return ErrClosed
	}
	for _, k := range keys {
		if err := c.usable(context.Background(), k); err != nil {
			return err
		}
	}
	return nil
}

// missesOf puts the L1 hits among keys in out and returns the other keys,
// once each, with their tickets. With refresh (GetOrLoadMany with
// RefreshAfter), a hit past its refresh point starts a refresh of its key,
// as GetOrLoad's does.
func (c *Cache[V]) missesOf(ctx context.Context, keys []string, out map[string]V, opts []ItemOption,
	refresh func(context.Context, string) (V, error)) []*batchKey[V] {
	var misses []*batchKey[V]
	var slab []batchKey[V]   // the misses, in one allocation
	var seen map[string]bool // made at the first miss, like slab: hits cost only out
	for i, k := range keys {
		if seen[k] {
			continue
		}
		if e, ok := c.local.get(k); ok {
			if !e.notFound {
				out[k] = e.value
			}
			if refresh != nil && e.refreshAt != nil && e.refreshAt.Load() <= c.clock.now() {
				c.maybeRefresh(ctx, k, e.refreshAt, e.version, refresh, opts)
			}
			continue
		}
		if seen == nil {
			seen = make(map[string]bool, len(keys)-i)
			slab = make([]batchKey[V], 0, len(keys)-i)
			misses = make([]*batchKey[V], 0, len(keys)-i)
		}
		seen[k] = true
		c.missed()
		slab = append(slab, batchKey[V]{key: k})
		b := &slab[len(slab)-1]
		b.localTTL, b.remoteTTL, _ = c.ttls(k, opts) // opts were checked
		b.t = c.local.begin(k)
		misses = append(misses, b)
	}
	return misses
}

func namesOf[V any](ks []*batchKey[V]) []string {
	names := make([]string, len(ks))
	for i, k := range ks {
		names[i] = k.key
	}
	return names
}

// loadMany gets the keys ks into out: each joins the flight of its key in
// progress, or this call leads one (leadMany). It returns the keys to try
// again, whose joined flight was abandoned, and the first error a key's
// flight ended with (not ErrNotFound), or ctx's.
func (c *Cache[V]) loadMany(ctx context.Context, ks []*batchKey[V],
	load func(context.Context, []string) (map[string]V, error), out map[string]V) ([]*batchKey[V], error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var led []*batchKey[V]
	for _, k := range ks {
		k.call, k.led = c.loads.claim(k.key, k.t)
		if k.led {
			led = append(led, k)
		}
	}
	if len(led) > 0 {
		c.leadMany(ctx, led, load, out)
	}
	var retry []*batchKey[V]
	var first error
	for _, k := range ks {
		if k.resolved {
			continue
		}
		if err := c.loads.wait(ctx, k.call); err != nil {
			return nil, err
		}
		r := k.call
		switch {
		case r.abandoned:
			retry = append(retry, k)
			continue
		case r.err == nil:
			out[k.key] = r.val
		case errors.Is(r.err, ErrNotFound):
		default:
			if sv, ok := c.stale(k.key, r.err); ok { // StaleIfError, as for GetOrLoad
				out[k.key] = sv
			} else if first == nil {
				first = r.err
			}
		}
		if !k.led {
			c.stats.shared.Add(1)
		}
	}
	return retry, first
}

// leadMany runs the flights of ks, which this call leads: it reads them
// all from Redis (taking the leases of empty keys), finishes the flights
// of the keys Redis had, and hands the others to goroutines of their own:
// one load for the keys to load, a GetOrLoad flight's work for each key
// another instance is loading.
func (c *Cache[V]) leadMany(ctx context.Context, ks []*batchKey[V],
	load func(context.Context, []string) (map[string]V, error), out map[string]V) {
	leases := c.opts.LoadLease > 0
	var token []byte
	var reads []remoteRead
	if leases {
		token = newLeaseToken() // one for the batch: a lease is told apart by its key
		reads = c.remote.leasedMany(ctx, namesOf(ks), c.leaseEnvelope(token), c.opts.LoadLease)
	} else {
		reads = c.remote.getMany(ctx, namesOf(ks))
	}
	var toLoad []*batchKey[V]
	var unknown []releaseCall // leases the read may have taken without our learning it
	for i, k := range ks {
		r := &reads[i]
		var v V
		v, k.res, k.found, _, _ = c.fetched(k.key, k.t, k.localTTL, r.b, r.present, r.err, leases)
		if k.res == fetchFailed && leases {
			unknown = append(unknown, c.releaseOf(k.key, msgKeys))
		}
		switch {
		case k.res == fetchHit:
			c.loads.finish(k.key, k.call, v, SourceRemote, nil, false)
			out[k.key], k.resolved = v, true
			if c.opts.RefreshAfter > 0 && c.refreshPoint(k.found.version) <= c.clock.now() {
				c.refresh(ctx, k.key, k.found.version, loadOne(load), k.localTTL, k.remoteTTL)
			}
		case k.res == fetchNotFound:
			c.loads.finish(k.key, k.call, v, SourceRemote, ErrNotFound, false)
			k.resolved = true
		case k.res == fetchFailed && ctx.Err() != nil:
			// Our caller gave up; not an outage. As for GetOrLoad: callers
			// who joined the flight get the key read (and loaded) for
			// them, by GetOrLoad's own flight work; a flight nobody joined
			// is abandoned.
			c.loads.gaveUp(ctx, k.key, k.call, ctx.Err(),
				readThenLoad(c.loadRead(k.key, k.t, loadOne(load), k.localTTL, k.remoteTTL)))
		case k.res == fetchLeased:
			c.loads.detach(ctx, k.key, k.call, readThenLoad(c.loadRead(k.key, k.t, loadOne(load), k.localTTL, k.remoteTTL)))
		default: // fetchMiss, fetchCorrupt, fetchStale (fenced by its version), or fetchFailed: Redis is down
			if leases && k.res == fetchMiss {
				k.found = held{mode: fillLease, value: token}
				c.stats.leasesGranted.Add(1)
			}
			toLoad = append(toLoad, k)
		}
	}
	if len(unknown) > 0 {
		go c.releaseLeases(ctx, token, unknown)
	}
	if len(toLoad) > 0 {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.LoadTimeout)
		go func() {
			defer cancel()
			c.loadBatch(dctx, toLoad, load, token)
		}()
	}
}

// loadBatch calls load once for the keys ks, writes back what it returns
// in one round trip, and finishes the keys' flights. ctx is detached and
// bounded by LoadTimeout; past it, the flights end with an error, the
// leases are given up at once (load may still run), and the result is not
// cached.
func (c *Cache[V]) loadBatch(ctx context.Context, ks []*batchKey[V],
	load func(context.Context, []string) (map[string]V, error), token []byte) {
	var leased []releaseCall
	for _, k := range ks {
		if k.found.mode == fillLease {
			leased = append(leased, c.releaseOf(k.key, msgKeys))
		}
	}
	expire := func() {
		for _, k := range ks {
			c.loads.expire(k.key, k.call)
		}
		c.releaseLeases(ctx, token, leased)
	}
	stop := context.AfterFunc(ctx, expire)
	c.stats.loads.Add(uint64(len(ks)))
	panicked := false
	m, err := guard(func(error) { panicked = true }, func() (map[string]V, error) { return load(ctx, namesOf(ks)) })
	if !stop() {
		return // expire ran
	}
	if ctx.Err() != nil {
		expire()
		return
	}
	if errors.Is(err, ErrNotFound) {
		m, err = nil, nil // none was found
	}
	if err != nil {
		for range ks {
			if panicked {
				c.panicked(err)
			} else {
				c.stats.loadErrors.Add(1)
			}
		}
		c.releaseLeases(ctx, token, leased)
		var zero V
		for _, k := range ks {
			c.loads.finish(k.key, k.call, zero, SourceLoader, err, false)
		}
		return
	}
	c.writeBack(ctx, ks, m, token)
	for _, k := range ks {
		c.loads.finish(k.key, k.call, k.val, SourceLoader, k.err, false)
	}
}

// writeBack caches what load returned for ks (m) in both tiers, as load
// does for one key: one pipeline of fillScript calls, each fenced by what
// the key's read found. It sets each key's result.
func (c *Cache[V]) writeBack(ctx context.Context, ks []*batchKey[V], m map[string]V, token []byte) {
	var fills []fillCall
	var filling []*batchKey[V]
	var release []releaseCall
	for _, k := range ks {
		v, ok := m[k.key]
		k.val, k.err = v, nil
		if !ok {
			k.err = ErrNotFound
		}
		if !ok && c.opts.NegativeTTL == 0 {
			if k.found.mode == fillLease {
				release = append(release, c.releaseOf(k.key, msgNotFound))
			}
			continue
		}
		var encoded bool
		if k.w, encoded = c.encodeLoaded(k.key, v, !ok, k.localTTL, k.remoteTTL); !encoded {
			if k.found.mode == fillLease {
				release = append(release, c.releaseOf(k.key, msgKeys))
			}
			continue
		}
		k.val = k.w.v
		if k.res == fetchFailed {
			// Redis did not answer the read: do not wait for it again.
			c.filled(ctx, k.key, k.t, k.t, &k.w, k.found.mode, fillReply{}, true)
			continue
		}
		k.wt = c.local.begin(k.key) // for a fillVersion write-back, kept like a Set's
		fills = append(fills, fillCall{key: k.key, env: k.w.env, ttl: k.w.ttl, mode: k.found.mode, held: k.found.fence(),
			head: messageHead(k.w.msg, c.id), tail: encodeKeys(k.key), withValue: k.w.msg == msgValue})
		filling = append(filling, k)
	}
	if len(fills) > 0 {
		for i, r := range c.remote.fillMany(ctx, fills) {
			k := filling[i]
			if !c.filled(ctx, k.key, k.t, k.wt, &k.w, k.found.mode, r, false) && k.found.mode == fillLease {
				release = append(release, c.releaseOf(k.key, msgKeys))
			}
		}
	}
	c.releaseLeases(ctx, token, release)
}

// releaseOf returns the release of this instance's lease on key, waking
// waiters with a message of kind (see releaseLease).
func (c *Cache[V]) releaseOf(key string, kind byte) releaseCall {
	return releaseCall{key: key, head: messageHead(kind, c.id), tail: encodeKeys(key)}
}

// releaseLeases gives up the leases under token of the releases, in one
// round trip.
func (c *Cache[V]) releaseLeases(ctx context.Context, token []byte, releases []releaseCall) {
	if len(releases) == 0 {
		return
	}
	for _, p := range c.remote.releaseMany(ctx, token, releases) {
		if p {
			c.stats.published.Add(1)
		}
	}
}

// loadOne is load for one key, as GetOrLoad's flight calls it: a key left
// out is ErrNotFound.
func loadOne[V any](load func(context.Context, []string) (map[string]V, error)) func(context.Context, string) (V, error) {
	return func(ctx context.Context, key string) (V, error) {
		m, err := load(ctx, []string{key})
		v, ok := m[key]
		if err == nil && !ok {
			err = ErrNotFound
		}
		return v, err
	}
}
