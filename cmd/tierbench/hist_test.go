package main

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func TestBucketsAreContiguousAndTight(t *testing.T) {
	prev := -1
	for _, v := range []int64{0, 1, 15, 16, 31, 32, 33, 63, 64, 1000, 1 << 20, 1<<40 + 12345, 1<<62 + 1} {
		b := bucketOf(v)
		if b < prev || b >= histBuckets {
			t.Fatalf("bucketOf(%d) = %d after %d (of %d)", v, b, prev, histBuckets)
		}
		prev = b
		if mid := bucketMid(b); float64(abs(mid-v)) > float64(v)/16+1 {
			t.Errorf("bucketMid(bucketOf(%d)) = %d: more than 1/16 off", v, mid)
		}
	}
	for i := 0; i < histBuckets-1; i++ {
		if bucketOf(bucketMid(i)) != i {
			t.Fatalf("bucketOf(bucketMid(%d)) = %d", i, bucketOf(bucketMid(i)))
		}
	}
}

func abs(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

func TestQuantilesWithinResolution(t *testing.T) {
	var h, other histogram
	var all []time.Duration
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 100000 {
		d := time.Duration(r.ExpFloat64() * float64(50*time.Microsecond))
		all = append(all, d)
		if i%2 == 0 {
			h.record(d)
		} else {
			other.record(d)
		}
	}
	h.merge(&other)
	slices.Sort(all)
	if h.n != uint64(len(all)) || h.max != int64(all[len(all)-1]) {
		t.Fatalf("n %d max %d, want %d %d", h.n, h.max, len(all), all[len(all)-1])
	}
	for _, q := range []float64{0.5, 0.9, 0.99, 0.999} {
		got, want := h.quantile(q), all[int(q*float64(len(all)))]
		if diff := float64(got-want) / float64(want); diff > 0.07 || diff < -0.07 {
			t.Errorf("p%v = %v, want %v ± 7%%", q*100, got, want)
		}
	}
	var empty histogram
	if empty.quantile(0.5) != 0 {
		t.Error("quantile of an empty histogram is not 0")
	}
}
