package main

import (
	"math/bits"
	"time"
)

// histogram counts durations in log-linear buckets: 16 per power of two,
// so a quantile is off by at most 1/16 (~6%). The zero value is ready to
// use. It is not safe for concurrent use: each goroutine keeps its own,
// merged after the run.
type histogram struct {
	counts [histBuckets]uint64
	n      uint64
	max    int64
}

const (
	histSubBits = 4
	histSub     = 1 << histSubBits
	histBuckets = (63 - histSubBits + 1) * histSub // values are int64 >= 0: at most 63 bits
)

func bucketOf(ns int64) int {
	v := uint64(max(ns, 0))
	if v < 2*histSub {
		return int(v)
	}
	shift := bits.Len64(v) - histSubBits - 1
	return shift*histSub + int(v>>shift)
}

// bucketMid returns a value in the middle of bucket i.
func bucketMid(i int) int64 {
	if i < 2*histSub {
		return int64(i)
	}
	shift := i/histSub - 1
	lo := uint64(i%histSub+histSub) << shift
	return int64(lo + (uint64(1)<<shift)/2)
}

func (h *histogram) record(d time.Duration) {
	h.counts[bucketOf(int64(d))]++
	h.n++
	h.max = max(h.max, int64(d))
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// quantile returns the duration below which a fraction q of the samples
// fall (0 if there are none).
func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q * float64(h.n))
	if rank >= h.n {
		rank = h.n - 1
	}
	var seen uint64
	for i, c := range h.counts {
		if seen += c; seen > rank {
			return time.Duration(min(bucketMid(i), h.max))
		}
	}
	return time.Duration(h.max)
}
