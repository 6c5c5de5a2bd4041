package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// backend is the Redis the instances share.
type backend struct {
	addr string
	name string // for the report
	mini *miniredis.Miniredis
}

// startBackend connects to the Redis at addr, or starts an embedded
// miniredis if addr is empty.
func startBackend(ctx context.Context, addr string) (*backend, error) {
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

func (b *backend) client() *redis.Client {
	return redis.NewClient(&redis.Options{Addr: b.addr})
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
	rdb := b.client()
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	iter := rdb.Scan(ctx, 0, ns+":*", 1000).Iterator()
	var batch []string
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		err := rdb.Unlink(ctx, batch...).Err()
		batch = batch[:0]
		return err
	}
	for iter.Next(ctx) {
		if batch = append(batch, iter.Val()); len(batch) == 1000 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := iter.Err(); err != nil {
		return err
	}
	return flush()
}
