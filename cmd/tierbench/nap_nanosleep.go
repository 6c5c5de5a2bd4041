//go:build linux || freebsd || netbsd || openbsd || dragonfly

package main

import (
	"syscall"
	"time"
)

// nap sleeps for about d in a blocking system call. time.Sleep is too
// coarse for the prober: in a process that is otherwise idle a Go timer
// fires at the next millisecond at best. Spinning instead would hold a CPU
// that the goroutines delivering the invalidation need, and a goroutine
// that keeps yielding keeps the Go scheduler from polling the network
// (Redis replies then wait for its periodic poll, milliseconds later).
func nap(d time.Duration) {
	ts := syscall.NsecToTimespec(int64(d))
	_ = syscall.Nanosleep(&ts, nil)
}
