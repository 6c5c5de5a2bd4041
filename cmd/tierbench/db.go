package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tieredcache/tiered"
)

// db is the simulated database behind the caches: a version per key, which
// every write increments. It also remembers when each recent write
// returned, to judge whether a read was stale.
type db struct {
	latency time.Duration
	since   func() time.Duration // time since the run started (monotonic)
	keep    time.Duration        // how long writes are remembered: the stale bound + slack
	payload string
	rows    []row
	loads   atomic.Uint64
}

type row struct {
	mu      sync.Mutex // one writer per key at a time, so Redis gets versions in order
	version atomic.Uint64
	writes  atomic.Pointer[[]write] // completed writes, oldest first; replaced, never modified
}

// write is a completed Set: version was stored and Set returned at done.
type write struct {
	version uint64
	done    time.Duration
}

func newDB(keys int, latency, keep time.Duration, since func() time.Duration) *db {
	d := &db{
		latency: latency,
		since:   since,
		keep:    keep,
		payload: strings.Repeat("x", 160), // with the other fields, ~200 bytes of JSON
		rows:    make([]row, keys),
	}
	for i := range d.rows {
		d.rows[i].version.Store(1)
	}
	return d
}

func keyName(i int) string { return fmt.Sprintf("k%07d", i) }

func keyIndex(key string) (int, error) {
	if !strings.HasPrefix(key, "k") {
		return 0, fmt.Errorf("not a workload key: %q", key)
	}
	return strconv.Atoi(key[1:])
}

// load is the caches' loader: a query that sees the row as it is when the
// query starts and answers after the database latency.
// loadMany is a query of many rows at once: one loader call, one database
// latency. Keys that are not rows are left out (not found).
func (d *db) loadMany(ctx context.Context, keys []string) (map[string]*item, error) {
	d.loads.Add(1)
	m := make(map[string]*item, len(keys))
	for _, key := range keys {
		if it, ok := d.row(key); ok {
			m[key] = it
		}
	}
	return m, d.query(ctx)
}

func (d *db) load(ctx context.Context, key string) (*item, error) {
	it, ok := d.row(key)
	if !ok {
		return nil, tiered.ErrNotFound
	}
	d.loads.Add(1)
	return it, d.query(ctx)
}

// row returns the row of key as it is now, when the query reads it.
func (d *db) row(key string) (*item, bool) {
	i, err := keyIndex(key)
	if err != nil || i >= len(d.rows) {
		return nil, false
	}
	return &item{Key: key, Version: d.rows[i].version.Load(), Payload: d.payload}, true
}

// query waits for the database's latency, or until ctx ends.
func (d *db) query(ctx context.Context) error {
	if d.latency <= 0 {
		return nil
	}
	t := time.NewTimer(d.latency)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// update writes a new version of key i through c, as an application does:
// database first, then the cache. Writers of one key take turns, so that
// versions reach Redis in order.
func (d *db) update(ctx context.Context, c *tiered.Cache[*item], keys []string, i int) error {
	r := &d.rows[i]
	r.mu.Lock()
	defer r.mu.Unlock()
	v := r.version.Add(1)
	err := c.Set(ctx, keys[i], &item{Key: keys[i], Version: v, Payload: d.payload})
	if err != nil {
		return err
	}
	now := d.since()
	old := r.writes.Load()
	var ws []write
	if old != nil {
		// Keep the writes younger than keep, and the newest older one.
		start := 0
		for start < len(*old)-1 && (*old)[start+1].done < now-d.keep {
			start++
		}
		ws = append(ws, (*old)[start:]...)
	}
	ws = append(ws, write{version: v, done: now})
	r.writes.Store(&ws)
	return nil
}

// stale reports whether a read of key i that started at start and got
// version got missed a write that returned before it started (stale), and
// one that returned more than bound before it started (beyond).
func (d *db) stale(i int, got uint64, start, bound time.Duration) (stale, beyond bool) {
	ws := d.rows[i].writes.Load()
	if ws == nil {
		return false, false
	}
	// Versions grow with time, so the newest write before a moment is the
	// highest version written before it.
	for j := len(*ws) - 1; j >= 0; j-- {
		w := (*ws)[j]
		if w.done < start && w.version > got {
			stale = true
		}
		if w.done < start-bound {
			return stale, w.version > got
		}
	}
	return stale, false
}
