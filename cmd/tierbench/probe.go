package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tieredcache/tiered"
)

// probeEvery is how often the prober measures an invalidation.
const probeEvery = 10 * time.Millisecond

// probePoll is how often a probe reads the key while it waits for the new
// value: the resolution of the measurement.
const probePoll = 50 * time.Microsecond

// probeTimeout is how long a probe waits for the new value before counting
// the invalidation as lost.
const probeTimeout = 5 * time.Second

// prober measures invalidation latency, the time from the start of a write
// on one instance until another instance, which held the old value in its
// L1, reads the new one: instance A sets a probe key, instance B reads it
// until it is served from B's L1, then a goroutine reads it from B every
// probePoll while A writes a new version, and the time it first sees that
// version is the sample (to within probePoll). Instances take turns as A
// and B.
type prober struct {
	caches []*tiered.Cache[*item]
	since  func() time.Duration

	mu       sync.Mutex
	hist     histogram
	lost     atomic.Uint64 // new value not seen within probeTimeout
	skipped  atomic.Uint64 // B never served the old value from L1, or a write failed
	lastSeen atomic.Int64  // the last sample, for the progress line
}

func (p *prober) run(stop <-chan struct{}) {
	t := time.NewTicker(probeEvery)
	defer t.Stop()
	for n := 0; ; n++ {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		d, err := p.probe(n)
		switch {
		case errors.Is(err, errLost):
			p.lost.Add(1)
		case err != nil:
			p.skipped.Add(1)
		default:
			p.mu.Lock()
			p.hist.record(d)
			p.mu.Unlock()
			p.lastSeen.Store(int64(d))
		}
	}
}

var errLost = fmt.Errorf("invalidation lost: new value not seen within %v", probeTimeout)

func (p *prober) probe(n int) (time.Duration, error) {
	ctx := context.Background()
	a, b := p.caches[n%len(p.caches)], p.caches[(n+1)%len(p.caches)]
	key := fmt.Sprintf("probe-%d", n%8)
	old := uint64(2 * n) // versions of a key only grow, like the workload's
	if err := a.Set(ctx, key, &item{Key: key, Version: old}); err != nil {
		return 0, err
	}
	if !servesFromL1(ctx, b, key, old) {
		return 0, fmt.Errorf("instance never served %s from L1", key)
	}
	spinning := make(chan struct{})
	seen := make(chan time.Duration, 1)
	go func() {
		deadline := p.since() + probeTimeout
		for first := true; ; first = false {
			it, err := b.Get(ctx, key)
			now := p.since()
			if first {
				close(spinning)
			}
			switch {
			case err == nil && it.Version > old:
				seen <- now
				return
			case now > deadline:
				seen <- -1
				return
			}
			nap(probePoll)
		}
	}()
	<-spinning
	start := p.since()
	if err := a.Set(ctx, key, &item{Key: key, Version: old + 1}); err != nil {
		<-seen
		return 0, err
	}
	at := <-seen
	if at < 0 {
		return 0, errLost
	}
	return at - start, nil
}

// servesFromL1 reports whether c comes to answer key with version from
// its L1.
func servesFromL1(ctx context.Context, c *tiered.Cache[*item], key string, version uint64) bool {
	for range 200 {
		it, src, err := c.GetFrom(ctx, key)
		if err == nil && src == tiered.SourceLocal && it.Version == version {
			return true
		}
		time.Sleep(100 * time.Microsecond)
	}
	return false
}

// snapshot returns a copy of the samples so far.
func (p *prober) snapshot() histogram {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hist
}
