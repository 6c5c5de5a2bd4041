package tiered

import "sync/atomic"

// Stats is a snapshot of a Cache's counters. Counters only grow; export them
// as monotonic counters and let the metrics system compute rates.
type Stats struct {
	LocalHits    uint64 // reads answered by L1
	LocalMisses  uint64 // reads L1 could not answer (absent, expired or invalidated)
	RemoteHits   uint64 // L1 misses answered by Redis (value or remembered not-found)
	RemoteMisses uint64 // L1 misses Redis did not have either (including corrupt values)

	Loads      uint64 // loader calls (one per key however many callers waited)
	LoadErrors uint64 // loader calls that returned an error other than ErrNotFound, or panicked
	LoadPanics uint64 // loader calls that panicked (also counted in LoadErrors)
	// LoadTimeouts counts loads (and Redis reads redone for waiting
	// callers) that gave no result within LoadTimeout; their callers got an
	// error wrapping context.DeadlineExceeded. Also counted in LoadErrors.
	LoadTimeouts uint64
	Shared       uint64 // callers that got the result of a load or read another caller started
	// BatchCalls counts GetMany and GetOrLoadMany calls. Their keys are
	// counted in the other counters as the single-key calls would count
	// them (a batch of 100 L1 misses is 100 LocalMisses, its load 100 Loads).
	BatchCalls uint64

	// Leases (Options.LoadLease): one load per key per fleet, fenced.
	LeasesGranted   uint64 // misses of both tiers that took the key's lease and loaded it
	LeaseWaits      uint64 // misses that found another instance's lease and waited for its value
	LeaseTakeovers  uint64 // leases taken after waiting for another's (its load failed, or its lease ran out)
	FenceRejections uint64 // loaded values not cached: a Set or Delete of the key came during the load

	// Freshness (Options.RefreshAfter, Options.StaleIfError).
	RefreshesStarted uint64 // background refreshes that took a value's refresh lease and called the loader
	RefreshesFailed  uint64 // of those, refreshes whose load failed (error, panic, timeout, not found): the value stayed
	StaleServed      uint64 // GetOrLoad calls whose load failed and that returned the expired value instead

	RemoteErrors  uint64 // Redis calls that failed (reads, writes, write-backs)
	CorruptValues uint64 // values in Redis under our key that were not ours or did not decode
	EncodeErrors  uint64 // values the codec could not encode (never cached)
	LocalTooLarge uint64 // values larger than LocalMaxBytes, kept in Redis only

	InvalidationsPublished uint64 // invalidation messages this Cache sent (Set, Delete, and loads other instances waited for)
	InvalidationsReceived  uint64 // invalidation messages from other instances applied to L1
	KeysInvalidated        uint64 // keys dropped from L1 by received invalidations
	KeysReplaced           uint64 // of those, keys L1 held whose new value came with the invalidation and replaced the old one

	// Group commit: writes in flight at the same time on one Cache (and,
	// on a Cluster, in one hash slot) go to Redis as one script publishing
	// one message.
	WriteBatches    uint64 // scripts sent that ran more than one write (each also counts in InvalidationsPublished once, if it succeeded)
	WritesCoalesced uint64 // writes (Sets, and per slot the keys of a Delete) sent in those scripts; ÷ WriteBatches is the mean batch size

	// SubscriptionGaps, HeartbeatMisses, Flushes, GapsReplayed,
	// EntriesReplayed and GapsFlushed belong to the subscription this Cache
	// shares with the other Caches on its Redis client, and read the same
	// in all of them; LocalBypassed is this Cache's own.
	SubscriptionGaps uint64 // times the subscription was found broken: L1 bypassed until it healed (see GapsReplayed, GapsFlushed)
	HeartbeatMisses  uint64 // gaps found because a heartbeat (a PING, or on a cluster one through a master) did not come back in time
	Flushes          uint64 // L1 flushes without a gap: Redis answered again after failing (on a cluster, a master whose outage kept too many keys to drop them one by one), or a cluster's masters changed
	// Gaps healed by replaying the invalidation log (Options.InvalidationLog):
	// L1 kept what it held before the gap.
	GapsReplayed    uint64
	EntriesReplayed uint64 // log entries those replays applied (each an invalidation the gap had lost, or a duplicate of one that arrived)
	// Gaps healed by a flush: no log (disabled, a Cluster, never written),
	// the log trimmed past the position or replaced, another Redis server
	// (restart, failover), or Redis answered again after failing during
	// the gap. Logged at Info with the reason.
	GapsFlushed   uint64
	LocalBypassed uint64 // L1 misses caused by an unhealthy subscription (this Cache)
}

// counters are the live counters behind Stats.
type counters struct {
	localMisses, remoteHits         atomic.Uint64
	remoteMisses, loads, loadErrors atomic.Uint64
	loadPanics, remoteErrors        atomic.Uint64
	loadTimeouts, leasesGranted     atomic.Uint64
	leaseWaits, leaseTakeovers      atomic.Uint64
	fenceRejections                 atomic.Uint64
	refreshes, refreshesFailed      atomic.Uint64
	staleServed                     atomic.Uint64
	corrupt, encodeErrors, tooLarge atomic.Uint64
	published, received, keysInval  atomic.Uint64
	bypassed, shared, keysReplaced  atomic.Uint64
	batchCalls                      atomic.Uint64
	writeBatches, writesCoalesced   atomic.Uint64
}
