package tiered

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// clockTick is the resolution of L1 expiry: an entry may be served for up to
// one tick (plus scheduling delay of the ticking goroutine) past its TTL.
const clockTick = time.Millisecond

// clockIdleTicks is how many ticks without an L1 read pause the clock.
const clockIdleTicks = 100

// clock is a coarse wall clock. A goroutine stores time.Now every tick so
// that the L1 hit path reads the time with one atomic load. Calling time.Now
// on a hit instead costs ~44 ns on the VMs we measured, which alone would
// make a hit twice as slow as a raw ristretto Get. (For the same reason L1
// entries carry their own expiry instead of using ristretto's TTL, whose Get
// calls time.Now.)
//
// One clock serves every Cache of the process (sharedClock), and it pauses
// when no cache has read it for clockIdleTicks ticks, so that idle caches
// cost no CPU: a 1 ms ticker costs ~3% of a core. The first read after a
// pause reads time.Now itself and wakes the clock.
type clock struct {
	nanos atomic.Int64  // time.Now().UnixNano() as of the last tick
	state atomic.Uint32 // clockUnread, clockRead or clockPaused

	mu    sync.Mutex
	hooks atomic.Pointer[[]*func()] // called after every tick; replaced, never modified

	wake chan struct{}
	stop chan struct{}
	done sync.WaitGroup
}

const (
	clockUnread uint32 = iota // ticking; not read since the last tick
	clockRead                 // ticking; read since the last tick (also: a manual clock)
	clockPaused               // not ticking: nanos is stale
)

func newClock() *clock {
	c := &clock{wake: make(chan struct{}, 1), stop: make(chan struct{})}
	c.nanos.Store(time.Now().UnixNano())
	c.state.Store(clockRead)
	c.done.Add(1)
	go c.run()
	return c
}

// newManualClock returns a clock that only moves when a test calls set.
func newManualClock(start time.Time) *clock {
	c := &clock{}
	c.nanos.Store(start.UnixNano())
	c.state.Store(clockRead)
	return c
}

// sharedClock is the clock of every Cache in the process: state shared by
// design, so that a process with many caches runs one ticker, not one each.
var sharedClock struct {
	sync.Mutex
	c    *clock
	refs int
}

// acquireClock returns the shared clock, starting it if needed. Every call
// must be matched by a releaseClock.
func acquireClock() *clock {
	sharedClock.Lock()
	defer sharedClock.Unlock()
	if sharedClock.refs == 0 {
		sharedClock.c = newClock()
	}
	sharedClock.refs++
	return sharedClock.c
}

// releaseClock gives up a reference to the shared clock; the last one stops
// it.
func releaseClock() {
	sharedClock.Lock()
	defer sharedClock.Unlock()
	if sharedClock.refs--; sharedClock.refs == 0 {
		sharedClock.c.close()
		sharedClock.c = nil
	}
}

func (c *clock) run() {
	defer c.done.Done()
	t := time.NewTicker(clockTick)
	defer t.Stop()
	idle := 0
	for {
		select {
		case now := <-t.C:
			c.nanos.Store(now.UnixNano())
			if hooks := c.hooks.Load(); hooks != nil {
				for _, f := range *hooks {
					(*f)()
				}
			}
			if c.state.Swap(clockUnread) == clockRead {
				idle = 0
				continue
			}
			if idle++; idle < clockIdleTicks || !c.state.CompareAndSwap(clockUnread, clockPaused) {
				continue
			}
			// A read between the Swap and the CompareAndSwap kept it going.
			t.Stop()
			select {
			case <-c.wake:
			case <-c.stop:
				return
			}
			idle = 0
			t.Reset(clockTick)
		case <-c.stop:
			return
		}
	}
}

// now returns the time as of the last tick, UnixNano.
func (c *clock) now() int64 {
	if c.state.Load() != clockRead {
		return c.slowNow()
	}
	return c.nanos.Load()
}

// slowNow is now for the first read after a tick, or after a pause.
func (c *clock) slowNow() int64 {
	switch c.state.Load() {
	case clockUnread:
		c.state.CompareAndSwap(clockUnread, clockRead)
	case clockPaused:
		// Store the time before the state turns: a read that sees the
		// clock running again must see a fresh time.
		now := time.Now().UnixNano()
		c.nanos.Store(now)
		if c.state.CompareAndSwap(clockPaused, clockRead) {
			select {
			case c.wake <- struct{}{}:
			default:
			}
		}
		return now
	}
	return c.nanos.Load()
}

// last returns the time of the last tick without counting as a read, for
// the tick hooks: they must not keep an idle clock awake.
func (c *clock) last() int64 { return c.nanos.Load() }

func (c *clock) set(t time.Time) { c.nanos.Store(t.UnixNano()) }

// onTick registers f to be called after every tick; the returned function
// unregisters it.
func (c *clock) onTick(f func()) (remove func()) {
	p := &f
	c.mu.Lock()
	defer c.mu.Unlock()
	var hooks []*func()
	if h := c.hooks.Load(); h != nil {
		hooks = *h
	}
	hooks = append(slices.Clip(hooks), p)
	c.hooks.Store(&hooks)
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		kept := slices.DeleteFunc(slices.Clone(*c.hooks.Load()), func(x *func()) bool { return x == p })
		c.hooks.Store(&kept)
	}
}

func (c *clock) close() {
	if c.stop != nil {
		close(c.stop)
		c.done.Wait()
	}
}
