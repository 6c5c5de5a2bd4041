package tiered

import (
	"hash/maphash"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/dgraph-io/ristretto/v2"
)

// genSlots returns the size of the generation table for an L1 of maxBytes.
// Keys share a slot by hash, and an invalidation of one key makes every L1
// entry in its slot a miss (once: the next fill takes the new generation).
// So the table grows with L1, one slot per 2 KiB (about four entries of
// ~512 bytes), between 4096 and 65536 slots (32 KiB to 512 KiB).
func genSlots(maxBytes int64) int {
	n := 4096
	for n < 1<<16 && int64(n)*2048 < maxBytes {
		n *= 2
	}
	return n
}

// entryOverhead approximates the bytes an L1 entry costs beyond its encoded
// value and key: ristretto's item and map slot plus our entry header.
const entryOverhead = 128

// entry is what L1 stores: the decoded value and what is needed to decide,
// without touching anything else, whether it may still be served.
type entry[V any] struct {
	value    V
	check    uint64 // the key's second hash (see local)
	expires  int64  // coarse-clock UnixNano from which the entry is dead
	gen      uint64 // the key's slot generation when its fill began
	epoch    uint64 // the subscription epoch when its fill began
	notFound bool   // a remembered ErrNotFound
}

// ticket records the state of the world when a fill of a key began. The
// fill's result may be stored under it, and is served only while nothing
// it recorded has moved: an invalidation of the key's slot bumps the slot's
// generation, and a subscription gap bumps the epoch.
type ticket struct {
	hash  uint64 // the key's two hashes (see local)
	check uint64
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
//
// ristretto is keyed by the key's 64-bit maphash, computed once per call;
// it also picks the generation slot and the own-write slot. A second
// maphash, with another seed, is kept in the entry and compared on a hit.
// That is what ristretto does by default (with xxhash and memhash, both
// slower for short keys): a key is identified by 128 bits of hash, and two
// keys share them with probability 2^-128. Comparing the keys themselves
// would cost a cache miss on the stored key's bytes.
type local[V any] struct {
	store *ristretto.Cache[uint64, *entry[V]]
	clock *clock
	epoch *atomic.Uint64 // owned by the subscriber; odd while unhealthy
	seed  [2]maphash.Seed
	gens  []atomic.Uint64 // a power of two long
	reads readCounters
	fills fillBuffer[V]
	own   []ownWrites // this instance's writes, by generation slot

	// ristretto panics when Set or Del race Close; writers hold mu for
	// reading and Close takes it for writing.
	mu     sync.RWMutex
	closed bool

	// A Get racing Close can panic too ("send on closed channel": it
	// pushes its access record to the policy, whose channel Close
	// closes), and taking mu on the hit path costs too much. So get counts
	// itself in and out in reads, stays out once closing is set, and close
	// waits for the gets that were already in.
	closing atomic.Bool
}

func newLocal[V any](maxBytes int64, clk *clock, epoch *atomic.Uint64) (*local[V], error) {
	// ristretto wants ~10 counters per item it may hold; assume items of
	// ~512 bytes, which errs towards more counters for small values.
	counters := max(maxBytes/512*10, 1000)
	store, err := ristretto.NewCache(&ristretto.Config[uint64, *entry[V]]{
		NumCounters:        counters,
		MaxCost:            maxBytes,
		BufferItems:        64,
		IgnoreInternalCost: true, // entryOverhead accounts for it
		KeyToHash:          func(h uint64) (uint64, uint64) { return h, 0 },
	})
	if err != nil {
		return nil, err
	}
	slots := genSlots(maxBytes)
	l := &local[V]{store: store, clock: clk, epoch: epoch,
		gens: make([]atomic.Uint64, slots), own: make([]ownWrites, slots)}
	l.seed = [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()}
	// Fills waiting for ristretto are not in its cost: keep them, and the
	// batch handed over last, to an eighth of it.
	l.fills.limit = maxBytes / 16
	handDue := l.handDue
	clk.onTick.Store(&handDue)
	return l, nil
}

func (l *local[V]) hash(key string) uint64 { return maphash.String(l.seed[0], key) }

func (l *local[V]) check(key string) uint64 { return maphash.String(l.seed[1], key) }

func (l *local[V]) gen(h uint64) *atomic.Uint64 { return &l.gens[h&uint64(len(l.gens)-1)] }

// get returns the key's entry if it may be served: not expired, and filled
// under a ticket that is still current. This is the hot path: two hashes,
// one ristretto Get, four atomic loads, and two atomic adds on the calling
// goroutine's read-counter stripe.
// Only if ristretto has no servable entry does get look among the fills
// not yet handed to it.
//
// The generation, epoch and time are loaded before the ristretto Get, so
// that their cache misses overlap its work; the read takes effect at those
// loads. An entry stored after them carries a newer generation (or epoch)
// and is a miss; one stored before was servable when they were loaded.
func (l *local[V]) get(key string) (*entry[V], bool) {
	if l.closing.Load() {
		// Uncounted, so that close's wait for the counted reads to end
		// is not prolonged by reads that begin after it started.
		return nil, false
	}
	h := l.hash(key)
	r := l.reads.stripe()
	r.entered.Add(1)
	if !l.closing.Load() {
		gen, epoch, now := l.gen(h).Load(), l.epoch.Load(), l.clock.now()
		e, ok := l.store.Get(h)
		if ok && e.gen == gen && e.epoch == epoch && e.expires > now && e.check == l.check(key) {
			r.hits.Add(1)
			return e, true
		}
		e, ok, batch := l.fills.get(h, now)
		if batch != nil {
			l.hand(batch)
		}
		if ok && e.gen == gen && e.epoch == epoch && e.expires > now && e.check == l.check(key) {
			r.hits.Add(1)
			return e, true
		}
	}
	r.misses.Add(1)
	return nil, false
}

// begin takes the ticket for a fill (a read of L2 or a load) of key. It must
// be taken before the fill reads anything.
func (l *local[V]) begin(key string) ticket {
	h := l.hash(key)
	// Epoch first: if a gap starts between the two loads, the ticket is
	// already stale, which is the safe direction.
	ep := l.epoch.Load()
	return ticket{hash: h, check: l.check(key), gen: l.gen(h).Load(), epoch: ep}
}

// beginWrite marks the start of this instance's own write of key and returns
// the generation it moved the slot to. The bump invalidates fills that began
// before the write and may still hold the value it replaces.
func (l *local[V]) beginWrite(key string) (ticket, uint64) {
	t := l.begin(key)
	g := l.gen(t.hash).Add(1)
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
	g := l.gen(t.hash).Add(1)
	t.gen = g
	return t, g == started+1 && t.healthy() && l.epoch.Load() == t.epoch
}

// set stores e, filled under ticket t, for its key. If wait (an own write,
// or a value loaded while Redis failed), it hands e to ristretto and waits
// until ristretto has applied it, so that it outlives the fill buffer
// (unless ristretto's admission policy rejected it, which it does only
// when L1 is full). Otherwise e goes to the fill buffer, where the next get
// already finds it.
func (l *local[V]) set(t ticket, e *entry[V], cost int64, wait bool) {
	e.check, e.gen, e.epoch = t.check, t.gen, t.epoch
	if !wait {
		if batch := l.fills.add(t.hash, pendingFill[V]{e, cost}, l.clock.now()); batch != nil {
			l.hand(batch)
		}
		return
	}
	l.fills.drop(t.hash)
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed || !l.store.Set(t.hash, e, cost) {
		return
	}
	l.store.Wait()
	// Of two buffered Sets of one new key ristretto keeps the older (here:
	// a batch of fills, handed over but not waited for, with a fill that
	// began before this write). Now the key is stored, and a Set of a
	// stored key applies at once.
	if got, found := l.store.Get(t.hash); found && got != e {
		l.store.Set(t.hash, e, cost)
	}
}

// handDue hands the pending fills to ristretto if they are due. The clock
// calls it after every tick, so that a batch is mostly handed over (and
// ristretto's goroutine woken) by a goroutine that is awake anyway, rather
// than by a caller waiting for its value.
func (l *local[V]) handDue() {
	if batch := l.fills.take(l.clock.now()); batch != nil {
		l.hand(batch)
	}
}

// hand gives a batch of fills to ristretto. Fills that are no longer
// servable are left out.
func (l *local[V]) hand(batch map[uint64]pendingFill[V]) {
	epoch := l.epoch.Load()
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return
	}
	for h, f := range batch {
		if f.e.gen == l.gen(h).Load() && f.e.epoch == epoch {
			l.store.Set(h, f.e, f.cost)
		}
	}
}

// invalidate makes every entry of key unservable and frees its memory.
func (l *local[V]) invalidate(key string) {
	h := l.hash(key)
	l.gen(h).Add(1)
	l.fills.drop(h)
	l.mu.RLock()
	defer l.mu.RUnlock()
	if !l.closed {
		l.store.Del(h)
	}
}

// replace makes every entry of key unservable, like invalidate, and
// returns the ticket under which the value replacing them may be stored.
// The old entry's memory is left to the replacement.
func (l *local[V]) replace(key string) ticket {
	h := l.hash(key)
	l.gen(h).Add(1)
	l.fills.drop(h)
	return l.begin(key)
}

// holds reports whether L1 has an entry for key, servable or not.
func (l *local[V]) holds(key string) bool {
	h, check := l.hash(key), l.check(key)
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return false
	}
	if e, ok := l.store.Get(h); ok && e.check == check {
		return true
	}
	e, ok := l.fills.lookup(h)
	return ok && e.check == check
}

// ownWrites tracks this instance's writes (Set, Delete) of the keys of
// one generation slot.
type ownWrites struct {
	pending   atomic.Int64  // writes whose messages have not come back yet
	inflight  atomic.Int64  // writes still waiting for Redis
	last      atomic.Int64  // clock time the last write ended
	gen       atomic.Uint64 // the slot's generation when the last write ended
	uncertain atomic.Int64  // clock time until which a failed write's message may still come
}

func (l *local[V]) ownOf(h uint64) *ownWrites { return &l.own[h&uint64(len(l.own)-1)] }

// writing records that this instance is about to write key.
func (l *local[V]) writing(key string) {
	w := l.ownOf(l.hash(key))
	w.pending.Add(1)
	w.inflight.Add(1)
}

// wrote records that a write of key, begun with writing, has ended, and
// that L1 now holds what it wrote (or nothing). If the write failed, Redis
// may still run it later (a command that timed out here can be on the
// wire), within unsure, and its message may then take as long again to
// come; until then, an own message must be applied.
func (l *local[V]) wrote(key string, unsure time.Duration) {
	h := l.hash(key)
	w := l.ownOf(h)
	now := l.clock.now()
	if unsure > 0 {
		w.uncertain.Store(now + 2*int64(unsure))
	}
	w.gen.Store(l.gen(h).Load())
	w.last.Store(now)
	w.inflight.Add(-1)
}

// movedSince reports whether this instance's message about key must be
// applied rather than skipped: anything touched key's generation since
// this instance's last write of it (or of a key sharing its slot) ended, or
// a write that failed may have run in Redis since. While a write is in
// flight, what touches the key meanwhile is covered by the write's end,
// which makes it unservable.
func (l *local[V]) movedSince(key string) bool {
	h := l.hash(key)
	w := l.ownOf(h)
	return l.clock.now() < w.uncertain.Load() ||
		w.inflight.Load() == 0 && l.gen(h).Load() != w.gen.Load()
}

// echoed records that the message of one of this instance's writes of key
// came back. A write whose script Redis ran twice (go-redis retries after a
// lost reply) comes back twice; pending stays at zero rather than going
// below and leaving the next write unprotected.
func (l *local[V]) echoed(key string) {
	p := &l.ownOf(l.hash(key)).pending
	for n := p.Load(); n > 0 && !p.CompareAndSwap(n, n-1); n = p.Load() {
	}
}

// unechoed reports whether a message of this instance's write of key (or
// of a key sharing its slot) may still be on its way. A message that never
// comes (its write failed before reaching Redis) stops counting d after
// the write ended. (While a write is in flight, its endWrite makes what
// was stored meanwhile unservable.)
func (l *local[V]) unechoed(key string, d time.Duration) bool {
	w := l.ownOf(l.hash(key))
	return w.pending.Load() > 0 && l.clock.now()-w.last.Load() < int64(d)
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
	// A get that did not see closing may be inside ristretto's Get, which
	// must not race Close; wait until it is out. It is out within
	// nanoseconds unless it was descheduled; then it needs a CPU, and
	// spinning would only take one from it.
	for spins := 0; !l.reads.quiet(); spins++ {
		if spins < 100 {
			runtime.Gosched()
		} else {
			time.Sleep(100 * time.Microsecond)
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		l.store.Close()
	}
}

// readStripes is the number of stripes of readCounters: 1<<6, see stripe.
const readStripes = 64

// readCounters count L1 reads: how many began and how each ended. They are
// Stats.LocalHits, and tell close when no read is inside ristretto. A read
// counts itself in and out on one stripe, and a stripe fills two cache
// lines so that the counters of two stripes never share one, wherever the
// array starts.
type readCounters [readStripes]readStripe

type readStripe struct {
	entered atomic.Uint64
	hits    atomic.Uint64
	misses  atomic.Uint64
	_       [128 - 3*8]byte
}

// stripe returns the calling goroutine's stripe, picked by the address of
// a local variable, that is by where the goroutine's stack is. A goroutine
// thus keeps writing one stripe, whose cache line stays in the cache of the
// core it runs on. Picked by key, every stripe would be written from every
// core and its line would move between cores on about every other hit:
// a parallel hit on 2 cores cost 90 ns that way, against 34 ns with no
// counting at all. (The address is only a number here. A stack that moves
// moves its goroutine to another stripe, which is harmless: the stripes are
// only ever summed.)
func (r *readCounters) stripe() *readStripe {
	var onStack byte
	// Stacks are power-of-two sized and aligned: a plain modulo would put
	// goroutines whose stacks are 64 KiB apart on one stripe. Fibonacci
	// hashing of the address's KiB spreads them.
	kib := uint64(uintptr(unsafe.Pointer(&onStack)) >> 10)
	return &r[kib*0x9E3779B97F4A7C15>>(64-6)]
}

func (r *readCounters) hitCount() uint64 {
	var n uint64
	for i := range r {
		n += r[i].hits.Load()
	}
	return n
}

// quiet reports whether every read that began before the call has ended.
// Ends are summed before beginnings: every end counted has its beginning
// counted too, so the sums are equal only if no read that began before the
// ends were summed is still inside.
func (r *readCounters) quiet() bool {
	var ended, entered uint64
	for i := range r {
		ended += r[i].hits.Load() + r[i].misses.Load()
	}
	for i := range r {
		entered += r[i].entered.Load()
	}
	return ended == entered
}
