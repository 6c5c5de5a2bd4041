package main

import (
	"fmt"
	"io"
	"time"
)

// progress prints a line a second while the workload runs: the rates of
// the last second, and the invalidation and staleness figures so far.
type progress struct {
	out     io.Writer
	workers []*worker
	prober  *prober
	batch   bool // reads are batches: their keys' tiers are not known per read
	last    [kinds]uint64
	lastAt  time.Duration
}

func (p *progress) tick(elapsed time.Duration) {
	var now [kinds]uint64
	var beyond uint64
	for _, w := range p.workers {
		for k := range now {
			now[k] += w.counts[k].Load()
		}
		beyond += w.beyond.Load()
	}
	var d [kinds]uint64
	var reads, ops uint64
	for k := range now {
		d[k] = now[k] - p.last[k]
		ops += d[k]
		if kind(k) != writeOp {
			reads += d[k]
		}
	}
	secs := (elapsed - p.lastAt).Seconds()
	p.last, p.lastAt = now, elapsed
	pct := func(k kind) float64 { return 100 * float64(d[k]) / float64(max(reads, 1)) }
	inval := p.prober.snapshot()
	tiers := fmt.Sprintf("L1 %5.1f%%  L2 %5.1f%%  loader %5.1f%%", pct(readL1), pct(readL2), pct(readLoader))
	if p.batch {
		tiers = fmt.Sprintf("batch reads %9s/s", commas(uint64(float64(d[readBatch])/secs)))
	}
	fmt.Fprintf(p.out, "[%3.0fs] %11s ops/s  %s  writes %9s/s  invalidation p50 %s (%d)  stale beyond bound %d\n",
		elapsed.Seconds(), commas(uint64(float64(ops)/secs)), tiers,
		commas(uint64(float64(d[writeOp])/secs)), fmtDur(inval.quantile(0.5)), inval.n, beyond)
}
