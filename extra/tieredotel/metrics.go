package tieredotel

import "github.com/tieredcache/tiered"

// metrics lists the instrument observed for every field of tiered.Stats, in
// the order of the struct. It is the one place this module names a Stats
// field. An instrument is named "tiered." plus its field in snake case, its
// unit says what the field counts (a UCUM annotation such as {read}), and its
// description is the field's comment in stats.go.
// TestEveryStatsFieldIsObserved fails until a new Stats field has its row
// here.
var metrics = []struct {
	name, unit, description string
	value                   func(*tiered.Stats) uint64
}{
	{"tiered.local_hits", "{read}", "Reads answered by L1.",
		func(s *tiered.Stats) uint64 { return s.LocalHits }},
	{"tiered.local_misses", "{read}", "Reads L1 could not answer (absent, expired or invalidated).",
		func(s *tiered.Stats) uint64 { return s.LocalMisses }},
	{"tiered.remote_hits", "{read}", "L1 misses answered by Redis (a value or a remembered not-found).",
		func(s *tiered.Stats) uint64 { return s.RemoteHits }},
	{"tiered.remote_misses", "{read}", "L1 misses Redis did not have either (including corrupt values).",
		func(s *tiered.Stats) uint64 { return s.RemoteMisses }},

	{"tiered.loads", "{call}", "Loader calls (one per key however many callers waited).",
		func(s *tiered.Stats) uint64 { return s.Loads }},
	{"tiered.load_errors", "{call}", "Loader calls that returned an error other than ErrNotFound, or panicked.",
		func(s *tiered.Stats) uint64 { return s.LoadErrors }},
	{"tiered.load_panics", "{call}", "Loader calls that panicked (also counted as load errors).",
		func(s *tiered.Stats) uint64 { return s.LoadPanics }},
	{"tiered.load_timeouts", "{call}", "Loads (and Redis reads redone for waiting callers) that gave no result within LoadTimeout (also counted as load errors).",
		func(s *tiered.Stats) uint64 { return s.LoadTimeouts }},
	{"tiered.shared", "{caller}", "Callers that got the result of a load or Redis read another caller started.",
		func(s *tiered.Stats) uint64 { return s.Shared }},
	{"tiered.batch_calls", "{call}", "GetMany and GetOrLoadMany calls (their keys are counted as single calls would count them).",
		func(s *tiered.Stats) uint64 { return s.BatchCalls }},
	{"tiered.leases_granted", "{lease}", "Misses of both tiers that took the key's lease and loaded it.",
		func(s *tiered.Stats) uint64 { return s.LeasesGranted }},
	{"tiered.lease_waits", "{wait}", "Misses that found another instance's lease and waited for its value.",
		func(s *tiered.Stats) uint64 { return s.LeaseWaits }},
	{"tiered.lease_takeovers", "{lease}", "Leases taken after waiting for another's (its load failed, or its lease ran out).",
		func(s *tiered.Stats) uint64 { return s.LeaseTakeovers }},
	{"tiered.fence_rejections", "{value}", "Loaded values not cached: a Set or Delete of the key came during the load.",
		func(s *tiered.Stats) uint64 { return s.FenceRejections }},
	{"tiered.refreshes_started", "{refresh}", "Background refreshes (RefreshAfter) that took a value's refresh lease and called the loader.",
		func(s *tiered.Stats) uint64 { return s.RefreshesStarted }},
	{"tiered.refreshes_failed", "{refresh}", "Background refreshes whose load failed; the value stayed.",
		func(s *tiered.Stats) uint64 { return s.RefreshesFailed }},
	{"tiered.stale_served", "{value}", "GetOrLoad calls whose load failed and that returned the expired value (StaleIfError).",
		func(s *tiered.Stats) uint64 { return s.StaleServed }},

	{"tiered.remote_errors", "{call}", "Redis calls that failed (reads, writes, write-backs).",
		func(s *tiered.Stats) uint64 { return s.RemoteErrors }},
	{"tiered.corrupt_values", "{value}", "Values in Redis under the cache's keys that were not its own or did not decode.",
		func(s *tiered.Stats) uint64 { return s.CorruptValues }},
	{"tiered.encode_errors", "{value}", "Values the codec could not encode (never cached).",
		func(s *tiered.Stats) uint64 { return s.EncodeErrors }},
	{"tiered.local_too_large", "{value}", "Values larger than LocalMaxBytes, kept in Redis only.",
		func(s *tiered.Stats) uint64 { return s.LocalTooLarge }},

	{"tiered.invalidations_published", "{message}", "Invalidation messages this cache sent (Set, Delete, and loads other instances waited for).",
		func(s *tiered.Stats) uint64 { return s.InvalidationsPublished }},
	{"tiered.invalidations_received", "{message}", "Invalidation messages from other instances applied to L1.",
		func(s *tiered.Stats) uint64 { return s.InvalidationsReceived }},
	{"tiered.keys_invalidated", "{key}", "Keys dropped from L1 by received invalidations.",
		func(s *tiered.Stats) uint64 { return s.KeysInvalidated }},
	{"tiered.keys_replaced", "{key}", "Keys dropped from L1 by received invalidations whose new value came with the message and replaced the old one.",
		func(s *tiered.Stats) uint64 { return s.KeysReplaced }},
	{"tiered.write_batches", "{script}", "Scripts this cache sent that ran more than one write (concurrent Sets and Deletes, group-committed).",
		func(s *tiered.Stats) uint64 { return s.WriteBatches }},
	{"tiered.writes_coalesced", "{write}", "Writes (Sets, and per slot a Delete's keys) sent in scripts with other writes.",
		func(s *tiered.Stats) uint64 { return s.WritesCoalesced }},

	{"tiered.subscription_gaps", "{gap}", "Times the invalidation subscription was found broken and L1 bypassed until it healed (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.SubscriptionGaps }},
	{"tiered.heartbeat_misses", "{gap}", "Subscription gaps found because a heartbeat did not come back in time (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.HeartbeatMisses }},
	{"tiered.flushes", "{flush}", "L1 flushes without a gap: Redis answered again after failing, or a cluster's masters changed (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.Flushes }},
	{"tiered.gaps_replayed", "{gap}", "Subscription gaps healed by replaying the invalidation log, L1 kept (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.GapsReplayed }},
	{"tiered.entries_replayed", "{entry}", "Invalidation log entries applied by replays (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.EntriesReplayed }},
	{"tiered.gaps_flushed", "{gap}", "Subscription gaps healed by flushing L1: the invalidation log could not prove nothing was lost (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.GapsFlushed }},
	{"tiered.local_bypassed", "{read}", "L1 misses caused by an unhealthy subscription.",
		func(s *tiered.Stats) uint64 { return s.LocalBypassed }},
}
