package tiered

import (
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/redis/go-redis/v9"
)

// Options configures a Cache. Redis and Namespace are required; every other
// field has a usable zero value, documented with the field.
type Options struct {
	// Redis is the L2 client: a *redis.Client (single node, or Sentinel
	// through redis.NewFailoverClient) or a *redis.ClusterClient (Cluster,
	// or redis.NewFailoverClusterClient). New rejects every other
	// implementation of redis.UniversalClient, *redis.Ring included: the
	// Cache must know which connection an invalidation travels on to prove
	// that none was lost, and a Ring's shards each publish on their own.
	// The Cache never closes it. Bound how long a slow Redis can hold a call
	// with the client's ReadTimeout and WriteTimeout. A ClusterClient must
	// read from masters (not ReadOnly, RouteByLatency or RouteRandomly): a
	// lagging replica would refill L1 with overwritten values.
	Redis redis.UniversalClient

	// Namespace prefixes every Redis key ("<Namespace>:<key>") and names the
	// invalidation channel ("tiered:inv:<Namespace>"). Instances that share
	// data must use the same Namespace; caches of different value types must
	// not. No Namespace may be another followed by ':' ("users" and
	// "users:v2") if keys can contain ':': key "v2:42" of the one and key
	// "42" of the other would be one Redis key, invalidated on two channels.
	Namespace string

	// LocalMaxBytes bounds the memory L1 holds: entries are charged an
	// estimate of what their decoded values hold in memory (strings, slice
	// backing arrays, maps and what pointers reach, once each), plus ~200
	// bytes of the entry and ristretto's bookkeeping; Cost, if set, replaces
	// the estimate. Fills waiting to enter ristretto take up to a sixteenth
	// more. The live heap L1 accounts for stays within 1.125 × LocalMaxBytes
	// + 2 MiB, and an empty L1 takes ~4% of the default 64 MiB (counters and
	// tables; a larger share of a small budget). Default 64 MiB.
	LocalMaxBytes int64

	// Cost, if set, returns what a value holds in memory, in bytes, in
	// place of the estimate, which walks the value with reflection once per
	// fill (a few µs for a value of thousands of pointers; never on a hit).
	// Set it if values share memory the walk would count more than once, or
	// hold memory it cannot see (unsafe, cgo, memory reached through funcs
	// or channels). The entry's own overhead is added to it. It must be
	// safe for concurrent use; if it panics, the estimate is used (logged).
	Cost func(v any) int64

	// LocalTTL is how long a value stays in L1. Default 1 minute. A value is
	// also never kept in L1 longer than it has left in L2.
	LocalTTL time.Duration

	// LocalTTLFunc, if set, picks the L1 TTL per key (e.g. by prefix). A
	// zero result means LocalTTL; a negative result is treated as zero.
	LocalTTLFunc func(key string) time.Duration

	// RemoteTTL is how long a value stays in Redis. Default 1 hour.
	RemoteTTL time.Duration

	// RemoteTTLJitter spreads L2 TTLs so that keys written together do not
	// expire together: each TTL is shortened by a random fraction in
	// [0, RemoteTTLJitter). Default 0.1 (up to 10% shorter). Negative
	// disables jitter; values >= 1 are invalid.
	RemoteTTLJitter float64

	// NegativeTTL is how long a loader's ErrNotFound is remembered, in both
	// tiers. Zero (the default) disables negative caching.
	NegativeTTL time.Duration

	// LoadTimeout bounds a loader call. The loader's context is detached
	// from the caller's cancellation (a load is shared by all callers
	// waiting for it) and carries this timeout instead. It bounds the same
	// way a Redis read redone for waiting callers after the caller that
	// began it gave up. Default 10 seconds.
	LoadTimeout time.Duration

	// LoadLease is how long a GetOrLoad that misses both tiers holds the
	// key's lease in Redis while it loads (see "Leases" in the package
	// documentation). While one instance holds it, others that miss the key
	// wait for its value instead of loading, and the load's write-back is
	// fenced: it lands only if no Set or Delete of the key came meanwhile.
	// Waiters take the lease over when it is released (the load failed) or
	// runs out (the holder died or hangs), so a lease shorter than a load
	// can make two loads. Zero means LoadTimeout. Negative disables leases:
	// each instance then loads on its own, and a load's write-back is only
	// a SET NX, which a Set during the load beats but a Delete does not (the
	// deleted value can come back until RemoteTTL).
	LoadLease time.Duration

	// RefreshAfter, if positive, refreshes values ahead of their expiry: a
	// GetOrLoad (L1 or Redis hit) of a value older than its refresh point
	// returns the value at once and reloads it in the background, one load
	// per key across the fleet (under the value's refresh lease), bounded by
	// LoadTimeout, fenced like a load (a Set or Delete during the refresh
	// wins) and published like a Set. A value's age is counted from its
	// write to Redis; its refresh point is drawn once per L1 entry between
	// RefreshAfter/2 and RefreshAfter, on average RefreshAfter/10 early
	// (XFetch), so that instances do not refresh in lockstep. A refresh that
	// fails leaves the value, and is not retried on this instance before
	// RefreshAfter/10. Get never refreshes. Pick it below RemoteTTL: a
	// value that expires first is loaded as before. Zero (the default)
	// disables refreshing.
	RefreshAfter time.Duration

	// StaleIfError, if positive, keeps values StaleIfError past their
	// expiry, in Redis and in L1, without serving them as fresh: if a
	// GetOrLoad's load fails (an error other than ErrNotFound, a panic, or
	// LoadTimeout) while the key's last value is in that grace period, it
	// returns that value with a nil error (counted in Stats.StaleServed,
	// logged once per burst). A value invalidated by a Set or Delete is
	// never served stale, nor one kept only in L1 during an outage, nor a
	// remembered not-found. Redis memory grows accordingly. Zero (the
	// default) disables it.
	StaleIfError time.Duration

	// HeartbeatInterval is how often the invalidation subscription proves it
	// is alive: a PING on its own connection. A subscription with a PING
	// unanswered and no answer for 3 intervals is declared dead: L1 is
	// bypassed and the subscription rebuilt, so a silent death is noticed
	// within 4 intervals. On a *redis.ClusterClient, a heartbeat published
	// through every master must also come back within 3 intervals, and the
	// slot map is reloaded every interval. Default 500 ms. Caches that
	// share a Redis client share one subscription, whose interval is that of
	// the first Cache created on the client.
	HeartbeatInterval time.Duration

	// InvalidationLog is how long Redis keeps each invalidation in the
	// namespace's invalidation log, a Stream under "tiered:log:<Namespace>"
	// that every Set, Delete and published write-back appends to in the
	// script that writes. After a subscription gap (a reconnect, a CLIENT
	// KILL, a stall) an instance replays the log from the last entry it
	// applied instead of flushing L1, if the log still holds that entry on
	// the same Redis server; else it flushes, as it does without a log (see
	// the README's Consistency section). The window must cover a gap: up to
	// 4 × HeartbeatInterval to notice a stall, plus the reconnect. Each
	// entry costs Redis ~45 bytes plus its keys (measured: 64 bytes for a
	// write of one 20-byte key), so 30 s at 10,000 writes/s is ~19 MB.
	// Entries are trimmed by the writes that follow them (approximately,
	// a stream node of 100 at a time), so the log of a namespace that is
	// no longer written keeps its last entries. Default 30 s; negative
	// disables the log (messages then keep the format of before the log,
	// which older instances read), and every write of such an instance
	// deletes the log, so that the instances that do log flush at their
	// next gap rather than replay a log that lacks it. Ignored on a
	// *redis.ClusterClient, whose scripts cannot touch a key outside their
	// slot: there gaps flush.
	InvalidationLog time.Duration

	// PublishValueMaxBytes lets Set send values of up to this many bytes
	// (encoded; at most 1 MiB) with their invalidation. Every other
	// instance that holds the key in L1 then replaces it with the new value
	// at once, instead of dropping it and reading Redis on its next read;
	// one that does not hold it ignores the value. Larger values are only
	// invalidated. Default 256 bytes, except on a *redis.ClusterClient,
	// where the default is to send no values: while a slot migrates,
	// messages about one key come from two masters over different links and
	// can arrive out of order. Versions make L1 keep the newer value then,
	// but that is not yet measured on a cluster. Negative sends none.
	//
	// The trade-off: a value sent reaches every subscribed instance, so it
	// multiplies each write's bytes by the fleet size, whether or not they
	// hold the key; a value not sent costs a Redis read on each instance
	// that holds the key and reads it again. Measured with tierbench -fleet
	// (one Redis 7, 8 writers on one instance), values sent vs not, Redis
	// CPU per Set and bytes Redis sent per Set: 200 B values, 142 vs 128 µs
	// and 16 vs 4.6 KB at 50 instances, 443 vs 363 µs and 64 vs 18 KB at
	// 200; 1 KiB values, 159 vs 137 µs and 57 vs 4.6 KB at 50, 630 vs 399
	// µs and 229 vs 18 KB at 200; 4 KiB values, 346 vs 216 µs and 211 vs
	// 4.6 KB at 50, 1.47 ms vs 735 µs and 843 vs 18 KB at 200. Small
	// values cost little to send; raise the limit if most instances hold
	// and reread most keys, lower it (or send none) for very large fleets.
	PublishValueMaxBytes int

	// WaitReplicas, if positive, makes Set and Delete wait until that many
	// replicas of the master acknowledge the write (Redis WAIT, sent in the
	// same pipeline as the write), so that a failover right after does not
	// lose it: Redis replicates asynchronously, and a master that dies may
	// take its last acknowledged writes with it. If fewer replicas
	// acknowledge within WaitTimeout, the call returns an error wrapping
	// ErrRemoteUnavailable; the master still holds the write and the
	// invalidation was sent. It costs each write the replication round trip.
	// WAIT is not consensus: a failover can still lose a write in rare
	// cases. Requires Redis to be a *redis.Client (including a failover
	// client) or a *redis.ClusterClient. Default 0: no waiting.
	WaitReplicas int

	// WaitTimeout bounds the wait for replicas. It must be below the Redis
	// client's ReadTimeout. Default 1 second.
	WaitTimeout time.Duration

	// Codec encodes values for Redis. Default JSONCodec. Values of type
	// string and []byte bypass it.
	Codec Codec

	// Logger receives warnings about Redis failures (at most one per failure
	// kind per 10 seconds, with a count of the ones suppressed), corrupt L2
	// values, unencodable values and loader panics. Default: discard.
	Logger *slog.Logger
}

const (
	defaultLocalMaxBytes     = 64 << 20
	defaultLocalTTL          = time.Minute
	defaultRemoteTTL         = time.Hour
	defaultRemoteTTLJitter   = 0.1
	defaultLoadTimeout       = 10 * time.Second
	defaultHeartbeatInterval = 500 * time.Millisecond
	defaultWaitTimeout       = time.Second
	defaultPublishValueMax   = 256
	defaultInvalidationLog   = 30 * time.Second

	// maxPublishValue bounds PublishValueMaxBytes: Redis disconnects a
	// subscriber whose output buffer holds 32 MB (or 8 MB for 60 s), and a
	// few large values in a burst must not come near that.
	maxPublishValue = 1 << 20
)

// withDefaults validates o and fills in its defaults.
func (o Options) withDefaults() (Options, error) {
	switch {
	case o.Redis == nil:
		return o, fmt.Errorf("%w: Options.Redis is nil", ErrInvalidOption)
	case o.Namespace == "":
		return o, fmt.Errorf("%w: Options.Namespace is empty", ErrInvalidOption)
	case o.LocalMaxBytes < 0:
		return o, fmt.Errorf("%w: Options.LocalMaxBytes is negative", ErrInvalidOption)
	case o.LocalTTL < 0, o.RemoteTTL < 0, o.NegativeTTL < 0, o.LoadTimeout < 0, o.HeartbeatInterval < 0,
		o.RefreshAfter < 0, o.StaleIfError < 0:
		return o, fmt.Errorf("%w: negative duration in Options", ErrInvalidOption)
	case o.RemoteTTLJitter >= 1 || math.IsNaN(o.RemoteTTLJitter) || math.IsInf(o.RemoteTTLJitter, 0):
		return o, fmt.Errorf("%w: Options.RemoteTTLJitter must be a number below 1", ErrInvalidOption)
	case o.PublishValueMaxBytes > maxPublishValue:
		return o, fmt.Errorf("%w: Options.PublishValueMaxBytes above %d", ErrInvalidOption, maxPublishValue)
	}
	switch o.Redis.(type) {
	case *redis.Client, *redis.ClusterClient:
	case *redis.Ring:
		return o, fmt.Errorf("%w: Options.Redis is a *redis.Ring, whose shards each carry their own invalidations, which one subscription cannot hear; use a *redis.Client or *redis.ClusterClient", ErrInvalidOption)
	default:
		return o, fmt.Errorf("%w: Options.Redis is a %T; the Cache works with a *redis.Client (single node or Sentinel) or a *redis.ClusterClient, whose connections it knows how to watch", ErrInvalidOption, o.Redis)
	}
	if o.LocalMaxBytes == 0 {
		o.LocalMaxBytes = defaultLocalMaxBytes
	}
	if o.LocalTTL == 0 {
		o.LocalTTL = defaultLocalTTL
	}
	if o.RemoteTTL == 0 {
		o.RemoteTTL = defaultRemoteTTL
	}
	switch {
	case o.RemoteTTLJitter == 0:
		o.RemoteTTLJitter = defaultRemoteTTLJitter
	case o.RemoteTTLJitter < 0:
		o.RemoteTTLJitter = 0
	}
	if o.LoadTimeout == 0 {
		o.LoadTimeout = defaultLoadTimeout
	}
	if o.LoadLease == 0 {
		o.LoadLease = o.LoadTimeout
	}
	if o.HeartbeatInterval == 0 {
		o.HeartbeatInterval = defaultHeartbeatInterval
	}
	_, cluster := o.Redis.(*redis.ClusterClient)
	switch {
	case cluster:
		o.InvalidationLog = -2 * time.Millisecond // remote.logWindow -2: no log key (not in the script's slot)
	case o.InvalidationLog < 0:
		o.InvalidationLog = -time.Millisecond // remote.logWindow -1: writes delete the log
	case o.InvalidationLog == 0:
		o.InvalidationLog = defaultInvalidationLog
	}
	switch {
	case o.PublishValueMaxBytes == 0 && !cluster:
		o.PublishValueMaxBytes = defaultPublishValueMax
	case o.PublishValueMaxBytes <= 0:
		o.PublishValueMaxBytes = -1 // not even empty values
	}
	if cc, ok := o.Redis.(*redis.ClusterClient); ok {
		if co := cc.Options(); co.ReadOnly || co.RouteByLatency || co.RouteRandomly {
			// A replica that lags behind its master would refill L1 with a
			// value an invalidation already replaced, for up to LocalTTL.
			return o, fmt.Errorf("%w: the ClusterClient reads from replicas (ReadOnly, RouteByLatency or RouteRandomly); give the Cache one that reads from masters", ErrInvalidOption)
		}
	}
	if o.WaitReplicas < 0 || o.WaitTimeout < 0 {
		return o, fmt.Errorf("%w: negative WaitReplicas or WaitTimeout", ErrInvalidOption)
	}
	if o.WaitReplicas > 0 {
		if o.WaitTimeout == 0 {
			o.WaitTimeout = defaultWaitTimeout
		}
		var readTimeout time.Duration
		switch c := o.Redis.(type) {
		case *redis.Client:
			readTimeout = c.Options().ReadTimeout
		case *redis.ClusterClient:
			readTimeout = c.Options().ReadTimeout
		}
		if readTimeout > 0 && o.WaitTimeout >= readTimeout {
			return o, fmt.Errorf("%w: WaitTimeout %v is not below the client's ReadTimeout %v", ErrInvalidOption, o.WaitTimeout, readTimeout)
		}
	}
	if o.Codec == nil {
		o.Codec = JSONCodec{}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o, nil
}

// ItemOption changes how one call stores its value. Later options win.
type ItemOption struct {
	localTTL  time.Duration
	remoteTTL time.Duration
}

// WithLocalTTL sets the L1 TTL of the value this call stores. It beats
// Options.LocalTTLFunc and Options.LocalTTL. Zero means "no override".
func WithLocalTTL(d time.Duration) ItemOption { return ItemOption{localTTL: d} }

// WithRemoteTTL sets the L2 TTL of the value this call stores (jitter still
// applies). Zero means "no override".
func WithRemoteTTL(d time.Duration) ItemOption { return ItemOption{remoteTTL: d} }

// ttls resolves the TTLs for key under opts.
func (c *Cache[V]) ttls(key string, opts []ItemOption) (localTTL, remoteTTL time.Duration, err error) {
	for _, o := range opts {
		if o.localTTL < 0 || o.remoteTTL < 0 {
			return 0, 0, fmt.Errorf("%w: negative TTL", ErrInvalidOption)
		}
		if o.localTTL > 0 {
			localTTL = o.localTTL
		}
		if o.remoteTTL > 0 {
			remoteTTL = o.remoteTTL
		}
	}
	if localTTL == 0 && c.opts.LocalTTLFunc != nil {
		localTTL = max(c.localTTLFunc(key), 0)
	}
	if localTTL == 0 {
		localTTL = c.opts.LocalTTL
	}
	if remoteTTL == 0 {
		remoteTTL = c.opts.RemoteTTL
	}
	return localTTL, remoteTTL, nil
}

// localTTLFunc calls Options.LocalTTLFunc. A panic in it must not crash the
// subscriber, which calls it for values that come with invalidations: it
// counts as a zero result (Options.LocalTTL), logged.
func (c *Cache[V]) localTTLFunc(key string) (d time.Duration) {
	defer func() {
		if p := recover(); p != nil {
			d = 0
			c.panicLog.warn("tiered: Options.LocalTTLFunc panicked; using LocalTTL", "key", key, "panic", p)
		}
	}()
	return c.opts.LocalTTLFunc(key)
}
