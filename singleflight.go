package tiered

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// flight makes concurrent misses on one key share one run of the work that
// fills it: a read of Redis and, for GetOrLoad, perhaps a load. It does what
// golang.org/x/sync/singleflight does, shaped for a cache:
//
//   - The caller that starts a flight (the leader) reads Redis on its own
//     goroutine, under its own context. singleflight.DoChan would run the
//     read on a new goroutine and hand the result back over a channel: two
//     goroutine wake-ups, which cost tens of microseconds on small VMs, on
//     a path whose floor is one Redis round trip.
//   - A load runs on a goroutine of its own, under a context that keeps the
//     leader's values but not its cancellation, bounded by the flight's
//     timeout: one impatient caller must not fail the others, and a load
//     that outlives all its callers is still cached for the next.
//   - Every caller waits on its own context and may leave early.
//   - A panic in the work becomes an error wrapping ErrLoaderPanic for every
//     caller. (Under DoChan it re-panics on a goroutine where no recover
//     can catch it, and the process dies.)
//
// Because the leader reads under its own context, its read can fail for a
// reason that is the leader's alone. The waiters must not inherit it:
//
//	A: misses, leads, sends GET under ctxA
//	B: misses, joins A's flight, waits
//	A: ctxA is cancelled; the read returns context.Canceled
//	A: returns context.Canceled; the flight goes on without it: the read
//	   is redone on a goroutine of its own, detached like a load
//	B: gets the redone read's result
//
// (Were B to start over instead, a patient B could keep joining flights
// that impatient leaders give up, and wait for long.) A flight nobody waits
// on is abandoned instead; a caller who joins it in that instant starts
// over. Any other answer, such as ErrNotFound, is shared even if the
// leader's context ended meanwhile.
//
// A caller joins only a flight that began under its own view of the key or
// a later one: the key's generation and the subscription's epoch of the
// flight's ticket are at least those of the caller's. A flight that began
// before an invalidation the caller has seen may return the value that the
// invalidation replaced:
//
//	A: GetOrLoad(k) misses, leads, reads v1 from Redis (slowly)
//	B: Set(k, v2) on another instance; its message bumps k's generation here
//	C: GetOrLoad(k) misses; joining A's flight would return v1
//
// So C leads a flight of its own, which replaces A's in the table (A's
// goes on for its callers). Work done on a goroutine of its own is bounded
// by the flight's timeout: then the flight ends with an error wrapping
// context.DeadlineExceeded, the next caller starts a new one, and what the
// work returns later is dropped.
type flight[V any] struct {
	timeout   time.Duration   // of work done on a goroutine of its own
	onPanic   func(err error) // counts and logs; called once per panic
	onTimeout func(err error) // counts and logs; called once per timeout
	shared    *atomic.Uint64  // callers that got the result of another caller's flight

	mu    sync.Mutex
	calls map[string]*flightCall[V]
}

type flightCall[V any] struct {
	gen, epoch uint64 // of the ticket the flight began under

	// done is closed once the fields below are set. It is made by the
	// first caller who waits (under flight.mu), so that the common flight,
	// which nobody joins, does without it.
	done      chan struct{}
	finished  bool // under flight.mu: the result is set
	val       V
	src       Source
	err       error
	abandoned bool // the leader's context ended during its read, and nobody waited
}

// flightRead is the leader's part of a flight. It returns the flight's
// result, or a load to run detached whose result is the flight's (and then
// its value and error are ignored).
type flightRead[V any] func(ctx context.Context) (V, flightLoad[V], error)

type flightLoad[V any] func(ctx context.Context) (V, error)

// do returns the result of the flight for key: one it leads, running read,
// or the one in progress if it began under t or later. The result is
// shared: callers must treat it as read-only.
func (f *flight[V]) do(ctx context.Context, key string, t ticket, read flightRead[V]) (V, Source, error) {
	for {
		c, led := f.claim(key, t)
		if led {
			return f.lead(ctx, key, c, read)
		}
		if err := f.wait(ctx, c); err != nil {
			var zero V
			return zero, SourceNone, err
		}
		if !c.abandoned {
			f.shared.Add(1)
			return c.val, c.src, c.err
		}
	}
}

// claim returns the flight in progress for key that began under t or later,
// which the caller joins (and waits on), or else a new one, registered in
// its place, that the caller leads (led): it must finish it.
func (f *flight[V]) claim(key string, t ticket) (c *flightCall[V], led bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.calls[key]
	if ok && c.gen >= t.gen && c.epoch >= t.epoch {
		f.waitOn(c)
		return c, false
	}
	c = &flightCall[V]{gen: t.gen, epoch: t.epoch}
	if f.calls == nil {
		f.calls = make(map[string]*flightCall[V])
	}
	f.calls[key] = c
	return c, true
}

// wait returns once c has finished (nil), or ctx has ended (its error).
func (f *flight[V]) wait(ctx context.Context, c *flightCall[V]) error {
	f.mu.Lock()
	done := f.waitOn(c)
	f.mu.Unlock()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *flight[V]) lead(ctx context.Context, key string, c *flightCall[V], read flightRead[V]) (V, Source, error) {
	var load flightLoad[V]
	v, err := f.guard(func() (v V, err error) {
		v, load, err = read(ctx)
		return v, err
	})
	switch {
	case load != nil:
		f.detach(ctx, key, c, func(ctx context.Context) (V, Source, error) {
			v, err := load(ctx)
			return v, SourceLoader, err
		})
		if err := f.wait(ctx, c); err != nil {
			var zero V
			return zero, SourceNone, err
		}
		return c.val, c.src, c.err
	case err != nil && errors.Is(err, ctx.Err()):
		f.gaveUp(ctx, key, c, err, readThenLoad(read))
		return v, SourceNone, err
	default:
		f.finish(key, c, v, SourceRemote, err, false)
		return v, SourceRemote, err
	}
}

// gaveUp ends flight c, whose leader's read failed with err, its own
// context's error: a flight nobody waits on is abandoned (a caller who
// joins it in that instant starts over); one that somebody waits on is
// finished by redo, detached, so that the waiters do not inherit the
// leader's impatience.
func (f *flight[V]) gaveUp(ctx context.Context, key string, c *flightCall[V], err error, redo func(context.Context) (V, Source, error)) {
	f.mu.Lock()
	waited := c.done != nil
	f.mu.Unlock()
	if !waited {
		var zero V
		f.finish(key, c, zero, SourceNone, err, true)
		return
	}
	f.detach(ctx, key, c, redo)
}

// detach finishes flight c with work, run on a goroutine of its own under a
// context that keeps ctx's values but not its cancellation, or with an
// error at the flight's timeout, whichever comes first.
func (f *flight[V]) detach(ctx context.Context, key string, c *flightCall[V], work func(context.Context) (V, Source, error)) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), f.timeout)
	stop := context.AfterFunc(dctx, func() {
		f.expire(key, c)
	})
	go func() {
		defer cancel()
		src := SourceNone
		v, err := f.guard(func() (v V, err error) {
			v, src, err = work(dctx)
			return v, err
		})
		stop()
		f.finish(key, c, v, src, err, false)
	}()
}

// readThenLoad returns the whole work of a flight, its read and the load
// the read may return, for a goroutine of its own.
func readThenLoad[V any](read flightRead[V]) func(context.Context) (V, Source, error) {
	return func(ctx context.Context) (V, Source, error) {
		v, load, err := read(ctx)
		if load != nil {
			v, err = load(ctx)
			return v, SourceLoader, err
		}
		return v, SourceRemote, err
	}
}

// expire finishes flight c with the error of a flight that had no result
// within the timeout, unless it has a result already.
func (f *flight[V]) expire(key string, c *flightCall[V]) {
	err := fmt.Errorf("tiered: no result for key %q within LoadTimeout (%v): %w", key, f.timeout, context.DeadlineExceeded)
	var zero V
	if f.finish(key, c, zero, SourceNone, err, false) {
		f.onTimeout(err)
	}
}

// guard runs work and turns a panic into an error wrapping ErrLoaderPanic.
func (f *flight[V]) guard(work func() (V, error)) (V, error) {
	return guard(f.onPanic, work)
}

// guard runs work and turns a panic into an error wrapping ErrLoaderPanic,
// which it passes to onPanic.
func guard[T any](onPanic func(error), work func() (T, error)) (v T, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: %v\n%s", ErrLoaderPanic, p, debug.Stack())
			onPanic(err)
		}
	}()
	return work()
}

// waitOn returns the channel that is closed when c finishes (closed
// already if it has). f.mu must be held.
func (f *flight[V]) waitOn(c *flightCall[V]) chan struct{} {
	if c.done == nil {
		c.done = make(chan struct{})
		if c.finished {
			close(c.done)
		}
	}
	return c.done
}

// finish publishes the flight's result, unless it has one already (the
// work and the timeout race), and reports whether it did. The flight
// leaves the table in the same step (unless a newer flight of the key
// replaced it there), so that a caller who comes after the result was
// published starts a new flight rather than getting an old result.
func (f *flight[V]) finish(key string, c *flightCall[V], v V, src Source, err error, abandoned bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if c.finished {
		return false
	}
	c.finished = true
	c.val, c.src, c.err, c.abandoned = v, src, err, abandoned
	if f.calls[key] == c {
		delete(f.calls, key)
	}
	if c.done != nil {
		close(c.done)
	}
	return true
}
