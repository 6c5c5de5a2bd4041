package tieredprom

import "github.com/tieredcache/tiered"

// metrics lists the counter exported for every field of tiered.Stats, in the
// order of the struct. It is the one place this module names a Stats field.
// A metric is named after its field in snake case plus "_total", and its help
// is the field's comment in stats.go. TestEveryStatsFieldIsExported fails
// until a new Stats field has its row here.
var metrics = []struct {
	name  string // after <namespace>_tiered_
	help  string
	value func(*tiered.Stats) uint64
}{
	{"local_hits_total", "Reads answered by L1.",
		func(s *tiered.Stats) uint64 { return s.LocalHits }},
	{"local_misses_total", "Reads L1 could not answer (absent, expired or invalidated).",
		func(s *tiered.Stats) uint64 { return s.LocalMisses }},
	{"remote_hits_total", "L1 misses answered by Redis (a value or a remembered not-found).",
		func(s *tiered.Stats) uint64 { return s.RemoteHits }},
	{"remote_misses_total", "L1 misses Redis did not have either (including corrupt values).",
		func(s *tiered.Stats) uint64 { return s.RemoteMisses }},

	{"loads_total", "Loader calls (one per key however many callers waited).",
		func(s *tiered.Stats) uint64 { return s.Loads }},
	{"load_errors_total", "Loader calls that returned an error other than ErrNotFound, or panicked.",
		func(s *tiered.Stats) uint64 { return s.LoadErrors }},
	{"load_panics_total", "Loader calls that panicked (also counted as load errors).",
		func(s *tiered.Stats) uint64 { return s.LoadPanics }},
	{"load_timeouts_total", "Loads (and Redis reads redone for waiting callers) that gave no result within LoadTimeout (also counted as load errors).",
		func(s *tiered.Stats) uint64 { return s.LoadTimeouts }},
	{"shared_total", "Callers that got the result of a load or Redis read another caller started.",
		func(s *tiered.Stats) uint64 { return s.Shared }},
	{"batch_calls_total", "GetMany and GetOrLoadMany calls (their keys are counted as single calls would count them).",
		func(s *tiered.Stats) uint64 { return s.BatchCalls }},
	{"leases_granted_total", "Misses of both tiers that took the key's lease and loaded it.",
		func(s *tiered.Stats) uint64 { return s.LeasesGranted }},
	{"lease_waits_total", "Misses that found another instance's lease and waited for its value.",
		func(s *tiered.Stats) uint64 { return s.LeaseWaits }},
	{"lease_takeovers_total", "Leases taken after waiting for another's (its load failed, or its lease ran out).",
		func(s *tiered.Stats) uint64 { return s.LeaseTakeovers }},
	{"fence_rejections_total", "Loaded values not cached: a Set or Delete of the key came during the load.",
		func(s *tiered.Stats) uint64 { return s.FenceRejections }},
	{"refreshes_started_total", "Background refreshes (RefreshAfter) that took a value's refresh lease and called the loader.",
		func(s *tiered.Stats) uint64 { return s.RefreshesStarted }},
	{"refreshes_failed_total", "Background refreshes whose load failed; the value stayed.",
		func(s *tiered.Stats) uint64 { return s.RefreshesFailed }},
	{"stale_served_total", "GetOrLoad calls whose load failed and that returned the expired value (StaleIfError).",
		func(s *tiered.Stats) uint64 { return s.StaleServed }},

	{"remote_errors_total", "Redis calls that failed (reads, writes, write-backs).",
		func(s *tiered.Stats) uint64 { return s.RemoteErrors }},
	{"corrupt_values_total", "Values in Redis under the cache's keys that were not its own or did not decode.",
		func(s *tiered.Stats) uint64 { return s.CorruptValues }},
	{"encode_errors_total", "Values the codec could not encode (never cached).",
		func(s *tiered.Stats) uint64 { return s.EncodeErrors }},
	{"local_too_large_total", "Values larger than LocalMaxBytes, kept in Redis only.",
		func(s *tiered.Stats) uint64 { return s.LocalTooLarge }},

	{"invalidations_published_total", "Invalidation messages this cache sent (Set, Delete, and loads other instances waited for).",
		func(s *tiered.Stats) uint64 { return s.InvalidationsPublished }},
	{"invalidations_received_total", "Invalidation messages from other instances applied to L1.",
		func(s *tiered.Stats) uint64 { return s.InvalidationsReceived }},
	{"keys_invalidated_total", "Keys dropped from L1 by received invalidations.",
		func(s *tiered.Stats) uint64 { return s.KeysInvalidated }},
	{"keys_replaced_total", "Keys dropped from L1 by received invalidations whose new value came with the message and replaced the old one.",
		func(s *tiered.Stats) uint64 { return s.KeysReplaced }},
	{"write_batches_total", "Scripts this cache sent that ran more than one write (concurrent Sets and Deletes, group-committed).",
		func(s *tiered.Stats) uint64 { return s.WriteBatches }},
	{"writes_coalesced_total", "Writes (Sets, and per slot a Delete's keys) sent in scripts with other writes.",
		func(s *tiered.Stats) uint64 { return s.WritesCoalesced }},

	{"subscription_gaps_total", "Times the invalidation subscription was found broken and L1 bypassed until it healed (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.SubscriptionGaps }},
	{"heartbeat_misses_total", "Subscription gaps found because a heartbeat did not come back in time (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.HeartbeatMisses }},
	{"flushes_total", "L1 flushes without a gap: Redis answered again after failing, or a cluster's masters changed (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.Flushes }},
	{"gaps_replayed_total", "Subscription gaps healed by replaying the invalidation log, L1 kept (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.GapsReplayed }},
	{"entries_replayed_total", "Invalidation log entries applied by replays (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.EntriesReplayed }},
	{"gaps_flushed_total", "Subscription gaps healed by flushing L1: the invalidation log could not prove nothing was lost (shared by the caches on one Redis client).",
		func(s *tiered.Stats) uint64 { return s.GapsFlushed }},
	{"local_bypassed_total", "L1 misses caused by an unhealthy subscription.",
		func(s *tiered.Stats) uint64 { return s.LocalBypassed }},
}
