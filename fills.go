package tiered

import (
	"sync"
	"time"
)

// Fills wait in a fillBuffer until fillBatch of them, or fillBuffer.limit of
// their cost, have gathered, or until fillDelay after the first of them.
const (
	fillBatch = 64
	fillDelay = int64(time.Millisecond)
)

// fillBuffer holds L1 fills (values read from Redis or loaded) on their way
// into ristretto. ristretto's Set queues the item on a channel, which wakes
// ristretto's goroutine; on a 2-vCPU VM that costs the filling caller
// microseconds, about a tenth of a Redis round trip. Handing fills over in
// batches pays it once a batch, mostly on the clock's goroutine (see
// local.handDue), else on whichever call finds the batch due.
//
// A fill is served from here until its batch is handed over, and then
// while ristretto applies it, until the next batch or for fillDelay: a read
// that ristretto cannot answer looks here before it counts as a miss.
// (Longer would keep fills that ristretto rejected alive beyond L1's
// budget; a fill ristretto is slower to apply is a miss, never stale.) So
// a fill is visible at once, as if it had gone to ristretto directly, and
// entries here are checked like ristretto's (by their ticket), so what the
// buffer holds needs no invalidating beyond what ristretto's entries get.
type fillBuffer[V any] struct {
	limit int64 // the pending fills are due once they cost this much

	mu      sync.Mutex
	cur     map[uint64]*entry[V] // by key hash; not yet handed over
	prev    map[uint64]*entry[V] // the batch handed over last
	handed  int64                // clock time prev was handed over
	started int64                // clock time of cur's first fill
	bytes   int64                // cost of cur's fills
}

// get returns the pending fill of the key with hash h, and the batch to
// hand to ristretto if one is due.
func (b *fillBuffer[V]) get(h uint64, now int64) (*entry[V], bool, map[uint64]*entry[V]) {
	b.mu.Lock()
	defer b.mu.Unlock()
	e, ok := b.find(h)
	return e, ok, b.due(now)
}

// lookup returns the pending fill of the key with hash h.
func (b *fillBuffer[V]) lookup(h uint64) (*entry[V], bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.find(h)
}

func (b *fillBuffer[V]) find(h uint64) (*entry[V], bool) {
	e, ok := b.cur[h]
	if !ok {
		e, ok = b.prev[h]
	}
	return e, ok
}

// add adds a fill, replacing any pending fill of the same key, and returns
// the batch to hand to ristretto if one is due.
func (b *fillBuffer[V]) add(h uint64, e *entry[V], now int64) map[uint64]*entry[V] {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.cur) == 0 {
		if b.cur == nil {
			b.cur = make(map[uint64]*entry[V], fillBatch)
		}
		b.started = now
	}
	if old, ok := b.cur[h]; ok {
		b.bytes -= old.cost
	}
	b.bytes += e.cost
	b.cur[h] = e
	return b.due(now)
}

// take returns the batch to hand to ristretto if one is due, and lets go
// of the batch handed over last once it is fillDelay old.
func (b *fillBuffer[V]) take(now int64) map[uint64]*entry[V] {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.prev != nil && now-b.handed >= fillDelay {
		b.prev = nil
	}
	return b.due(now)
}

// due returns the pending fills if they are due, making them the batch
// last handed over.
func (b *fillBuffer[V]) due(now int64) map[uint64]*entry[V] {
	if len(b.cur) == 0 || len(b.cur) < fillBatch && b.bytes < b.limit && now-b.started < fillDelay {
		return nil
	}
	batch := b.cur
	b.prev, b.cur, b.bytes, b.handed = batch, make(map[uint64]*entry[V], fillBatch), 0, now
	return batch
}

// drop forgets any fill of the key with hash h that was not handed over
// yet. (The batch handed over last is being read by the hand-over, and is
// not changed; its entry of the key is no longer servable anyway when drop
// is called.)
func (b *fillBuffer[V]) drop(h uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if e, ok := b.cur[h]; ok {
		b.bytes -= e.cost
		delete(b.cur, h)
	}
}
