// Package tiered is a two-tier cache for Go services: an in-process L1 in
// front of Redis (L2), kept coherent across instances by Redis pub/sub,
// with one load per key across the fleet.
//
// # Data path
//
// A read (Get, GetOrLoad, and per key GetMany and GetOrLoadMany; see
// Batch reads) first asks L1, a ristretto cache of decoded Go
// values bounded in bytes of memory (each entry is charged an estimate of
// what its decoded value holds, made once per fill, or Options.Cost's
// figure); a hit costs a ristretto lookup, two hashes and a
// few atomic operations, with no decoding and no allocation. On a miss,
// concurrent callers of one key in one process share one flight, which
// reads Redis, where values sit in a small envelope (format, kind, version,
// expiry, refresh lease, encoded value), and on a hit fills L1 for no longer than the
// Redis entry has left. If Redis does not have the key, GetOrLoad's read
// takes the key's lease in the same round trip, calls the loader, and
// writes the result back if no Set or Delete came meanwhile (see Leases).
// With Options.RefreshAfter, a GetOrLoad hit on an old value also starts a
// background reload, and with Options.StaleIfError an expired value is kept
// for a while in case a load fails (see Freshness).
// A write (Set, Delete) changes Redis and publishes an invalidation in one
// atomic script; every other instance drops the key from its L1 when the
// message arrives, or, if a Set's small value came with it, replaces the
// old value with it. Writes are group-committed: those that arrive while a
// write of the same queue (the Cache; on a cluster, the hash slot) is on
// the wire go together next, as one script publishing one message, each
// under its own version, so a fleet's Redis delivers fewer messages; a
// lone write is sent at once. The script also appends the invalidation to
// the namespace's log, from which an instance recovers a subscription gap.
//
// # Batch reads
//
// GetMany and GetOrLoadMany read many keys in one call: L1 hits first, then
// every L1 miss in one Redis round trip (MGETs, or the lease script per
// key, pipelined; on a cluster, one pipeline per master, in parallel), one
// loader call for the keys neither tier has, and one round trip to write
// them back. Each key goes through the steps of GetOrLoad (ticket, flight,
// lease, fenced write-back), so every rule below holds per key, and a key a
// concurrent GetOrLoad or GetOrLoadMany is loading is waited for, not
// loaded again.
//
// # Consistency
//
// Once the messages published before a read began have reached an
// instance, it serves what Redis holds. Until then it may serve the value
// the writes replaced: between a writer's Set or Delete returning and its
// message arriving (one pub/sub hop), for at most 4 × HeartbeatInterval
// after its subscription silently died, and up to the L1 TTL for writes
// made to Redis or your database without this package. On a Redis Cluster,
// a cluster-bus link reset without a stall before it can lose messages
// unseen (until the L1 TTL), and after a failover L1 is flushed only once
// the next slot-map reload sees the new masters (see Cluster and the
// README). Once its own Set or Delete of a key has returned, an instance
// never serves an older value of that key (read-your-writes).
//
// Three mechanisms make that hold. Versions: Redis stamps every write
// with a version that grows, per key, in the order it ran the writes; L1
// takes a value only if it is newer than every version of its key it has
// heard of, and an invalidation removes only what is older than it, which
// orders an instance's own writes against other instances' messages.
// Generations: every fill (a Redis read or a load) records the key's
// generation when it began, and is never served once an invalidation or
// write of the key moved it. Epochs: a subscription gap (a reconnect, a
// CLIENT KILL, a stall found by the heartbeat) makes L1 a miss at once.
// When the subscription is proven back, the instance replays the
// namespace's invalidation log (Options.InvalidationLog) from the last
// entry it applied, which moves the generations of every key written
// meanwhile, and L1 is served again as before the gap; if the log cannot
// prove that nothing was lost (trimmed past that entry, replaced, another
// Redis server, a Cluster), nothing filled before the heal is served after.
//
// # Leases
//
// A GetOrLoad that misses both tiers stores a lease (a random token) under
// the key in Redis for Options.LoadLease. Its write-back lands only if the
// key still holds the token, so a Set or Delete during a slow load wins:
// the loaded value is returned to the callers that asked, and cached in
// neither tier. Other instances that miss the key meanwhile wait for the
// holder's value, woken by its message, and take the lease over if the
// holder's load fails, hangs past LoadTimeout or dies (within the lease).
// A writer that bypasses the cache (a plain SET or DEL in Redis) is not
// fenced.
//
// # Freshness
//
// With Options.RefreshAfter, a GetOrLoad that finds a value older than its
// refresh point (its age counts from its write to Redis; the point is drawn
// once per L1 entry, XFetch-style, between RefreshAfter/2 and
// RefreshAfter) returns it at once and reloads it in the background: one
// refresh per key per process, and one per value across the fleet, under
// a refresh lease kept inside the value's envelope so that the value stays
// served. The write-back is fenced by the version the refresh began from
// (a Set or Delete meanwhile wins) and published like a Set. A failed
// refresh leaves the value and is retried on that instance no sooner than
// RefreshAfter/10. Get never refreshes.
//
// With Options.StaleIfError, Redis and L1 keep a value that long past its
// expiry without serving it as fresh; a GetOrLoad whose load fails (error,
// panic, LoadTimeout) returns it with a nil error instead of the load's
// error. A value removed by a Set, Delete or subscription gap is never
// served stale.
//
// # Failures
//
// A Redis outage makes the cache slower, never the service unavailable:
// GetOrLoad serves L1 and the loader (fail-open), a breaker makes calls
// fail fast while Redis is down, and Get, Set and Delete return errors
// wrapping ErrRemoteUnavailable. A loader error, panic (ErrLoaderPanic) or
// hang (LoadTimeout) reaches the callers of that load only. Values that
// are not ours in Redis, of any Redis type, are misses that the next load
// replaces; a Codec or LocalTTLFunc that panics is contained. Bound how
// long a slow Redis can hold a call with the client's timeouts (see the
// README for measured first-call times).
//
// # Cluster
//
// Options.Redis may be a *redis.Client (single node or Sentinel) or a
// *redis.ClusterClient. On a cluster, Delete groups keys by slot and runs
// each master's part concurrently, the subscription sits on the master of
// a random slot, through that master's own client, so that a fleet's
// subscriptions stay spread over the masters (Redis forwards every
// PUBLISH to every node), there is no invalidation log (a script touches
// one slot only, so gaps flush), values are not sent with invalidations by
// default, and a change of masters flushes L1. The 4 × HeartbeatInterval
// bound holds for every path a message can take: a heartbeat published
// through each master must come back, or that is a gap. Each master has
// its own breaker; TRYAGAIN is retried and never opens one; with
// WaitReplicas, MOVED and ASK are followed. A default ClusterClient needs no
// tuning for any of this; ContextTimeoutEnabled only bounds how long the
// caller's own calls wait for a hung master.
//
// # Compatibility
//
// All instances that share a Namespace must run the same version of this
// package until v1: the envelope and message formats may change between
// versions (a value in an older format reads as a miss). Deploy a new
// version under a new Namespace (from v0.1.0, this version must be),
// except where the README says a rolling upgrade works: envelope format 3,
// which this version introduced, over instances that write format 2. An
// older instance reads format 3 values as misses and overwrites them (extra
// loads, never a wrong value); but its writes over them are versioned from
// Redis' clock alone, so if that clock steps back during the rollout a new
// instance may ignore such a write's invalidation until LocalTTL: finish
// the rollout without clock steps, or use a new Namespace. Redis must be
// 6.0 or later.
package tiered
