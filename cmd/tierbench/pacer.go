package main

import "time"

// maxCatchUp bounds how far behind its schedule a pacer may fall: a worker
// that was held up longer (by a slow operation or a busy machine) skips
// the missed operations instead of running them all at once.
const maxCatchUp = 10 * time.Millisecond

// pacer spaces a worker's operations interval apart on average.
type pacer struct {
	interval time.Duration // 0: no pacing
	next     time.Time     // when the last operation was due
	timer    *time.Timer
}

// wait returns true when the next operation is due, or false once stop is
// closed.
func (p *pacer) wait(stop <-chan struct{}) bool {
	select {
	case <-stop:
		return false
	default:
	}
	if p.interval <= 0 {
		return true
	}
	now := time.Now()
	p.next = p.next.Add(p.interval)
	d := p.next.Sub(now)
	if d <= 0 {
		if -d > maxCatchUp {
			p.next = now
		}
		return true
	}
	if p.timer == nil {
		p.timer = time.NewTimer(d)
	} else {
		p.timer.Reset(d)
	}
	select {
	case <-stop:
		return false
	case <-p.timer.C:
		return true
	}
}
