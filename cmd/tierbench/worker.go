package main

import (
	"context"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/tieredcache/tiered"
)

// kind is what an operation turned out to be: a read answered by one of
// the tiers, or a write.
type kind int

const (
	readL1 kind = iota
	readL2
	readLoader
	writeOp
	readBatch // with -batch: a read of several keys, whichever tiers answered
	kinds
)

var kindNames = [kinds]string{"L1", "L2", "loader", "writes", "batch"}

// worker drives the workload on one cache instance from one goroutine.
// Its counters are read live by the progress line; its histograms only
// after it stopped.
type worker struct {
	cache    *tiered.Cache[*item]
	db       *db
	load     func(context.Context, string) (*item, error) // made once: a method value allocates
	loadMany func(context.Context, []string) (map[string]*item, error)
	keys     []string
	pick     func() int
	rng      *rand.Rand
	cfg      config
	bound    time.Duration // the stale bound
	interval time.Duration // between operations, on average; 0: no pacing

	counts [kinds]atomic.Uint64
	stale  atomic.Uint64 // reads that missed a write that returned before they started
	beyond atomic.Uint64 // ... more than bound before they started
	errors atomic.Uint64
	hist   [kinds]histogram
	hot    histogram // reads of the hot keys, whichever tier answered, from hotFrom on
	// hotFrom is when hot-key reads start to count (db.since): after the
	// first loads of the run, so that what is measured is the reads across
	// the keys' expiries, not the cold start.
	hotFrom time.Duration
}

// hotKeys is how many of the most popular keys (the lowest indices, under
// Zipf) count as hot.
const hotKeys = 10

func newWorker(seed uint64, c *tiered.Cache[*item], d *db, keys []string, cfg config, bound time.Duration) *worker {
	w := &worker{cache: c, db: d, load: d.load, loadMany: d.loadMany, keys: keys, rng: rand.New(rand.NewPCG(seed, 0x7469657265)), cfg: cfg, bound: bound}
	if cfg.rate > 0 {
		w.interval = time.Duration(float64(time.Second) * float64(cfg.goroutines) / float64(cfg.rate))
	}
	if cfg.zipf > 1 && len(keys) > 1 {
		z := rand.NewZipf(w.rng, cfg.zipf, 1, uint64(len(keys)-1))
		w.pick = func() int { return int(z.Uint64()) }
	} else {
		w.pick = func() int { return w.rng.IntN(len(keys)) }
	}
	return w
}

// run does operations until stop is closed, at most w.interval apart on
// average (no pacing if 0). Operations themselves are not cancelled, so
// that every one counted ran to its end.
func (w *worker) run(stop <-chan struct{}) {
	ctx := context.Background()
	total := w.cfg.reads + w.cfg.writes
	p := pacer{interval: w.interval, next: time.Now().Add(-time.Duration(w.rng.Float64() * float64(w.interval)))}
	for p.wait(stop) {
		i := w.pick()
		switch {
		case w.rng.IntN(total) < w.cfg.writes:
			w.write(ctx, i)
		case w.cfg.batch > 1:
			w.readMany(ctx, i)
		default:
			w.read(ctx, i)
		}
	}
}

func (w *worker) read(ctx context.Context, i int) {
	start := w.db.since()
	it, src, err := w.cache.GetOrLoadFrom(ctx, w.keys[i], w.load)
	end := w.db.since()
	if err != nil {
		w.errors.Add(1)
		return
	}
	k := readL1
	switch src {
	case tiered.SourceRemote:
		k = readL2
	case tiered.SourceLoader:
		k = readLoader
	}
	w.counts[k].Add(1)
	w.hist[k].record(end - start)
	if i < hotKeys && start >= w.hotFrom {
		w.hot.record(end - start)
	}
	w.check(i, it, start)
}

// readMany reads key i and cfg.batch-1 more keys, picked as one would be,
// in one GetOrLoadMany.
func (w *worker) readMany(ctx context.Context, i int) {
	idx := make([]int, w.cfg.batch)
	keys := make([]string, w.cfg.batch)
	for j := range idx {
		if j > 0 {
			i = w.pick()
		}
		idx[j], keys[j] = i, w.keys[i]
	}
	start := w.db.since()
	items, err := w.cache.GetOrLoadMany(ctx, keys, w.loadMany)
	end := w.db.since()
	if err != nil {
		w.errors.Add(1)
		return
	}
	w.counts[readBatch].Add(1)
	w.hist[readBatch].record(end - start)
	for j, k := range keys {
		if it, ok := items[k]; ok {
			w.check(idx[j], it, start)
		} else {
			w.errors.Add(1) // every key exists
		}
	}
}

// check counts a read of key i, started at start, that got it, if stale.
func (w *worker) check(i int, it *item, start time.Duration) {
	stale, beyond := w.db.stale(i, it.Version, start, w.bound)
	if stale {
		w.stale.Add(1)
	}
	if beyond {
		w.beyond.Add(1)
	}
}

func (w *worker) write(ctx context.Context, i int) {
	start := w.db.since()
	if err := w.db.update(ctx, w.cache, w.keys, i); err != nil {
		w.errors.Add(1)
		return
	}
	w.counts[writeOp].Add(1)
	w.hist[writeOp].record(w.db.since() - start)
}
