package tiered

import "math/bits"

// frequency estimates how often each key was filled into L1 lately (a
// fill is an L1 miss that loaded, or a write), for the policy's admission
// to its main queue. It is a count-min sketch: each key has four counters,
// its estimate is the least of them, and a fill raises only those of them
// at that least (conservative update), so that keys sharing a counter
// inflate each other's estimates less. Counters saturate at freqCounterMax
// and are all halved each time the fills counted reach period, so that the
// estimate follows popularity that shifts.
//
// It has freqCountersPerEntry counters per entry L1 holds, rounded up to a
// power of two: it starts at freqMinCounters and grows as L1 does, at
// which it starts over (the counters of fewer keys, split, would overstate
// the keys that come with the new ones: under BenchmarkL1Churn's pattern,
// counters carried over kept 8,463 entries of 10,000, starting over kept
// them all). It counts fills only, never hits, so a hit costs nothing
// more. Guarded by policy.mu.
type frequency struct {
	counters []uint8
	shift    uint // 64 - log2(len(counters))
	fills    int  // counted since the last halving
	period   int
}

const (
	freqCountersPerEntry = 8
	freqMinCounters      = 1 << 10
	freqCounterMax       = 15
	// freqPeriodPerEntry is the halving period per entry L1 holds: long,
	// since only fills are counted, and a key of the tail of a Zipf
	// popularity (the 10,000th of 100,000) is filled once per hundreds of
	// thousands of reads.
	freqPeriodPerEntry = 100
)

func newFrequency() *frequency {
	f := &frequency{}
	f.resize(freqMinCounters)
	return f
}

func (f *frequency) resize(n int) {
	f.counters = make([]uint8, n)
	f.shift = uint(64 - bits.TrailingZeros(uint(n)))
	f.fills = 0
	f.period = n / freqCountersPerEntry * freqPeriodPerEntry
}

// index returns h's i-th counter (double hashing).
func (f *frequency) index(h uint64, i uint64) uint64 {
	h *= 0x9e3779b97f4a7c15
	return (h + i*(bits.RotateLeft64(h, 32)|1)) >> f.shift
}

// estimate returns how often the key with hash h was filled lately.
func (f *frequency) estimate(h uint64) uint8 {
	least := uint8(freqCounterMax)
	for i := range uint64(4) {
		least = min(least, f.counters[f.index(h, i)])
	}
	return least
}

// add counts a fill of the key with hash h; entries is how many entries
// L1 holds, which the sketch grows to.
func (f *frequency) add(h uint64, entries int) {
	if n := entries * freqCountersPerEntry; n > len(f.counters) {
		f.resize(1 << bits.Len(uint(n-1)))
	}
	least := f.estimate(h)
	if least < freqCounterMax {
		for i := range uint64(4) {
			if c := &f.counters[f.index(h, i)]; *c == least {
				*c++
			}
		}
	}
	if f.fills++; f.fills >= f.period {
		f.fills = 0
		for i := range f.counters {
			f.counters[i] >>= 1
		}
	}
}
