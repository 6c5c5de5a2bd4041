package main

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/tieredcache/tiered"
)

// heartbeat is the caches' Options.HeartbeatInterval (tiered's default,
// set explicitly because the stale bound is derived from it).
const heartbeat = 500 * time.Millisecond

// staleBound is how stale a read may be and still be within what tiered
// promises. A read on another instance serves an overwritten value until
// the invalidation message arrives; if its subscription silently died, it
// stops using L1 once no heartbeat came back for 3 intervals, which it
// checks once per interval: at most 4 intervals in all. 100 ms of slack
// covers scheduling delays on a loaded machine. A read that started more
// than staleBound after a write returned, and got an older version, is
// counted as stale beyond the bound; there must be none.
const staleBound = 4*heartbeat + 100*time.Millisecond

// runBench sets up the instances, runs the workload until cfg.duration
// has passed or ctx is done, and returns what it measured.
func runBench(ctx context.Context, cfg config, progressOut io.Writer) (*results, error) {
	be, ns, cleanup, err := startRun(ctx, cfg, progressOut)
	if err != nil {
		return nil, err
	}
	defer cleanup()

	origin := time.Now()
	since := func() time.Duration { return time.Since(origin) }
	d := newDB(cfg.keys, cfg.dbLatency, staleBound+time.Second, since)
	keys := make([]string, cfg.keys)
	for i := range keys {
		keys[i] = keyName(i)
	}

	in, err := startInstances(be, cfg.instances, tiered.Options{
		Namespace:         ns,
		HeartbeatInterval: heartbeat,
		LocalTTL:          cfg.localTTL,
		RemoteTTL:         cfg.remoteTTL,
		RefreshAfter:      cfg.refreshAfter,
	})
	if err != nil {
		return nil, err
	}
	defer in.close()
	if err := in.waitReady(ctx); err != nil {
		return nil, err
	}

	workers := make([]*worker, cfg.goroutines)
	for g := range workers {
		workers[g] = newWorker(uint64(g), in.caches[g%len(in.caches)], d, keys, cfg, staleBound)
	}
	pr := &prober{caches: in.caches, since: since}

	fmt.Fprintf(progressOut, "tierbench: %s; %s\n", describe(cfg), be.name)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	start := since()
	for _, w := range workers {
		w.hotFrom = start + cfg.remoteTTL/2 // every hot key loaded, none expired yet
		wg.Go(func() { w.run(stop) })
	}
	wg.Go(func() { pr.run(stop) })
	pl := &progress{out: progressOut, workers: workers, prober: pr, batch: cfg.batch > 1}
	interrupted := waitFor(ctx, cfg.duration, pl.tick)
	close(stop)
	wg.Wait()
	elapsed := since() - start
	if interrupted {
		fmt.Fprintf(progressOut, "tierbench: interrupted after %.1fs; results so far:\n", elapsed.Seconds())
	}
	return collect(cfg, be.name, elapsed, interrupted, workers, pr, d, in.stats()), nil
}

// runCompared is runBench, and with cfg.refreshAfter set, a run without it
// first: the results are the second run's, with the hot-key reads of both.
func runCompared(ctx context.Context, cfg config, progressOut io.Writer) (*results, error) {
	if cfg.refreshAfter <= 0 {
		return runBench(ctx, cfg, progressOut)
	}
	off := cfg
	off.refreshAfter = 0
	fmt.Fprintln(progressOut, "tierbench: run 1 of 2, without -refresh-after")
	without, err := runBench(ctx, off, progressOut)
	if err != nil || without.Interrupted {
		return without, err
	}
	fmt.Fprintf(progressOut, "tierbench: run 2 of 2, with -refresh-after %v\n", cfg.refreshAfter)
	with, err := runBench(ctx, cfg, progressOut)
	if err != nil {
		return nil, err
	}
	with.HotWithout = &without.Hot
	return with, nil
}

// waitFor waits until duration has passed or ctx is done (reporting
// whether it was ctx), calling tick once a second.
func waitFor(ctx context.Context, duration time.Duration, tick func(elapsed time.Duration)) bool {
	start := time.Now()
	end := time.NewTimer(duration)
	defer end.Stop()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return true
		case <-end.C:
			return false
		case <-t.C:
			tick(time.Since(start))
		}
	}
}

func describe(cfg config) string {
	dist := "uniform"
	if cfg.zipf > 1 {
		dist = fmt.Sprintf("zipf s=%g", cfg.zipf)
	}
	rate := "unpaced"
	if cfg.rate > 0 {
		rate = commas(uint64(cfg.rate)) + " ops/s"
	}
	batch := ""
	if cfg.batch > 1 {
		batch = fmt.Sprintf(" (%d keys a read)", cfg.batch)
	}
	refresh := ""
	if cfg.refreshAfter > 0 {
		refresh = fmt.Sprintf(", refresh after %v", cfg.refreshAfter)
	}
	return fmt.Sprintf("%d instances, %d goroutines at %s, %d keys (%s), reads:writes %d:%d%s, db latency %v, TTL L1 %v / Redis %v%s, %v",
		cfg.instances, cfg.goroutines, rate, cfg.keys, dist, cfg.reads, cfg.writes, batch, cfg.dbLatency, cfg.localTTL, cfg.remoteTTL, refresh, cfg.duration)
}
