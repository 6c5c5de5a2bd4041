package tiered

import "sync"

// policy chooses what L1 keeps within its budget: S3-FIFO (Yang et al.,
// SOSP 2023) with a frequency-based admission to its main queue, in the
// manner of TinyLFU (Einziger et al.). ristretto stores the entries but its
// own policy never evicts or rejects one (its MaxCost is out of reach, see
// newLocal): its sampled LFU, when every entry has been read as often as
// any other (a scan, a key set that outgrew L1), evicts entries at random,
// not the oldest, and its TinyLFU admission keeps the keys that were read
// before over those read last. Under issue 12's churn pattern that kept
// 6,700 of the 10,000 entries L1 had room for; this policy keeps them all,
// and under Zipf it is within half a point of the optimum (see
// BenchmarkL1Churn, BenchmarkL1Zipf).
//
// New entries go to a small FIFO queue (a hundredth of the budget), the
// others to the main FIFO queue. An entry leaving the small queue is a
// candidate for the main one if it was hit while in it, else it is evicted
// and its hash is kept in the ghost, so that the key's next fill is a
// candidate directly. An entry leaving the main queue is put back at its
// tail if it was hit since it last got there (at most three times in a
// row, freqMax), else it is evicted. An entry that can never be served
// again (its generation or epoch moved, or it expired and its grace too)
// is evicted whatever its hits.
//
// A candidate enters the main queue while the queue is within its share;
// past it, only if its key was filled at least as often lately (frequency,
// which counts fills, not hits) as the key of the entry the main queue
// would evict next, which it then evicts; else the candidate is evicted
// (or, a ghost's, goes to the small queue). The FIFO queues alone keep
// what was read last, which is what churn needs, but under Zipf they
// cannot tell a key of the popular set's tail, read once per hundreds of
// thousands of reads, from the many keys less popular still: the
// admission remembers that across evictions. Ties admit, so a key set
// read in turn (churn) still replaces the older one.
//
// A hit costs an atomic load of the entry's freq, already in the CPU cache
// for the ticket check, and an add only while freq < freqMax.
//
// The policy counts an entry while the Sets that stored it in ristretto
// outnumber ristretto's reports of it gone (OnExit: replaced, deleted or
// rejected; one per Set that returned true), unless it evicted it. The
// count, entry.sets, is needed because the report can come first: a Del of
// the key (an invalidation, or another fill's eviction) or a rejection of
// the buffered Set can land between the Set and admit. Counting the entry
// then would count a value ristretto let go of until it came up for
// eviction: budget lost and memory kept for nothing (8,000 Sets racing
// Dels of four keys left 138 entries counted, 4 held; see
// TestThePolicyCountsASetThatRacesADel).
// Whatever an eviction's Del removes is reported by OnExit, so a Del that
// races a newer Set of the same key costs that value (a miss), never the
// accounting.
type policy[V any] struct {
	max      int64 // the budget, in entry costs
	smallMax int64 // the small queue's share

	// unservable reports whether an entry can never be served again (not
	// even as stale), so that its memory is freed first.
	unservable func(h uint64, e *entry[V]) bool

	mu          sync.Mutex
	small, main fifo[V]
	ghost       ghost
	freq        *frequency
}

// freqMax caps an entry's freq (hits counted by the policy).
const freqMax = 3

// Where an entry is, in entry.where (read and written under policy.mu).
const (
	inNone uint8 = iota
	inSmall
	inMain
)

func newPolicy[V any](maxBytes int64, unservable func(uint64, *entry[V]) bool) *policy[V] {
	p := &policy[V]{max: maxBytes, smallMax: maxBytes / 100, unservable: unservable, freq: newFrequency()}
	p.small.id, p.main.id = inSmall, inMain
	p.ghost.of = map[uint64]uint64{}
	return p
}

// hit counts a hit of e.
func hit[V any](e *entry[V]) {
	if e.freq.Load() < freqMax {
		e.freq.Add(1)
	}
}

// admit counts e, the entry of the key with hash h that a Set just stored
// (it returned true), unless ristretto reported it gone since, and appends to victims (returned) the hashes of what must go to keep L1
// within its budget, for the caller to Del from the store (outside the
// policy's lock: Del reports to exit). An entry counted already is not
// counted again.
func (p *policy[V]) admit(h uint64, e *entry[V], victims []uint64) []uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	e.sets++
	if e.sets <= 0 || e.where != inNone {
		return victims // reported gone already, or counted already
	}
	e.freq.Store(0)
	p.freq.add(h, p.small.live+p.main.live+1)
	promoted := false
	if p.ghost.take(h) {
		promoted, victims = p.promote(h, e, victims)
	}
	if !promoted {
		p.small.push(h, e)
	}
	for p.small.bytes+p.main.bytes > p.max {
		victims = p.evict(victims)
	}
	return victims
}

// promote puts e, the entry of the key with hash h, in the main queue if
// there is room for it in the main queue's share, or if its key was filled
// at least as often lately as the key of the entry the main queue would
// evict next, which it then evicts (appended to victims). It reports
// whether it did.
func (p *policy[V]) promote(h uint64, e *entry[V], victims []uint64) (bool, []uint64) {
	if p.main.live > 0 && p.main.bytes+e.cost > p.max-p.smallMax {
		vh, ve := p.mainVictim()
		if !p.unservable(vh, ve) && p.freq.estimate(h) < p.freq.estimate(vh) {
			return false, victims
		}
		p.main.pop()
		victims = append(victims, vh)
	}
	e.freq.Store(0)
	p.main.push(h, e)
	return true, victims
}

// mainVictim returns the entry at the main queue's head once those hit
// since they last got there are put back at its tail (at most freqMax
// times in a row): the one the main queue evicts next. The queue must not
// be empty.
func (p *policy[V]) mainVictim() (uint64, *entry[V]) {
	for {
		h, e := p.main.peek()
		if e.freq.Load() == 0 || p.unservable(h, e) {
			return h, e
		}
		e.freq.Add(-1)
		p.main.pop()
		p.main.push(h, e)
	}
}

// exit uncounts e, which ristretto reports gone, unless a later Set stored
// it again (e may be nil: Del reports the zero value when the key was not
// stored).
func (p *policy[V]) exit(e *entry[V]) {
	if e == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if e.sets--; e.sets > 0 {
		return // stored again since
	}
	switch e.where {
	case inSmall:
		p.small.remove(e)
	case inMain:
		p.main.remove(e)
	}
}

// evict evicts one entry, or moves one from the small queue to the main one
// or back to the main queue's tail.
func (p *policy[V]) evict(victims []uint64) []uint64 {
	if p.small.live > 0 && (p.small.bytes >= p.smallMax || p.main.live == 0) {
		h, e := p.small.pop()
		if e.freq.Load() > 0 && !p.unservable(h, e) {
			var promoted bool
			if promoted, victims = p.promote(h, e, victims); promoted {
				return victims
			}
		}
		p.ghost.add(h, p.small.live+p.main.live)
		return append(victims, h)
	}
	h, _ := p.mainVictim()
	p.main.pop()
	return append(victims, h)
}

// fifo is a queue of entries. An entry leaves it by pop, or by remove,
// which clears the entry's slot (entry.slot) so that the queue keeps no
// value alive that ristretto let go of; cleared slots are skipped by pop,
// and compacted away once they are half the queue.
type fifo[V any] struct {
	id    uint8
	slots []fifoSlot[V]
	head  int
	live  int   // entries in the queue
	bytes int64 // their cost
}

type fifoSlot[V any] struct {
	h uint64
	e *entry[V] // nil once the entry left
}

func (q *fifo[V]) push(h uint64, e *entry[V]) {
	e.where, e.slot = q.id, len(q.slots)
	q.live++
	q.bytes += e.cost
	q.slots = append(q.slots, fifoSlot[V]{h, e})
}

// peek returns the entry at the queue's head. The queue must not be
// empty.
func (q *fifo[V]) peek() (uint64, *entry[V]) {
	for q.slots[q.head].e == nil {
		q.head++
	}
	s := q.slots[q.head]
	return s.h, s.e
}

// pop takes the entry at the queue's head out. The queue must not be
// empty.
func (q *fifo[V]) pop() (uint64, *entry[V]) {
	h, e := q.peek()
	q.head++
	q.remove(e)
	return h, e
}

func (q *fifo[V]) remove(e *entry[V]) {
	q.slots[e.slot] = fifoSlot[V]{}
	e.where = inNone
	q.live--
	q.bytes -= e.cost
	q.compact()
}

// compact drops the cleared slots once they are more than half the queue,
// and the popped ones once they are half the slice: memory stays within
// two slots per entry.
func (q *fifo[V]) compact() {
	n := len(q.slots) - q.head
	if n > 2*q.live+64 || q.head > 64 && q.head > n {
		kept := q.slots[:0]
		for _, s := range q.slots[q.head:] {
			if s.e != nil {
				s.e.slot = len(kept)
				kept = append(kept, s)
			}
		}
		clear(q.slots[len(kept):])
		q.slots, q.head = kept, 0
	}
}

// ghost holds the hashes of the entries evicted from the small queue most
// recently, as many as L1 holds entries: a key that comes back while its
// hash is here was evicted too soon, and goes to the main queue. A hash
// that comes back leaves the ghost, and no longer counts: were the limit
// on the ring's length, a batch of fills handed over in another order than
// the keys were evicted in would push out, before their own turn, about
// half the hashes it brings back.
type ghost struct {
	ring []uint64          // the hashes in the order they came, and slots of ones taken
	head int               // ring[:head] are gone
	seq  uint64            // sequence number of ring[head]
	of   map[uint64]uint64 // hash -> the sequence number of its slot
}

// add adds h, forgetting the oldest hashes beyond limit.
func (g *ghost) add(h uint64, limit int) {
	g.of[h] = g.seq + uint64(len(g.ring)-g.head)
	g.ring = append(g.ring, h)
	for len(g.of) > max(limit, 1) {
		if old := g.ring[g.head]; g.of[old] == g.seq {
			delete(g.of, old)
		}
		g.head++
		g.seq++
	}
	if n := len(g.ring) - g.head; g.head > 64 && g.head > n || n > 2*len(g.of)+64 {
		kept := g.ring[:0]
		for i, h := range g.ring[g.head:] {
			if g.of[h] == g.seq+uint64(i) {
				kept = append(kept, h)
			}
		}
		for i, h := range kept {
			g.of[h] = g.seq + uint64(i)
		}
		g.ring, g.head = kept, 0
	}
}

// take reports whether h is in the ghost, and removes it.
func (g *ghost) take(h uint64) bool {
	if _, ok := g.of[h]; !ok {
		return false
	}
	delete(g.of, h)
	return true
}
