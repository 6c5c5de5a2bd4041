package tiered

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// breaker makes calls fail fast while Redis is unreachable, so that an
// outage costs callers a branch instead of a connect timeout each. The
// first failure opens it for 100 ms, doubling with each consecutive failure
// up to 5 s; the first call after the pause tries Redis again, and a success
// closes it.
//
// A cache has one per Cluster master (by address), so that one master's
// outage does not fail calls for keys on the others, and one for the whole
// cache: the single node, or a Cluster that answers CLUSTERDOWN (or whose
// slot map cannot be had). A call passes if both its master's and the
// cache's are closed.
type breaker struct {
	failures  atomic.Int64
	openUntil atomic.Int64 // UnixNano
	cause     atomic.Pointer[error]

	// onRecover, if set, is called when a call succeeds after failures
	// (at least once after every failure, sometimes more), with the keys
	// L1 kept while the breaker was open (see outage), or with all true if
	// it did not track them all.
	onRecover func(kept []string, all bool)
	track     bool // outage records keys (a master's breaker; the cache's drops all of L1)

	mu       sync.Mutex // orders outage against a recovery
	kept     map[string]struct{}
	overflow bool // more than maxKept keys were kept
}

// maxKept bounds the keys a breaker remembers while it is open; past it,
// its recovery drops all of L1.
const maxKept = 10000

const (
	breakerMinPause = 100 * time.Millisecond
	breakerMaxPause = 5 * time.Second
)

func (b *breaker) allow() error {
	until := b.openUntil.Load()
	if until == 0 || time.Now().UnixNano() >= until {
		return nil
	}
	cause := errors.New("no answer yet")
	if p := b.cause.Load(); p != nil {
		cause = *p
	}
	return fmt.Errorf("%w: breaker open after: %w", ErrRemoteUnavailable, cause)
}

func (b *breaker) record(err error) {
	if err == nil {
		if b.failures.Load() == 0 && b.openUntil.Load() == 0 {
			return
		}
		// Swap both: a failure recorded concurrently leaves one of them set,
		// so the next success recovers again.
		b.mu.Lock()
		f, u := b.failures.Swap(0), b.openUntil.Swap(0)
		kept := slices.Collect(maps.Keys(b.kept))
		all := b.overflow || !b.track
		b.kept, b.overflow = nil, false
		b.mu.Unlock()
		if (f != 0 || u != 0) && b.onRecover != nil {
			b.onRecover(kept, all)
		}
		return
	}
	n := b.failures.Add(1)
	pause := breakerMaxPause
	if n < 8 {
		pause = min(breakerMinPause<<(n-1), breakerMaxPause)
	}
	b.cause.Store(&err)
	b.openUntil.Store(time.Now().Add(pause).UnixNano())
}

// outage records that L1 keeps key while Redis fails, and returns until
// when it may (UnixNano): until the breaker lets the next call try Redis,
// or 0 if it is closed. Either the next recovery is passed key (or all),
// or this sees the breaker closed.
func (b *breaker) outage(key string) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	until := b.openUntil.Load()
	switch {
	case until == 0 || !b.track:
	case len(b.kept) >= maxKept:
		b.overflow = true
	default:
		if b.kept == nil {
			b.kept = make(map[string]struct{})
		}
		b.kept[key] = struct{}{}
	}
	return until
}

// cluster returns the client if it is a ClusterClient.
func (r *remote) cluster() *redis.ClusterClient {
	cc, _ := r.client.(*redis.ClusterClient)
	return cc
}

// breakerFor returns the breaker of the master of the Redis key rkey: on a
// single node, or if the slot map cannot be had, the cache's.
func (r *remote) breakerFor(ctx context.Context, rkey string) *breaker {
	cc := r.cluster()
	if cc == nil {
		return &r.breaker
	}
	node, err := cc.MasterForKey(ctx, rkey)
	if err != nil {
		return &r.breaker
	}
	return r.masterBreaker(node.Options().Addr)
}

func (r *remote) masterBreaker(addr string) *breaker {
	if b, ok := r.masters.Load(addr); ok {
		return b.(*breaker)
	}
	b, _ := r.masters.LoadOrStore(addr, &breaker{onRecover: r.onMasterRecover, track: true})
	return b.(*breaker)
}

// allow returns an error while b or the cache's breaker is open.
func (r *remote) allow(b *breaker) error {
	if err := r.breaker.allow(); err != nil || b == &r.breaker {
		return err
	}
	return b.allow()
}

// outage records that L1 keeps key while Redis fails, and returns until
// when it may (see breaker.outage): while its master's breaker or the
// cache's is open.
func (r *remote) outage(key string) int64 {
	until := r.breaker.outage(key)
	if b := r.breakerFor(context.Background(), r.key(key)); b != &r.breaker {
		until = max(until, b.outage(key))
	}
	return until
}

// closeAll closes every breaker: where Redis failed, it may answer again.
func (r *remote) closeAll() {
	r.breaker.record(nil)
	r.masters.Range(func(_, b any) bool {
		b.(*breaker).record(nil)
		return true
	})
}
