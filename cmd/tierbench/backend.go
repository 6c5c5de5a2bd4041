package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// backend is the Redis the instances share: one server, or a Cluster.
type backend struct {
	addr    string
	cluster []string // seed addresses of a Redis Cluster; then addr is ""
	name    string   // for the report
	mini    *miniredis.Miniredis
}

// startBackend connects to the Redis Cluster with the seed addresses
// cluster, or else to the Redis at addr, or starts an embedded miniredis if
// addr is empty too.
func startBackend(ctx context.Context, addr string, cluster []string) (*backend, error) {
	if len(cluster) > 0 {
		return startCluster(ctx, cluster)
	}
	if addr == "" {
		m, err := miniredis.Run()
		if err != nil {
			return nil, fmt.Errorf("starting miniredis: %w", err)
		}
		return &backend{addr: m.Addr(), name: "miniredis (embedded)", mini: m}, nil
	}
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		return nil, fmt.Errorf("redis at %s does not answer: %w", addr, err)
	}
	return &backend{addr: addr, name: "redis at " + addr}, nil
}

func startCluster(ctx context.Context, seeds []string) (*backend, error) {
	be := &backend{cluster: seeds}
	rdb := be.client(0)
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	masters := 0
	var mu sync.Mutex
	err := rdb.(*redis.ClusterClient).ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
		mu.Lock()
		masters++
		mu.Unlock()
		return m.Ping(ctx).Err()
	})
	if err != nil {
		return nil, fmt.Errorf("redis cluster at %s does not answer: %w", strings.Join(seeds, ","), err)
	}
	be.name = fmt.Sprintf("redis cluster of %d masters at %s", masters, strings.Join(seeds, ","))
	return be, nil
}

// client returns a new client of the backend: a *redis.ClusterClient on a
// Cluster, else a *redis.Client. poolSize bounds its connections (per node
// on a Cluster); 0 means go-redis' default.
func (b *backend) client(poolSize int) redis.UniversalClient {
	if len(b.cluster) > 0 {
		return redis.NewClusterClient(&redis.ClusterOptions{Addrs: b.cluster, PoolSize: poolSize})
	}
	return redis.NewClient(&redis.Options{Addr: b.addr, PoolSize: poolSize})
}

// nodes calls fn on a client of every node that holds data: the server, or
// each master of a Cluster.
func (b *backend) nodes(ctx context.Context, fn func(context.Context, *redis.Client) error) error {
	rdb := b.client(0)
	defer rdb.Close()
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		return cc.ForEachMaster(ctx, fn)
	}
	return fn(ctx, rdb.(*redis.Client))
}

// startRun starts cfg's backend for a run on a namespace of its own; cleanup
// removes the namespace's keys when the run is done (and says on
// progressOut if it could not).
func startRun(ctx context.Context, cfg config, progressOut io.Writer) (be *backend, ns string, cleanup func(), err error) {
	be, err = startBackend(ctx, cfg.redis, cfg.cluster)
	if err != nil {
		return nil, "", nil, err
	}
	ns = newNamespace()
	return be, ns, func() {
		if err := be.close(ns); err != nil {
			fmt.Fprintf(progressOut, "tierbench: cleaning up namespace %s: %v\n", ns, err)
		}
	}, nil
}

// newNamespace returns a namespace no other run uses, so that runs against
// a shared Redis never touch anyone else's keys.
func newNamespace() string {
	return fmt.Sprintf("tierbench-%016x", rand.Uint64())
}

// close deletes the run's keys from a real Redis (one key pattern, never
// FLUSHALL) or stops the embedded one.
func (b *backend) close(ns string) error {
	if b.mini != nil {
		b.mini.Close()
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return b.nodes(ctx, func(ctx context.Context, rdb *redis.Client) error { return unlinkAll(ctx, rdb, ns) })
}

// unlinkAll deletes the keys of namespace ns from the node of rdb, one
// UNLINK per key (pipelined): on a Cluster node, one UNLINK of several keys
// must name keys of one slot.
func unlinkAll(ctx context.Context, rdb *redis.Client, ns string) error {
	iter := rdb.Scan(ctx, 0, ns+":*", 1000).Iterator()
	pipe := rdb.Pipeline()
	for iter.Next(ctx) {
		pipe.Unlink(ctx, iter.Val())
		if pipe.Len() == 1000 {
			if _, err := pipe.Exec(ctx); err != nil {
				return err
			}
		}
	}
	if err := iter.Err(); err != nil {
		return err
	}
	_, err := pipe.Exec(ctx)
	return err
}
