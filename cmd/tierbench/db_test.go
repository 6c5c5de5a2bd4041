package main

import (
	"testing"
	"time"
)

func TestStaleJudgesAgainstWritesBeforeTheReadStarted(t *testing.T) {
	d := newDB(1, 0, time.Hour, func() time.Duration { return 0 })
	ws := []write{{version: 2, done: 10 * time.Second}, {version: 3, done: 20 * time.Second}}
	d.rows[0].writes.Store(&ws)
	bound := 5 * time.Second
	for _, tc := range []struct {
		got           uint64
		start         time.Duration
		stale, beyond bool
	}{
		{got: 1, start: 9 * time.Second, stale: false, beyond: false},  // no write had returned
		{got: 1, start: 11 * time.Second, stale: true, beyond: false},  // v2 returned 1s before
		{got: 1, start: 16 * time.Second, stale: true, beyond: true},   // v2 returned 6s before
		{got: 2, start: 21 * time.Second, stale: true, beyond: false},  // v3 returned 1s before
		{got: 2, start: 26 * time.Second, stale: true, beyond: true},   // v3 returned 6s before
		{got: 3, start: 60 * time.Second, stale: false, beyond: false}, // latest
		{got: 4, start: 21 * time.Second, stale: false, beyond: false}, // newer than any returned write
	} {
		stale, beyond := d.stale(0, tc.got, tc.start, bound)
		if stale != tc.stale || beyond != tc.beyond {
			t.Errorf("got v%d at %v: stale %v beyond %v, want %v %v", tc.got, tc.start, stale, beyond, tc.stale, tc.beyond)
		}
	}
}

func TestKeyNames(t *testing.T) {
	for _, i := range []int{0, 7, 9999999} {
		if j, err := keyIndex(keyName(i)); err != nil || j != i {
			t.Errorf("keyIndex(keyName(%d)) = %d, %v", i, j, err)
		}
	}
	if _, err := keyIndex("probe-1"); err == nil {
		t.Error("probe key parsed as a workload key")
	}
}
