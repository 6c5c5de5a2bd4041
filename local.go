package tiered

import (
	"hash/maphash"
	"sync"
	"sync/atomic"

	"github.com/dgraph-io/ristretto/v2"
)

// genSlots is the size of the generation table. Keys share a slot by hash;
// a collision only turns a would-be hit into a miss after an invalidation of
// the other key.
const genSlots = 4096

// entryOverhead approximates the bytes an L1 entry costs beyond its encoded
// value and key: ristretto's item and map slot plus our entry header.
const entryOverhead = 128

// entry is what L1 stores: the decoded value and what is needed to decide,
// without touching anything else, whether it may still be served.
type entry[V any] struct {
	value    V
	expires  int64  // coarse-clock UnixNano from which the entry is dead
	gen      uint64 // the key's slot generation when its fill began
	epoch    uint64 // the subscription epoch when its fill began
	slot     uint32 // the key's generation slot, so a hit need not hash
	notFound bool   // a remembered ErrNotFound
}

// ticket records the state of the world when a fill began. The fill's
// result may be stored under it, and is served only while nothing it
// recorded has moved: an invalidation of the key's slot bumps the slot's
// generation, and a subscription gap bumps the epoch.
type ticket struct {
	slot  uint32
	gen   uint64
	epoch uint64
}

// healthy reports whether the subscription was healthy when the ticket was
// taken. Odd epochs mean unhealthy (see subscriber).
func (t ticket) healthy() bool { return t.epoch&1 == 0 }

// local is L1: decoded values in ristretto, bounded in bytes.
//
// ristretto buffers the Set of a new key, may drop or reject it, keeps the
// older of two buffered Sets of one key, and can resurrect a key for a moment
// when a Del races a buffered Set. None of that matters here because a value
// is never trusted for being in ristretto: a hit must also show the fill
// ticket it was stored under is still current. Whatever ristretto keeps, a
// stale value fails that check and is a miss.
type local[V any] struct {
	store *ristretto.Cache[string, *entry[V]]
	clock *clock
	epoch *atomic.Uint64 // owned by the subscriber; odd while unhealthy
	seed  maphash.Seed
	gens  [genSlots]atomic.Uint64

	// ristretto panics when Set or Del race Close; writers hold mu for
	// reading and Close takes it for writing. Get is safe after Close.
	mu     sync.RWMutex
	closed bool

	// A Get racing Close can panic too ("send on closed channel": it
	// pushes its access record to the policy, whose channel Close
	// closes), and taking mu on the hit path costs too much. So get stays
	// out once closing is set, and a Get already inside recovers.
	closing atomic.Bool
}

func newLocal[V any](maxBytes int64, clk *clock, epoch *atomic.Uint64) (*local[V], error) {
	// ristretto wants ~10 counters per item it may hold; assume items of
	// ~512 bytes, which errs towards more counters for small values.
	counters := max(maxBytes/512*10, 1000)
	store, err := ristretto.NewCache(&ristretto.Config[string, *entry[V]]{
		NumCounters:        counters,
		MaxCost:            maxBytes,
		BufferItems:        64,
		IgnoreInternalCost: true, // entryOverhead accounts for it
	})
	if err != nil {
		return nil, err
	}
	return &local[V]{store: store, clock: clk, epoch: epoch, seed: maphash.MakeSeed()}, nil
}

func (l *local[V]) slot(key string) uint32 {
	return uint32(maphash.String(l.seed, key) % genSlots)
}

// get returns the key's entry if it may be served: not expired, and filled
// under a ticket that is still current. This is the hot path: one ristretto
// Get and three atomic loads.
func (l *local[V]) get(key string) (e *entry[V], ok bool) {
	if l.closing.Load() {
		return nil, false
	}
	defer func() {
		if p := recover(); p != nil {
			if !l.closing.Load() {
				panic(p)
			}
			e, ok = nil, false
		}
	}()
	e, ok = l.store.Get(key)
	if !ok || e.expires <= l.clock.now() ||
		e.gen != l.gens[e.slot].Load() || e.epoch != l.epoch.Load() {
		return nil, false
	}
	return e, true
}

// begin takes the ticket for a fill (a read of L2 or a load) of key. It must
// be taken before the fill reads anything.
func (l *local[V]) begin(key string) ticket {
	s := l.slot(key)
	// Epoch first: if a gap starts between the two loads, the ticket is
	// already stale, which is the safe direction.
	ep := l.epoch.Load()
	return ticket{slot: s, gen: l.gens[s].Load(), epoch: ep}
}

// beginWrite marks the start of this instance's own write of key and returns
// the generation it moved the slot to. The bump invalidates fills that began
// before the write and may still hold the value it replaces.
func (l *local[V]) beginWrite(key string) (ticket, uint64) {
	t := l.begin(key)
	g := l.gens[t.slot].Add(1)
	return t, g
}

// endWrite marks the end of a write started with beginWrite, after Redis
// answered. It bumps the slot again, which invalidates fills that began
// during the write (they may have read the old value), and returns the
// ticket under which the written value may be stored. ok is false when any
// other write, fill-invalidation or gap touched the slot while this write
// was in flight: then which value Redis kept is unknown here, and the value
// must not be stored.
//
// For two overlapping writes of one key, A and B, whichever ends last bumps
// after the other stored (or decided not to store), so the other's entry is
// invalid; and the last one sees the other's bump inside its own window and
// does not store. The next read fills from Redis, which decides.
func (l *local[V]) endWrite(t ticket, started uint64) (ticket, bool) {
	g := l.gens[t.slot].Add(1)
	t.gen = g
	return t, g == started+1 && t.healthy() && l.epoch.Load() == t.epoch
}

// set stores e (whose ticket fields must be filled) for key. If wait, it
// also waits until ristretto has applied the Set, so the next get sees it
// (unless ristretto's admission policy rejected it, which it does only
// when L1 is full). It reports whether ristretto accepted the Set.
func (l *local[V]) set(key string, e *entry[V], cost int64, wait bool) bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return false
	}
	ok := l.store.Set(key, e, cost)
	if ok && wait {
		l.store.Wait()
		// Of two buffered Sets of one new key ristretto keeps the older
		// (here: a fill, not waited for, that began before this write).
		// Now the key is stored, and a Set of a stored key applies at once.
		if got, found := l.store.Get(key); found && got != e {
			ok = l.store.Set(key, e, cost)
		}
	}
	return ok
}

// invalidate makes every entry of key unservable and frees its memory.
func (l *local[V]) invalidate(key string) {
	l.gens[l.slot(key)].Add(1)
	l.mu.RLock()
	defer l.mu.RUnlock()
	if !l.closed {
		l.store.Del(key)
	}
}

// invalidateAll makes every entry unservable. Memory is reclaimed as the
// entries are evicted or replaced.
func (l *local[V]) invalidateAll() {
	for i := range l.gens {
		l.gens[i].Add(1)
	}
}

func (l *local[V]) close() {
	l.closing.Store(true)
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		l.store.Close()
	}
}
