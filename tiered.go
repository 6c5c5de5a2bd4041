package tiered

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"
)

// Cache is a two-tier cache of values of type V. It is safe for concurrent
// use. Values returned are shared with the cache and other callers: treat
// them as read-only.
type Cache[V any] struct {
	opts    Options
	id      uint64 // origin id in our invalidation messages
	local   *local[V]
	remote  remote
	sub     *subscriber
	clock   *clock
	release func() // gives up clock
	codec   valueCodec[V]
	reads   flight[V] // Get
	loads   flight[V] // GetOrLoad
	stats   counters
	waits   leaseWaits // GetOrLoad flights waiting for another instance's load

	refreshing refreshes // keys this instance refreshes, or tried to (see refresh.go)

	ready   atomic.Bool   // our channel's subscription is confirmed
	readyCh chan struct{} // closed when ready is set
	closeCh chan struct{} // closed by Close
	closed  atomic.Bool

	remoteLog, corruptLog, encodeLog, panicLog burstLog
	refreshLog, staleLog                       burstLog
}

// New returns a Cache configured by opts. It does not need Redis to be up:
// until Redis answers, reads fall back to the loader and L1.
func New[V any](opts Options) (*Cache[V], error) {
	return newCache[V](opts, acquireClock(), releaseClock)
}

// newCache returns a Cache on clk, which it gives up with releaseClk.
func newCache[V any](opts Options, clk *clock, releaseClk func()) (*Cache[V], error) {
	opts, err := opts.withDefaults()
	if err != nil {
		releaseClk()
		return nil, err
	}
	c := &Cache[V]{
		readyCh: make(chan struct{}),
		closeCh: make(chan struct{}),
		opts:    opts,
		id:      rand.Uint64(),
		clock:   clk,
		release: releaseClk,
		codec:   valueCodec[V]{codec: opts.Codec},
		remote: remote{
			client:       opts.Redis,
			prefix:       opts.Namespace + ":",
			channel:      "tiered:inv:" + opts.Namespace,
			logKey:       "tiered:log:" + opts.Namespace,
			logWindow:    opts.InvalidationLog.Milliseconds(),
			waitReplicas: opts.WaitReplicas,
			waitTimeout:  opts.WaitTimeout,
		},
	}
	c.remote.origin, c.remote.stats = c.id, &c.stats
	for _, b := range []*burstLog{&c.remoteLog, &c.corruptLog, &c.encodeLog, &c.panicLog, &c.refreshLog, &c.staleLog} {
		b.log = opts.Logger.With("namespace", opts.Namespace)
	}
	// Values loaded while Redis failed were kept in L1 (it was all there
	// was); once Redis answers again they must not outlive that: Redis may
	// hold something else, and no invalidation will say so.
	// A Cluster master's breaker drops just the keys kept while it was open:
	// other masters' keys were read from Redis as usual.
	c.remote.breaker.onRecover = func([]string, bool) { c.sub.flush("redis answers again") }
	c.remote.onMasterRecover = func(kept []string, all bool) {
		if all {
			c.sub.flush("a Redis Cluster master answers again")
		}
		for _, k := range kept {
			c.local.invalidate(k)
		}
	}
	c.reads = flight[V]{timeout: opts.LoadTimeout, onPanic: c.panicked, onTimeout: c.timedOut, shared: &c.stats.shared}
	c.loads = flight[V]{timeout: opts.LoadTimeout, onPanic: c.panicked, onTimeout: c.timedOut, shared: &c.stats.shared}
	c.sub = acquireSubscriber(opts.Redis, opts.HeartbeatInterval, opts.Logger)
	c.local, err = newLocal[V](opts.LocalMaxBytes, clk, &c.sub.epoch)
	if err != nil {
		c.sub.release()
		releaseClk()
		return nil, fmt.Errorf("%w: %w", ErrInvalidOption, err)
	}
	log := c.remote.logKey
	if c.remote.logWindow < 0 {
		log = "" // no position: gaps flush
	}
	c.sub.add(c.remote.channel, log, c)
	return c, nil
}

// Get returns the value of key from L1 or Redis. It returns ErrNotFound if
// neither has it (or Redis remembers that the loader did not find it), and
// an error wrapping ErrRemoteUnavailable if L1 misses and Redis cannot be
// asked. An L1 hit is served even if ctx is done; anything that would block
// first checks ctx.
func (c *Cache[V]) Get(ctx context.Context, key string) (V, error) {
	if e, ok := c.local.get(key); ok {
		return e.result()
	}
	v, _, err := c.getMiss(ctx, key)
	return v, err
}

// GetFrom is Get that also says which tier answered (SourceLocal or
// SourceRemote; SourceNone if none did), for an X-Cache header or a trace
// attribute. It costs an L1 hit nothing more than Get.
func (c *Cache[V]) GetFrom(ctx context.Context, key string) (V, Source, error) {
	if e, ok := c.local.get(key); ok {
		v, err := e.result()
		return v, SourceLocal, err
	}
	return c.getMiss(ctx, key)
}

func (c *Cache[V]) getMiss(ctx context.Context, key string) (V, Source, error) {
	if err := c.usable(ctx, key); err != nil {
		var zero V
		return zero, SourceNone, err
	}
	c.missed()
	localTTL, _, _ := c.ttls(key, nil)
	t := c.local.begin(key)
	return c.reads.do(ctx, key, t, func(ctx context.Context) (V, flightLoad[V], error) {
		v, res, _, _, err := c.fetch(ctx, key, t, localTTL, nil)
		switch res {
		case fetchHit:
			return v, nil, nil
		case fetchFailed:
			return v, nil, err
		default:
			return v, nil, ErrNotFound
		}
	})
}

// GetOrLoad returns the value of key from L1 or Redis, or else calls load,
// caches its result in both tiers and returns it.
//
// Concurrent calls for one key in one process make one load; all get its
// result. load runs with a context that keeps ctx's values but not its
// cancellation, bounded by Options.LoadTimeout; each caller still returns
// as soon as its own ctx is done (the load goes on and is cached). If load
// returns an error, it is returned and nothing is cached, unless it is
// ErrNotFound and Options.NegativeTTL is set: then "not found" is cached.
// If load panics, every waiting caller gets an error wrapping
// ErrLoaderPanic. If Redis is down, GetOrLoad still loads and returns the
// value (and keeps it in L1); the failure is counted and logged.
//
// With Options.RefreshAfter, a value found past its refresh point is
// returned at once and refreshed in the background; with
// Options.StaleIfError, a failed load returns the expired value while its
// grace lasts (see "Freshness" in the package documentation).
//
// Pass load as a function value that does not allocate per call (a
// top-level function, or a method value or closure made once): a closure
// literal capturing variables costs an allocation per call, hit or miss.
func (c *Cache[V]) GetOrLoad(ctx context.Context, key string,
	load func(ctx context.Context, key string) (V, error), opts ...ItemOption) (V, error) {
	if e, ok := c.local.get(key); ok {
		if e.refreshAt != nil && e.refreshAt.Load() <= c.clock.now() {
			c.maybeRefresh(ctx, key, e.refreshAt, e.version, load, opts)
		}
		return e.result()
	}
	v, _, err := c.loadMiss(ctx, key, load, opts)
	return v, err
}

// GetOrLoadFrom is GetOrLoad that also says which tier answered
// (SourceLocal, SourceRemote, or SourceLoader when a loader in this process
// answered; SourceNone if none did). A value another instance loaded under
// its lease came through Redis: SourceRemote. It costs an L1 hit nothing
// more than GetOrLoad.
func (c *Cache[V]) GetOrLoadFrom(ctx context.Context, key string,
	load func(ctx context.Context, key string) (V, error), opts ...ItemOption) (V, Source, error) {
	if e, ok := c.local.get(key); ok {
		if e.refreshAt != nil && e.refreshAt.Load() <= c.clock.now() {
			c.maybeRefresh(ctx, key, e.refreshAt, e.version, load, opts)
		}
		v, err := e.result()
		return v, SourceLocal, err
	}
	return c.loadMiss(ctx, key, load, opts)
}

func (c *Cache[V]) loadMiss(ctx context.Context, key string,
	load func(ctx context.Context, key string) (V, error), opts []ItemOption) (V, Source, error) {
	var zero V
	if err := c.usable(ctx, key); err != nil {
		return zero, SourceNone, err
	}
	if load == nil {
		return zero, SourceNone, fmt.Errorf("%w: nil loader", ErrInvalidOption)
	}
	localTTL, remoteTTL, err := c.ttls(key, opts)
	if err != nil {
		return zero, SourceNone, err
	}
	c.missed()
	t := c.local.begin(key)
	v, src, err := c.loads.do(ctx, key, t, c.loadRead(key, t, load, localTTL, remoteTTL))
	if err != nil && ctx.Err() == nil && !errors.Is(err, ErrNotFound) {
		if sv, ok := c.stale(key, err); ok {
			return sv, SourceLocal, nil
		}
	}
	return v, src, err
}

// loadRead returns GetOrLoad's part of the flight of key, begun under t:
// read Redis (with leases: taking the key's lease or waiting for another
// instance's load), and return the load to run if Redis has no value (or
// only one past its expiry). A value past its refresh point is returned
// and refreshed in the background.
func (c *Cache[V]) loadRead(key string, t ticket, load func(ctx context.Context, key string) (V, error),
	localTTL, remoteTTL time.Duration) flightRead[V] {
	return func(ctx context.Context) (V, flightLoad[V], error) {
		var zero, v V
		var res fetchResult
		var found held
		var token []byte
		var err error
		if c.opts.LoadLease > 0 {
			v, res, found, token, _ = c.readLeased(ctx, key, t, localTTL)
		} else {
			v, res, found, _, _ = c.fetch(ctx, key, t, localTTL, nil)
		}
		switch {
		case res == fetchHit:
			if c.refreshPoint(found.version) <= c.clock.now() {
				c.refresh(ctx, key, found.version, load, localTTL, remoteTTL)
			}
			return v, nil, nil
		case res == fetchNotFound:
			return v, nil, ErrNotFound
		case res == fetchFailed && ctx.Err() != nil:
			return v, nil, ctx.Err() // our caller gave up; not an outage
		case res == fetchStale && c.opts.LoadLease > 0:
			// Loaded under the value's refresh lease, which leaves it in
			// place for a failed load to fall back on. If another
			// instance holds it, this load goes on without: its
			// write-back is fenced by the version alone.
			found.value, err = c.remote.refreshLease(ctx, key, found.version, c.opts.LoadLease)
			switch {
			case err != nil && ctx.Err() != nil:
				return v, nil, ctx.Err()
			case err != nil:
				c.remoteFailed(err)
			case found.value != nil:
				c.stats.leasesGranted.Add(1)
			}
		}
		if token != nil {
			found = held{mode: fillLease, value: token}
		}
		return zero, func(ctx context.Context) (V, error) {
			return c.load(ctx, key, t, load, res, found, localTTL, remoteTTL)
		}, nil
	}
}

// Set stores v under key in Redis and in this instance's L1, and tells every
// other instance to drop key from its L1 (or, for a small value, to replace
// it with v). When Set returns nil, a Get on
// this instance returns v (from L1, unless L1's policy evicted it for
// newer entries, which happens only when L1 is full, or a newer write of key reached
// this instance first) and other instances drop their old value as soon as
// the invalidation reaches them. Every tier of every instance returns v as
// the Codec reads it back (see Codec). If Redis fails, Set returns an error
// wrapping ErrRemoteUnavailable and this instance's L1 drops key: Redis may
// or may not have taken v.
func (c *Cache[V]) Set(ctx context.Context, key string, v V, opts ...ItemOption) error {
	if err := c.usable(ctx, key); err != nil {
		return err
	}
	localTTL, remoteTTL, err := c.ttls(key, opts)
	if err != nil {
		return err
	}
	b, stored, err := c.codec.roundTrip(v)
	if err != nil {
		c.stats.encodeErrors.Add(1)
		return err
	}
	expires, ttl := c.remoteExpiry(remoteTTL)
	kind := byte(msgKeys)
	if len(b) <= c.opts.PublishValueMaxBytes {
		kind = msgValue
	}
	// Saturated: an overflow would be a PX Redis rejects, and a batch
	// script cannot fail after its first write (see batchScript).
	px := time.Duration(addSat(int64(ttl), int64(c.opts.StaleIfError))).Milliseconds()
	t := c.local.begin(key)
	call := newCall()
	c.remote.addWrite(call, []string{key}, encodeEnvelope(kindValue, expires, b), px, kind, func(version uint64, err error) {
		if err != nil {
			c.local.invalidate(key)
			c.remoteFailed(err)
			return
		}
		c.wrote(key, t, stored, false, len(b), localTTL, expires, version)
	})
	if err := c.remote.submit(ctx, call); err != nil {
		c.local.invalidate(key) // also if ctx ended while the write was on the wire
		return err
	}
	return nil
}

// wrote keeps v, which this instance wrote to Redis as version under
// ticket t (taken before the write) and published, in L1.
func (c *Cache[V]) wrote(key string, t ticket, v V, notFound bool, size int, localTTL time.Duration, expires int64, version uint64) {
	if e := c.entry(key, v, notFound, size, localTTL, expires, version); e != nil && c.ready.Load() {
		c.local.wrote(t, e)
	} else {
		// L1 cannot hold v, but must not serve the old value, nor take an
		// older write of this instance that ends after this one.
		c.local.heard(key, version, nil)
	}
}

// Delete removes keys from Redis and from L1, here and, through one
// invalidation message (one per hash slot on a cluster, more for very many
// keys), on every other instance. On error, L1 has dropped the keys here;
// Redis may or may not have.
func (c *Cache[V]) Delete(ctx context.Context, keys ...string) error {
	if c.closed.Load() {
		return ErrClosed
	}
	for _, k := range keys {
		if err := c.usable(ctx, k); err != nil {
			return err
		}
	}
	if len(keys) == 0 {
		return nil
	}
	// Dropping before the write invalidates fills that may have read the
	// old value; dropping after invalidates fills that began during it.
	for _, k := range keys {
		c.local.invalidate(k)
	}
	// Applied here as its message will be, by each part's finish: an older
	// Set of this instance that ends after the Delete must not store its
	// value. On a cluster the keys are grouped by slot (a script may only
	// touch one slot); a slot's keys are cut into parts small enough for
	// one message (see maxMessageKeyBytes).
	groups := [][]string{keys}
	if c.remote.cluster() != nil {
		groups = groupBySlot(c.remote.prefix, keys)
	}
	call := newCall()
	for _, g := range groups {
		for len(g) > 0 {
			n, size := 0, 0
			for n < len(g) && n < maxKeysPerScript && (n == 0 || size+len(g[n]) <= maxMessageKeyBytes) {
				size += len(g[n])
				n++
			}
			part := g[:n]
			c.remote.addWrite(call, part, nil, 0, msgKeys, func(version uint64, err error) {
				if err != nil {
					c.remoteFailed(err)
					return
				}
				for _, k := range part {
					c.local.heard(k, version, nil)
				}
			})
			g = g[n:]
		}
	}
	if err := c.remote.submit(ctx, call); err != nil {
		for _, k := range keys {
			c.local.invalidate(k)
		}
		return err
	}
	return nil
}

// WaitReady blocks until the cache serves from L1 (its invalidation
// subscription is confirmed and healthy), or ctx ends (then it returns
// ctx.Err()).
//
// Until then, and whenever the subscription is unhealthy later, reads go to
// Redis: correct, but slower. A service that wants L1 from its first
// request, or a test that checks that a Set is served from L1, waits here
// after New. On a closed cache it returns ErrClosed.
func (c *Cache[V]) WaitReady(ctx context.Context) error {
	for !c.Ready() {
		if c.closed.Load() {
			return ErrClosed
		}
		select {
		case <-c.readyCh:
		case <-c.closeCh:
		case <-ctx.Done():
			return ctx.Err()
		}
		select {
		case <-c.sub.healedChan():
		case <-c.closeCh:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Ready reports whether the cache serves from L1 now: its invalidation
// subscription is confirmed and healthy. It does not block; use it in a
// health check (a cache that is not ready still answers, from Redis).
func (c *Cache[V]) Ready() bool {
	return !c.closed.Load() && c.ready.Load() && c.sub.healthy()
}

// Stats returns a snapshot of the cache's counters.
func (c *Cache[V]) Stats() Stats {
	s := &c.stats
	return Stats{
		LocalHits:              c.local.reads.hitCount(),
		LocalMisses:            s.localMisses.Load(),
		RemoteHits:             s.remoteHits.Load(),
		RemoteMisses:           s.remoteMisses.Load(),
		Loads:                  s.loads.Load(),
		LoadErrors:             s.loadErrors.Load(),
		LoadPanics:             s.loadPanics.Load(),
		LoadTimeouts:           s.loadTimeouts.Load(),
		LeasesGranted:          s.leasesGranted.Load(),
		LeaseWaits:             s.leaseWaits.Load(),
		LeaseTakeovers:         s.leaseTakeovers.Load(),
		FenceRejections:        s.fenceRejections.Load(),
		RefreshesStarted:       s.refreshes.Load(),
		RefreshesFailed:        s.refreshesFailed.Load(),
		StaleServed:            s.staleServed.Load(),
		Shared:                 s.shared.Load(),
		BatchCalls:             s.batchCalls.Load(),
		RemoteErrors:           s.remoteErrors.Load(),
		CorruptValues:          s.corrupt.Load(),
		EncodeErrors:           s.encodeErrors.Load(),
		LocalTooLarge:          s.tooLarge.Load(),
		InvalidationsPublished: s.published.Load(),
		InvalidationsReceived:  s.received.Load(),
		KeysInvalidated:        s.keysInval.Load(),
		KeysReplaced:           s.keysReplaced.Load(),
		WriteBatches:           s.writeBatches.Load(),
		WritesCoalesced:        s.writesCoalesced.Load(),
		SubscriptionGaps:       c.sub.gaps.Load(),
		HeartbeatMisses:        c.sub.hbMisses.Load(),
		Flushes:                c.sub.flushes.Load(),
		GapsReplayed:           c.sub.replayed.Load(),
		EntriesReplayed:        c.sub.replayedN.Load(),
		GapsFlushed:            c.sub.gapFlushes.Load(),
		LocalBypassed:          s.bypassed.Load(),
	}
}

// Close stops the cache's background work and releases L1. Calls after
// Close return ErrClosed; a second Close does nothing. Close does not close
// Options.Redis.
func (c *Cache[V]) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return nil
	}
	close(c.closeCh)
	c.sub.remove(c.remote.channel, c)
	c.sub.release()
	c.local.close()
	c.release()
	return nil
}

// maxKeyBytes bounds a key, so that an invalidation naming it stays far
// below the output-buffer limit at which Redis disconnects subscribers.
const maxKeyBytes = 64 << 10

// usable returns the error that stops a call before it does any work.
func (c *Cache[V]) usable(ctx context.Context, key string) error {
	switch {
	case c.closed.Load():
		return ErrClosed
	case key == "":
		return ErrInvalidKey
	case len(key) > maxKeyBytes:
		return fmt.Errorf("%w: key of %d bytes (at most %d)", ErrInvalidKey, len(key), maxKeyBytes)
	}
	return ctx.Err()
}

func (c *Cache[V]) missed() {
	c.stats.localMisses.Add(1)
	if !c.sub.healthy() || !c.ready.Load() {
		c.stats.bypassed.Add(1)
	}
}

func (e *entry[V]) result() (V, error) {
	if e.notFound {
		var zero V
		return zero, ErrNotFound
	}
	return e.value, nil
}

type fetchResult int

const (
	fetchHit      fetchResult = iota // Redis has the value
	fetchNotFound                    // Redis remembers that the loader did not find it
	fetchMiss                        // Redis has nothing
	fetchCorrupt                     // Redis has something that is not ours
	fetchFailed                      // Redis did not answer
	fetchLeased                      // another instance's load holds a lease on the key
	fetchStale                       // Redis has the value, past its expiry (see StaleIfError)
)

// fetch reads key from Redis and, on a hit, keeps it in L1 under t. With a
// lease token, it reads for a load (see leases.go): an empty key is then
// leased to the caller (fetchMiss), and another load's lease is
// fetchLeased, with what fetch saw of it. If the value is corrupt, it
// returns how the load may replace it: mode and, for a corrupt string, what
// Redis held.
func (c *Cache[V]) fetch(ctx context.Context, key string, t ticket, localTTL time.Duration, token []byte) (
	v V, res fetchResult, found held, lease leaseSeen, err error) {
	var b []byte
	present := false
	if token == nil {
		b, present, err = c.remote.get(ctx, key)
	} else {
		var state leaseState
		b, state, lease.left, err = c.remote.leased(ctx, key, c.leaseEnvelope(token), c.opts.LoadLease)
		present, err = leaseRead(state, err)
	}
	v, res, found, lease.version, err = c.fetched(key, t, localTTL, b, present, err, token != nil)
	return v, res, found, lease, err
}

// leaseEnvelope returns the lease of token, as a read for a load stores it.
func (c *Cache[V]) leaseEnvelope(token []byte) []byte {
	return encodeEnvelope(kindLease, addSat(c.clock.now(), int64(c.opts.LoadLease)), token)
}

// leaseRead turns what a lease read found into what fetched takes: present
// if a value or another's lease came back, errWrongType for another Redis
// type (and neither for a lease granted).
func leaseRead(state leaseState, err error) (present bool, _ error) {
	switch {
	case err == nil && state == leaseWrongType:
		return false, errWrongType
	case err == nil:
		return state == leaseFound, nil
	}
	return false, err
}

// fetched is what fetch makes of a read of key: b if present, or the read's
// error. A value (or a remembered not-found) is kept in L1 under t. With
// leased (a read for a load), another load's lease is fetchLeased, with
// its version; without, it is a miss.
func (c *Cache[V]) fetched(key string, t ticket, localTTL time.Duration, b []byte, present bool, err error, leased bool) (
	v V, res fetchResult, found held, leaseVersion uint64, _ error) {
	switch {
	case errors.Is(err, errWrongType):
		c.corrupted(key, err)
		return v, fetchCorrupt, held{mode: fillWrongType}, 0, nil
	case err != nil:
		c.remoteFailed(err)
		return v, fetchFailed, held{}, 0, err
	case !present:
		c.stats.remoteMisses.Add(1)
		return v, fetchMiss, held{}, 0, nil
	}
	env, err := decodeEnvelope(b)
	if err == nil && env.kind == kindValue {
		v, err = c.codec.decode(env.payload)
	}
	switch {
	case err != nil:
		c.corrupted(key, err)
		return v, fetchCorrupt, held{mode: fillSame, value: b}, 0, nil
	case env.isLease() && leased:
		return v, fetchLeased, held{}, env.version, nil
	case env.isLease():
		c.stats.remoteMisses.Add(1) // another instance is loading it
		return v, fetchMiss, held{}, 0, nil
	}
	// A value past its expiry is in its grace period: kept in L1 (not
	// served as fresh) for a load that fails, and replaced by a load.
	stale := env.kind == kindValue && env.expires <= c.clock.now()
	if stale {
		c.stats.remoteMisses.Add(1)
	} else {
		c.stats.remoteHits.Add(1)
	}
	c.keep(key, t, v, env.kind == kindNotFound, len(env.payload), localTTL, env.expires, env.version, false)
	found = held{mode: fillVersion, version: env.version}
	switch {
	case stale:
		return v, fetchStale, found, 0, nil
	case env.kind == kindNotFound:
		return v, fetchNotFound, found, 0, nil
	}
	return v, fetchHit, found, 0, nil
}

// held is what a read found in Redis that a load may replace.
type held struct {
	mode    fillMode
	value   []byte // fillSame: the corrupt value; fillLease: the lease token; fillVersion: the refresh lease, if any
	version uint64 // fillVersion: the version of the value (also set by a hit: what it read)
}

// fence returns what fillScript compares the key's value with (ARGV[4]).
func (h held) fence() []byte {
	if h.mode == fillVersion {
		return append(be64(h.version), h.value...)
	}
	return h.value
}

func (c *Cache[V]) corrupted(key string, err error) {
	c.stats.corrupt.Add(1)
	c.stats.remoteMisses.Add(1)
	c.corruptLog.warn("tiered: value in redis is not ours or does not decode; treating it as a miss",
		"key", key, "err", err)
}

// load calls the loader for key and caches what it returns. res is what
// fetch found in Redis, and found what a write-back may replace: with
// fillLease, the load holds the key's lease, and gives it up if it stores
// nothing (so that waiting instances take over at once); with fillVersion
// and a refresh lease, likewise (so that another instance may refresh).
func (c *Cache[V]) load(ctx context.Context, key string, t ticket,
	load func(context.Context, string) (V, error), res fetchResult, found held, localTTL, remoteTTL time.Duration) (v V, err error) {
	settled := false
	if found.mode == fillLease || found.mode == fillVersion && found.value != nil {
		// A load past LoadTimeout gives up the lease at once, while its
		// loader may still run: its flight has ended, and another instance
		// must not wait for the lease to run out.
		stopRelease := context.AfterFunc(ctx, func() { c.giveUp(ctx, key, found, msgKeys) })
		defer func() {
			if stopRelease() && !settled {
				kind := byte(msgKeys)
				if errors.Is(err, ErrNotFound) {
					kind = msgNotFound
				}
				c.giveUp(ctx, key, found, kind)
			}
		}()
	}
	c.stats.loads.Add(1)
	v, err = load(ctx, key)
	if ctx.Err() != nil {
		// Past LoadTimeout: the flight has ended with an error, and a
		// result this late must not be cached either.
		var zero V
		return zero, ctx.Err()
	}
	notFound := errors.Is(err, ErrNotFound)
	switch {
	case notFound && c.opts.NegativeTTL == 0:
		return v, err
	case err != nil && !notFound:
		c.stats.loadErrors.Add(1)
		return v, err
	}
	w, ok := c.encodeLoaded(key, v, notFound, localTTL, remoteTTL)
	if !ok {
		return v, nil
	}
	// Redis did not answer the read: do not wait for it again.
	outage := res == fetchFailed
	var r fillReply
	wt := c.local.begin(key) // for a fillVersion write-back, kept like a Set's
	if !outage {
		r.version, r.stored, r.published, r.err = c.remote.fill(ctx, key, w.env, w.ttl, found.mode, found.fence(),
			messageHead(w.msg, c.id), encodeKeys(key), w.msg == msgValue)
	}
	settled = c.filled(ctx, key, t, wt, &w, found.mode, r, outage)
	if notFound {
		return w.v, ErrNotFound
	}
	return w.v, nil
}

// backfill is a loaded value, or a not-found to remember, encoded for its
// write-back.
type backfill[V any] struct {
	v        V // as the Codec reads it back: what every other caller and instance will get
	notFound bool
	size     int    // of the encoded value
	env      []byte // the envelope to store
	msg      byte   // the kind of the message that wakes instances waiting for it
	ttl      time.Duration
	expires  int64
	localTTL time.Duration
}

// encodeLoaded returns the write-back of v, loaded for key (with notFound:
// a not-found, kept for NegativeTTL), or false if v cannot be encoded: it
// is then returned uncached.
func (c *Cache[V]) encodeLoaded(key string, v V, notFound bool, localTTL, remoteTTL time.Duration) (backfill[V], bool) {
	w := backfill[V]{v: v, notFound: notFound, localTTL: localTTL}
	kind := byte(kindNotFound)
	var b []byte
	if notFound {
		remoteTTL = c.opts.NegativeTTL
		w.localTTL = min(localTTL, c.opts.NegativeTTL)
	} else {
		kind = kindValue
		var err error
		if b, w.v, err = c.codec.roundTrip(v); err != nil {
			c.stats.encodeErrors.Add(1)
			c.encodeLog.warn("tiered: loaded value cannot be encoded; returning it uncached",
				"key", key, "err", err)
			return w, false
		}
	}
	w.size = len(b)
	w.expires, w.ttl = c.remoteExpiry(remoteTTL)
	if !notFound {
		w.ttl = time.Duration(addSat(int64(w.ttl), int64(c.opts.StaleIfError))) // Redis keeps it for its grace period (saturated, as in Set)
	}
	w.env = encodeEnvelope(kind, w.expires, b)
	w.msg = msgKeys
	if len(b) <= c.opts.PublishValueMaxBytes {
		w.msg = msgValue
	}
	return w, true
}

// fillReply is what a write-back of a loaded value got from Redis.
type fillReply struct {
	version   uint64
	stored    bool
	published bool // it woke instances waiting for the lease
	err       error
}

// filled counts what the write-back of w, under mode, got (r; nothing if
// outage: Redis did not answer the load's read) and keeps w in L1 under t
// if Redis took it or cannot be asked; a refresh's value (fillVersion),
// published to every instance like a Set's, is kept like one under wt,
// taken before the write-back. It reports whether a lease the load held is
// settled: replaced by the value, or by a Set or Delete.
func (c *Cache[V]) filled(ctx context.Context, key string, t, wt ticket, w *backfill[V], mode fillMode, r fillReply, outage bool) (settled bool) {
	if !outage {
		if r.published {
			c.stats.published.Add(1)
		}
		switch {
		case r.err != nil && ctx.Err() != nil:
			// Past LoadTimeout: the flight has ended, and its lease may be
			// released already. Cached nowhere.
			return false
		case r.err != nil:
			c.remoteFailed(r.err)
			outage = true
		case r.stored:
			settled = true
		case mode == fillLease:
			settled = true // a Set or Delete replaced the lease: nothing to release
			c.stats.fenceRejections.Add(1)
		case mode == fillVersion:
			settled = true // a Set, Delete or other load replaced the value
			c.stats.fenceRejections.Add(1)
		}
	}
	if r.stored && mode == fillVersion {
		// Published to every instance, this one included: kept like a
		// Set's value, so that our own message does not drop it.
		c.wrote(key, wt, w.v, w.notFound, w.size, w.localTTL, w.expires, r.version)
	} else if r.stored || outage {
		// In an outage L1 is all there is: wait until it has the value, or
		// the next caller finds neither tier and loads again.
		c.keep(key, t, w.v, w.notFound, w.size, w.localTTL, w.expires, r.version, outage)
	}
	return settled
}

// keep stores v in L1 under ticket t for at most ttl and never past
// remoteExpires. outage says that Redis could not be reached during the
// fill: L1 is then all there is, so keep waits until a Get would see the
// value (or the next caller finds neither tier and loads again), keeps it
// even while the subscription is unhealthy (the subscription's epoch is
// then odd, and the value is dropped when it heals), and for no longer than
// the breaker stays open nor than 4 × HeartbeatInterval, the bound for a
// dead subscription: no invalidation can reach such a value, and the first
// success after the outage, which flushes it, may never come if every read
// is an L1 hit.
func (c *Cache[V]) keep(key string, t ticket, v V, notFound bool, size int, ttl time.Duration,
	remoteExpires int64, version uint64, outage bool) {
	if !outage && !(t.healthy() && c.ready.Load()) {
		return
	}
	if outage {
		remoteExpires = min(remoteExpires, c.remote.outage(key),
			addSat(c.clock.now(), int64(4*c.sub.interval)))
	}
	if e := c.entry(key, v, notFound, size, ttl, remoteExpires, version); e != nil {
		if outage {
			e.staleUntil, e.refreshAt = e.expires, nil // no grace past the outage bound
		}
		c.local.set(t, e, outage)
	}
}

// entry returns the L1 entry of v, or nil if it is too large for L1. It
// is charged what it holds in memory (see entryCost), not the encoded size.
func (c *Cache[V]) entry(key string, v V, notFound bool, _ int, ttl time.Duration, remoteExpires int64, version uint64) *entry[V] {
	cost, p := entryCost(v, c.opts.Cost)
	if p != nil {
		c.panicLog.warn("tiered: Options.Cost panicked; using the estimate", "key", key, "panic", p)
	}
	if cost > c.opts.LocalMaxBytes {
		c.stats.tooLarge.Add(1)
		return nil
	}
	e := &entry[V]{
		value:      v,
		expires:    min(addSat(c.clock.now(), int64(ttl)), remoteExpires),
		notFound:   notFound,
		version:    version,
		cost:       cost,
		staleUntil: remoteExpires,
	}
	if !notFound {
		e.staleUntil = addSat(remoteExpires, int64(c.opts.StaleIfError))
	}
	if at := c.refreshPoint(version); at != neverRefresh {
		e.refreshAt = new(atomic.Int64)
		e.refreshAt.Store(at)
	}
	return e
}

// giveUp releases the lease a load held (found: see load), waking waiting
// instances with a message of kind.
func (c *Cache[V]) giveUp(ctx context.Context, key string, found held, kind byte) {
	if found.mode == fillVersion {
		c.remote.releaseRefresh(ctx, key, found.version, found.value)
		return
	}
	c.releaseLease(ctx, key, found.value, kind)
}

// remoteExpiry applies jitter to ttl and returns the L2 TTL and the expiry
// to record in the envelope.
func (c *Cache[V]) remoteExpiry(ttl time.Duration) (expires int64, jittered time.Duration) {
	jittered = ttl - time.Duration(rand.Float64()*c.opts.RemoteTTLJitter*float64(ttl))
	jittered = max(jittered, time.Millisecond) // PX must be positive
	return addSat(c.clock.now(), int64(jittered)), jittered
}

func (c *Cache[V]) remoteFailed(err error) {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return
	}
	c.stats.remoteErrors.Add(1)
	c.remoteLog.warn("tiered: redis call failed; serving from L1 and the loader", "err", err)
}

func (c *Cache[V]) timedOut(err error) {
	c.stats.loadTimeouts.Add(1)
	c.stats.loadErrors.Add(1)
	c.panicLog.warn("tiered: load timed out", "err", err)
}

func (c *Cache[V]) panicked(err error) {
	c.stats.loadPanics.Add(1)
	c.stats.loadErrors.Add(1)
	c.panicLog.warn("tiered: loader panicked", "err", err)
}

// subscribed is called once our invalidation channel is confirmed. Fills
// that began before could have missed an invalidation, so L1 is flushed
// before it is used.
func (c *Cache[V]) subscribed() {
	c.local.invalidateAll()
	if !c.ready.Swap(true) {
		close(c.readyCh)
	}
}

// clusterChanged is called when a Redis Cluster's masters changed: where
// Redis failed it may answer again, so stop failing fast. (Closing an open
// breaker flushes L1 of what was loaded while Redis failed.)
func (c *Cache[V]) clusterChanged() { c.remote.closeAll() }

// invalidated applies an invalidation message from our channel, this
// instance's own included: local.heard decides by the write's version what
// L1 keeps, so messages need no bookkeeping of who sent them or when. If
// another instance's message carries the new value and L1 holds the key,
// the new value
// replaces the old one, which spares the next read a trip to Redis (a key
// L1 does not hold is only invalidated: decoding values nobody here reads
// would be wasted work).
func (c *Cache[V]) invalidated(payload string) {
	ms, err := decodeMessage(payload)
	if err != nil {
		// Not ours: we cannot tell what it means, so assume the worst.
		c.local.invalidateAll()
		c.corruptLog.warn("tiered: malformed invalidation message; L1 flushed", "err", err)
		return
	}
	var keys, replaced uint64
	for _, m := range ms {
		keys += uint64(len(m.keys))
		// An own message only invalidates: the write keeps its value
		// itself (wrote, with the caller's ItemOptions), and its message
		// may come after that entry expired.
		if m.envelope != "" && m.origin != c.id {
			key := m.keys[0]
			c.local.heard(key, m.version, func() *entry[V] {
				e := c.messageEntry(key, m.envelope)
				if e != nil {
					replaced++
				}
				return e
			})
		} else {
			for _, k := range m.keys {
				c.local.heard(k, m.version, nil)
			}
		}
		for _, k := range m.keys {
			c.waits.wake(k, m.kind, m.version, m.envelope, c.local.beginAt)
		}
	}
	if ms[0].origin == c.id {
		return
	}
	// Counted once applied, so that a count seen means the keys are dropped.
	c.stats.received.Add(1)
	c.stats.keysInval.Add(keys)
	c.stats.keysReplaced.Add(replaced)
}

// decodeCarried decodes the envelope a message carried: a value or a
// remembered not-found (a lease is never sent: not ours).
func (c *Cache[V]) decodeCarried(envelope string) (envelope, V, error) {
	env, err := decodeEnvelope([]byte(envelope))
	var v V
	switch {
	case err == nil && env.kind == kindValue:
		v, err = c.codec.decode(env.payload)
	case err == nil && env.isLease():
		err = errCorrupt
	}
	return env, v, err
}

// messageEntry returns the L1 entry of the envelope a message carried for
// key, or nil if it does not decode (or L1 must not hold it).
func (c *Cache[V]) messageEntry(key, envelope string) *entry[V] {
	if !c.ready.Load() {
		return nil
	}
	env, v, err := c.decodeCarried(envelope)
	if err != nil {
		c.stats.corrupt.Add(1)
		c.corruptLog.warn("tiered: value in invalidation message does not decode; dropped from L1",
			"key", key, "err", err)
		return nil
	}
	localTTL, _, _ := c.ttls(key, nil)
	return c.entry(key, v, env.kind == kindNotFound, len(env.payload), localTTL, env.expires, env.version)
}
