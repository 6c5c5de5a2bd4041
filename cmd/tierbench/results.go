package main

import (
	"encoding/json"
	"io"
	"runtime"
	"time"

	"github.com/tieredcache/tiered"
)

// results is what a run measured. The table and the JSON show the same.
type results struct {
	cfg         config
	Config      jsonConfig `json:"config"`
	Redis       string     `json:"redis"`
	Machine     machine    `json:"machine"`
	Seconds     float64    `json:"elapsed_seconds"`
	Interrupted bool       `json:"interrupted"`

	Ops       uint64  `json:"ops"`
	OpsPerSec float64 `json:"ops_per_second"`
	Reads     uint64  `json:"reads"`
	Errors    uint64  `json:"errors"`

	// Tiers holds, in order, reads answered by L1, by L2 (Redis) and by
	// the loader, then writes, then reads of several keys (-batch).
	Tiers        []tierResult       `json:"tiers"`
	Loader       loaderResult       `json:"loader"`
	Invalidation invalidationResult `json:"invalidation"`
	Stale        staleResult        `json:"stale_reads"`
	Batch        *batchResult       `json:"batch,omitempty"` // with -batch

	// Hot is the reads of the hotKeys most popular keys, by any tier, from
	// RemoteTTL/2 into the run on: across their expiries, where
	// refresh-ahead shows, without the cold start. HotWithout is the
	// same in the run without RefreshAfter, if -refresh-after asked for
	// one.
	Hot        hotResult  `json:"hot_keys"`
	HotWithout *hotResult `json:"hot_keys_without_refresh,omitempty"`
}

// batchResult is where the keys of batch reads came from (the Tiers are
// per read, and a batch read's keys come from several tiers).
type batchResult struct {
	KeysPerRead int    `json:"keys_per_read"`
	Keys        uint64 `json:"keys_read"`
	L1Hits      uint64 `json:"l1_hits"`    // the instances' Stats.LocalHits
	RemoteHits  uint64 `json:"redis_hits"` // Stats.RemoteHits
	Loaded      uint64 `json:"loaded"`     // Stats.Loads
}

type hotResult struct {
	Keys         int     `json:"keys"`
	RefreshAfter float64 `json:"refresh_after_seconds"`
	Count        uint64  `json:"reads"`
	P50us        float64 `json:"p50_us"`
	P99us        float64 `json:"p99_us"`
	P999us       float64 `json:"p999_us"`
	MaxUs        float64 `json:"max_us"`
	Loads        uint64  `json:"loader_calls"`      // all keys, reads and refreshes
	Refreshes    uint64  `json:"refreshes_started"` // the instances' Stats.RefreshesStarted
}

type jsonConfig struct {
	Instances    int     `json:"instances"`
	Goroutines   int     `json:"goroutines"`
	Keys         int     `json:"keys"`
	Zipf         float64 `json:"zipf"`
	Reads        int     `json:"reads_weight"`
	Batch        int     `json:"keys_per_read"`
	Writes       int     `json:"writes_weight"`
	Rate         int     `json:"target_ops_per_second"`
	DBLatencyUs  float64 `json:"db_latency_us"`
	LocalTTLSec  float64 `json:"local_ttl_seconds"`
	RemoteTTLSec float64 `json:"remote_ttl_seconds"`
	DurationSec  float64 `json:"duration_seconds"`
}

type machine struct {
	OS        string `json:"os"`
	Arch      string `json:"arch"`
	CPUs      int    `json:"cpus"`
	GoVersion string `json:"go_version"`
}

type tierResult struct {
	Name string `json:"name"`
	// Count is the number of reads the tier answered (or of writes).
	Count uint64 `json:"count"`
	// SharePct is Count as a share of all reads (0 for writes).
	SharePct float64 `json:"share_of_reads_pct"`
	P50us    float64 `json:"p50_us"`
	P99us    float64 `json:"p99_us"`
	P999us   float64 `json:"p999_us"`
	MaxUs    float64 `json:"max_us"`
}

// loaderResult shows the stampede protection at work: reads answered by a
// load, against loader calls made.
type loaderResult struct {
	Calls    uint64 `json:"calls"`
	Requests uint64 `json:"reads_answered_by_a_load"`
	// SharedFlights is the instances' Stats.Shared: L1 misses that got the
	// result of a Redis read or load another caller had started.
	SharedFlights uint64 `json:"misses_that_shared_a_fill"`
}

type invalidationResult struct {
	Samples uint64  `json:"samples"`
	Lost    uint64  `json:"lost"`
	Skipped uint64  `json:"skipped"`
	P50us   float64 `json:"p50_us"`
	P99us   float64 `json:"p99_us"`
	MaxUs   float64 `json:"max_us"`
}

type staleResult struct {
	BoundMs float64 `json:"bound_ms"`
	// Within counts reads that got an older version than a write that
	// returned before they started, but less than the bound before.
	Within uint64 `json:"within_bound"`
	// Beyond counts the ones more than the bound before. Must be 0.
	Beyond uint64 `json:"beyond_bound"`
}

// shown reports whether the table and the chart show tier k: a run reads
// either one key at a time (L1, L2, loader) or in batches.
func (r *results) shown(k kind) bool {
	return k == writeOp || (k == readBatch) == (r.Batch != nil)
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// collect merges the workers' and the prober's measurements. The workers
// must have stopped.
func collect(cfg config, redisName string, elapsed time.Duration, interrupted bool,
	workers []*worker, pr *prober, d *db, stats tiered.Stats) *results {
	r := &results{
		cfg: cfg,
		Config: jsonConfig{
			Instances: cfg.instances, Goroutines: cfg.goroutines, Keys: cfg.keys, Zipf: cfg.zipf,
			Reads: cfg.reads, Batch: cfg.batch, Writes: cfg.writes, Rate: cfg.rate, DBLatencyUs: us(cfg.dbLatency),
			LocalTTLSec: cfg.localTTL.Seconds(), RemoteTTLSec: cfg.remoteTTL.Seconds(), DurationSec: cfg.duration.Seconds(),
		},
		Redis:       redisName,
		Machine:     machine{OS: runtime.GOOS, Arch: runtime.GOARCH, CPUs: runtime.NumCPU(), GoVersion: runtime.Version()},
		Seconds:     elapsed.Seconds(),
		Interrupted: interrupted,
		Stale:       staleResult{BoundMs: float64(staleBound) / float64(time.Millisecond)},
	}
	var hists [kinds]histogram
	var hot histogram
	for _, w := range workers {
		hot.merge(&w.hot)
		for k := range hists {
			hists[k].merge(&w.hist[k])
		}
		r.Errors += w.errors.Load()
		stale, beyond := w.stale.Load(), w.beyond.Load()
		r.Stale.Within += stale - beyond
		r.Stale.Beyond += beyond
	}
	for k := range hists {
		r.Ops += hists[k].n
		if kind(k) != writeOp {
			r.Reads += hists[k].n
		}
	}
	r.OpsPerSec = float64(r.Ops) / max(elapsed.Seconds(), 1e-9)
	for k := range hists {
		h := &hists[k]
		t := tierResult{Name: kindNames[k], Count: h.n,
			P50us: us(h.quantile(0.5)), P99us: us(h.quantile(0.99)), P999us: us(h.quantile(0.999)), MaxUs: us(time.Duration(h.max))}
		if kind(k) != writeOp && r.Reads > 0 {
			t.SharePct = 100 * float64(h.n) / float64(r.Reads)
		}
		r.Tiers = append(r.Tiers, t)
	}
	r.Loader = loaderResult{Calls: d.loads.Load(), Requests: hists[readLoader].n, SharedFlights: stats.Shared}
	if cfg.batch > 1 {
		r.Batch = &batchResult{KeysPerRead: cfg.batch, Keys: hists[readBatch].n * uint64(cfg.batch),
			L1Hits: stats.LocalHits, RemoteHits: stats.RemoteHits, Loaded: stats.Loads}
	}
	r.Hot = hotResult{Keys: min(hotKeys, cfg.keys), RefreshAfter: cfg.refreshAfter.Seconds(), Count: hot.n,
		P50us: us(hot.quantile(0.5)), P99us: us(hot.quantile(0.99)), P999us: us(hot.quantile(0.999)), MaxUs: us(time.Duration(hot.max)),
		Loads: d.loads.Load(), Refreshes: stats.RefreshesStarted}
	inv := pr.snapshot()
	r.Invalidation = invalidationResult{Samples: inv.n, Lost: pr.lost.Load(), Skipped: pr.skipped.Load(),
		P50us: us(inv.quantile(0.5)), P99us: us(inv.quantile(0.99)), MaxUs: us(time.Duration(inv.max))}
	return r
}

func writeJSON(w io.Writer, r *results) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}
