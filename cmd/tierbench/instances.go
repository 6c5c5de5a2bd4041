package main

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tieredcache/tiered"
)

// instances are the caches under test: as in a fleet of processes, each
// has its own Redis client (so its own connections and subscription).
type instances struct {
	caches  []*tiered.Cache[*item]
	clients []redis.UniversalClient
}

// startInstances creates n caches with opts, each on a new client of be.
// On error, the ones created are closed.
func startInstances(be *backend, n int, opts tiered.Options) (*instances, error) {
	in := &instances{}
	for range n {
		rdb := be.client(0)
		in.clients = append(in.clients, rdb)
		opts.Redis = rdb
		c, err := tiered.New[*item](opts)
		if err != nil {
			in.close()
			return nil, err
		}
		in.caches = append(in.caches, c)
	}
	return in, nil
}

// close closes the caches, then their clients (Close leaves the client
// open, and uses it until then).
func (in *instances) close() {
	for _, c := range in.caches {
		_ = c.Close()
	}
	for _, rdb := range in.clients {
		_ = rdb.Close()
	}
}

// waitReady waits until every instance serves reads from its L1, which it
// does once its invalidation subscription is confirmed.
func (in *instances) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for i, c := range in.caches {
		if err := c.WaitReady(ctx); err != nil {
			return fmt.Errorf("instance %d does not serve from L1: its invalidation subscription never became healthy: %w", i, err)
		}
	}
	return nil
}

// stats sums the instances' Stats that the results show.
func (in *instances) stats() (s tiered.Stats) {
	for _, c := range in.caches {
		cs := c.Stats()
		s.Shared += cs.Shared
		s.LocalHits += cs.LocalHits
		s.RemoteHits += cs.RemoteHits
		s.Loads += cs.Loads
		s.RefreshesStarted += cs.RefreshesStarted
	}
	return s
}
