package tiered

import (
	"context"
	"fmt"
	"runtime/debug"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"
)

// flight makes concurrent misses on one key do their work (an L2 read and
// perhaps a load) once, on top of x/sync/singleflight, adding three things:
//
//   - The work runs under a context detached from the first caller's
//     cancellation: with the caller's context, one impatient caller would
//     fail every other caller sharing the work. It keeps the first caller's
//     values (trace IDs and the like) and gets its own timeout.
//   - Every caller waits on its own context and may leave early; the work
//     goes on and its result is still cached for the next caller.
//   - A panic in the work becomes an error (wrapping ErrLoaderPanic) for
//     every caller. singleflight.DoChan would re-panic it in a fresh
//     goroutine, where no recover can catch it, and crash the process.
type flight[V any] struct {
	group   singleflight.Group
	timeout time.Duration
	onPanic func(err error) // counts and logs; called once per panic
	shared  *atomic.Uint64  // callers that got the result of another caller's run
}

// do runs fn for key unless a run for key is in flight, in which case it
// waits for that run's result. The result is shared: callers must treat it
// as read-only.
func (f *flight[V]) do(ctx context.Context, key string, fn func(ctx context.Context) (V, error)) (V, error) {
	ran := false // set by this caller's fn, if it is the one that runs
	ch := f.group.DoChan(key, func() (v any, err error) {
		ran = true
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("%w: %v\n%s", ErrLoaderPanic, p, debug.Stack())
				f.onPanic(err)
			}
		}()
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), f.timeout)
		defer cancel()
		return fn(wctx)
	})
	select {
	case r := <-ch:
		if !ran { // reading ran is safe: fn wrote it before ch was sent on
			f.shared.Add(1)
		}
		v, _ := r.Val.(V)
		return v, r.Err
	case <-ctx.Done():
		var zero V
		return zero, ctx.Err()
	}
}
