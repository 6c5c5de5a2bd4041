package tiered

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Leases close the cache-aside race and make one load per key per fleet:
//
//	A: GetOrLoad(k) misses both tiers; its loader reads row v1, slowly
//	B: the row changes to v2; B calls Delete(k)
//	A: the loader returns v1; a plain SET NX would store it, since k is gone,
//	   and every instance would read v1 until RemoteTTL
//
// When GetOrLoad finds a key empty in Redis, the same script that read it
// stores a lease there instead: an envelope of kind kindLease holding a
// random token, for Options.LoadLease. The load's write-back stores its
// value only if the key still holds that token (fillScript), so a Set or a
// Delete during the load, which replace or remove the lease, win; the
// loaded value is returned to the callers that asked before, and cached in
// neither tier. Another instance that misses the key meanwhile finds the
// lease: it marks it waited and waits (leaseWaits) for the first message
// naming the key, which the holder's write-back publishes because of the
// mark, and which carries the value if it is small. A holder whose load
// fails releases the lease with a message that wakes the waiters; one of
// them takes it over. A holder that dies or hangs leaves its lease to
// expire, and waiters wait no longer than it has left. Plain Get never
// takes or waits for a lease: a leased key reads as not found.

// leaseWaits holds the GetOrLoad flights of a Cache that wait for a load
// another instance holds the lease of.
type leaseWaits struct {
	n  atomic.Int32 // waits registered; read by every message, without mu
	mu sync.Mutex
	m  map[string][]*leaseWait
}

// leaseWait is one flight's wait: the first message naming its key after
// it was added wakes it.
type leaseWait struct {
	woken    chan struct{} // closed on the wake-up
	kind     byte          // the message's kind
	version  uint64        // the message's version
	envelope string        // the value the message carried, if any
	ticket   ticket        // taken right after the message was applied to L1
}

// leaseSeen is what a read saw of another load's lease.
type leaseSeen struct {
	left    time.Duration // until it runs out
	version uint64        // Redis' version of it: messages up to it are older
}

// add registers a wait for key. It is added before a read that may find
// the lease, so that no message published after that read can be missed.
func (w *leaseWaits) add(key string) *leaseWait {
	lw := &leaseWait{woken: make(chan struct{})}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.m == nil {
		w.m = make(map[string][]*leaseWait)
	}
	w.m[key] = append(w.m[key], lw)
	w.n.Add(1)
	return lw
}

// remove unregisters lw.
func (w *leaseWaits) remove(key string, lw *leaseWait) {
	w.mu.Lock()
	defer w.mu.Unlock()
	ws := w.m[key]
	for i, x := range ws {
		if x == lw {
			ws = append(ws[:i:i], ws[i+1:]...)
			w.n.Add(-1)
			break
		}
	}
	if len(ws) == 0 {
		delete(w.m, key)
	} else {
		w.m[key] = ws
	}
}

// wake wakes the waits for key with a message of kind, carrying envelope,
// just applied to L1. The ticket under which a waiter may keep the value
// is taken now, on the subscriber's goroutine: taken by the waiter when it
// runs, it could postdate a later message that replaced the value. If L1
// knows of a newer write than the message's (begin says), the waiter gets
// a bare invalidation instead: it reads Redis again.
func (w *leaseWaits) wake(key string, kind byte, version uint64, envelope string, begin func(string, uint64) (ticket, bool)) {
	if w.n.Load() == 0 {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, lw := range w.m[key] {
		select {
		case <-lw.woken:
		default:
			t, current := begin(key, version)
			lw.kind, lw.version, lw.envelope, lw.ticket = kind, version, envelope, t
			if !current {
				lw.kind, lw.envelope = msgKeys, ""
			}
			close(lw.woken)
		}
	}
}

// releaseLease gives up this instance's lease token on key, waking waiters with
// a message of kind (msgKeys: take it over; msgNotFound: the key does not
// exist).
func (c *Cache[V]) releaseLease(ctx context.Context, key string, token []byte, kind byte) {
	if c.remote.release(ctx, key, token, messageHead(kind, c.id), encodeKeys(key)) {
		c.stats.published.Add(1)
	}
}

// newLeaseToken returns a random lease token.
func newLeaseToken() []byte {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, leaseTokenBytes), rand.Uint64())
	return binary.BigEndian.AppendUint64(b, rand.Uint64())
}

// leaseSlack is how long past a lease's expiry a waiter waits before it
// tries to take the lease over: Redis expires keys lazily and by sampling,
// but a read of an expired key never returns it.
const leaseSlack = 5 * time.Millisecond

// readLeased is GetOrLoad's read of Redis with leases: it returns what
// fetch found, or, if another instance holds the key's lease, what that
// instance's load wrote, waiting for it. It returns the lease token it was
// granted, if any (then res is fetchMiss).
//
// A wait is registered only once a read found another's lease, and then
// the key is read again before waiting: a wake-up published between the
// first read and the registration is not missed, and reads that find no
// lease, nearly all, cost no registration.
func (c *Cache[V]) readLeased(ctx context.Context, key string, t ticket, localTTL time.Duration) (V, fetchResult, held, []byte, error) {
	waited := false
	var lw *leaseWait
	for {
		token := newLeaseToken()
		v, res, found, lease, err := c.fetch(ctx, key, t, localTTL, token)
		if res == fetchFailed {
			// The script may have run and stored the lease without this
			// instance learning it: give it up, or everyone would wait
			// for it to run out.
			go c.releaseLease(ctx, key, token, msgKeys)
		}
		if res != fetchLeased {
			if lw != nil {
				c.waits.remove(key, lw)
			}
			if res == fetchMiss {
				c.stats.leasesGranted.Add(1)
				if waited {
					c.stats.leaseTakeovers.Add(1)
				}
				return v, res, found, token, err
			}
			return v, res, found, nil, err
		}
		if lw == nil {
			lw = c.waits.add(key)
			continue
		}
		c.stats.leaseWaits.Add(1)
		waited = true
		v, res, err = c.awaitLease(ctx, key, t, lw, lease, localTTL)
		lw = nil // awaitLease removed it
		if res != fetchMiss {
			return v, res, held{}, nil, err
		}
		t = c.local.begin(key) // the message that woke us moved the key on
	}
}

// awaitLease waits for the message that ends another instance's lease of
// key, for as long as the lease has left. It returns fetchHit or
// fetchNotFound with what that message carried, fetchFailed if ctx ended,
// or fetchMiss: read Redis again (the message carried no value, it was
// older than the lease, the lease ran out, or the subscription had a gap,
// which may have lost the message). While the subscription is not known
// healthy since t was taken, it reads again every HeartbeatInterval.
func (c *Cache[V]) awaitLease(ctx context.Context, key string, t ticket, lw *leaseWait, lease leaseSeen, localTTL time.Duration) (V, fetchResult, error) {
	defer c.waits.remove(key, lw)
	var zero V
	wait := lease.left + leaseSlack
	broken, healthy := c.sub.brokenChan()
	if !healthy || !c.ready.Load() || c.sub.epoch.Load() != t.epoch {
		wait, broken = min(wait, c.sub.interval), nil
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-lw.woken:
	case <-broken:
		return zero, fetchMiss, nil
	case <-timer.C:
		return zero, fetchMiss, nil
	case <-ctx.Done():
		return zero, fetchFailed, ctx.Err()
	}
	switch {
	case lw.version <= lease.version:
		return zero, fetchMiss, nil // a message from before the lease: look again
	case lw.kind == msgNotFound:
		return zero, fetchNotFound, nil
	case lw.envelope == "":
		return zero, fetchMiss, nil
	}
	env, v, err := c.decodeCarried(lw.envelope)
	if err != nil {
		return zero, fetchMiss, nil
	}
	c.keep(key, lw.ticket, v, env.kind == kindNotFound, len(env.payload), localTTL, env.expires, env.version, false)
	if env.kind == kindNotFound {
		return zero, fetchNotFound, nil
	}
	return v, fetchHit, nil
}
