package tiered

import (
	"log/slog"
	"sync/atomic"
	"time"
)

// burstWindow is how long a burstLog stays quiet after it logged.
const burstWindow = 10 * time.Second

// burstLog logs the first of a burst of like failures and counts the rest,
// so that a Redis outage at 100k requests per second logs one line per
// window instead of 100k.
type burstLog struct {
	log        *slog.Logger
	next       atomic.Int64 // UnixNano before which to stay quiet
	suppressed atomic.Uint64
}

func (b *burstLog) warn(msg string, args ...any) {
	now := time.Now().UnixNano()
	next := b.next.Load()
	if now < next || !b.next.CompareAndSwap(next, now+int64(burstWindow)) {
		b.suppressed.Add(1)
		return
	}
	b.log.Warn(msg, append(args, "suppressed_since_last", b.suppressed.Swap(0))...)
}
