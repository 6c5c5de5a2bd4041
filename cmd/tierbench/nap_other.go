//go:build !(linux || freebsd || netbsd || openbsd || dragonfly)

package main

import "time"

// nap sleeps for about d (at a Go timer's resolution here).
func nap(d time.Duration) { time.Sleep(d) }
