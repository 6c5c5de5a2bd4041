package tiered_test

// Adversarial tests of group commit (writes.go): concurrent Sets and
// Deletes of one instance go to Redis as one script and one message. Each
// test tries to make an instance serve an overwritten value, or make a
// writer hang or lose its own write, through batches.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tieredcache/tiered"
)

// scriptGate holds the first write script (EVALSHA or EVAL, alone or in a
// pipeline) one of whose arguments contains marker, before it is sent,
// until release is closed: the writes that come meanwhile queue behind it.
type scriptGate struct {
	off     atomic.Bool // not holding yet
	marker  []byte
	reached chan struct{}
	release chan struct{}
	once    sync.Once
}

func newScriptGate(marker string) *scriptGate {
	return &scriptGate{marker: []byte(marker), reached: make(chan struct{}), release: make(chan struct{})}
}

func (g *scriptGate) hold(cmd redis.Cmder) {
	if !g.off.Load() && (cmd.Name() == "evalsha" || cmd.Name() == "eval") && argsContain(cmd, g.marker) {
		g.once.Do(func() {
			close(g.reached)
			<-g.release
		})
	}
}

func (g *scriptGate) DialHook(next redis.DialHook) redis.DialHook { return next }

func (g *scriptGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		g.hold(cmd)
		return next(ctx, cmd)
	}
}

func (g *scriptGate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, c := range cmds {
			g.hold(c)
		}
		return next(ctx, cmds)
	}
}

// queueBehind starts each of writes in its own goroutine, in order, each
// once the one before waits in c's write queue, and returns their errors'
// channels. A write of c must be on the wire (held by a gate).
func queueBehind(t *testing.T, c *tiered.Cache[string], writes ...func() error) []chan error {
	t.Helper()
	base := tiered.QueuedWrites(c)
	out := make([]chan error, len(writes))
	for i, w := range writes {
		out[i] = make(chan error, 1)
		go func() { out[i] <- w() }()
		awaitCond(t, 10*time.Second, fmt.Sprintf("write %d to queue", i), func() bool {
			return tiered.QueuedWrites(c) == base+i+1
		})
	}
	return out
}

var errHung = errors.New("hung")

// awaitErr returns what errc delivers, or errHung, failing the test (but
// not stopping it: gates must still be released), if nothing comes within
// timeout.
func awaitErr(t *testing.T, errc <-chan error, timeout time.Duration, what string) error {
	t.Helper()
	select {
	case err := <-errc:
		return err
	case <-time.After(timeout):
		t.Errorf("%s did not return within %v", what, timeout)
		return errHung
	}
}

// appliedFrom returns a function that waits until reader applied every
// message writer published since now (reader must be subscribed already).
func appliedFrom(t *testing.T, writer, reader *tiered.Cache[string]) func() {
	pub0, recv0 := writer.Stats().InvalidationsPublished, reader.Stats().InvalidationsReceived
	return func() {
		t.Helper()
		awaitCond(t, 10*time.Second, "the reader to apply the writer's messages", func() bool {
			return reader.Stats().InvalidationsReceived-recv0 >= writer.Stats().InvalidationsPublished-pub0
		})
	}
}

// TestAdversarialABatchThatFailsInRedisLeavesNoWriteUnpublished: Redis
// does not roll back the writes a script made before an error. A batch in
// which one write cannot be stored (here the longest TTL, whose PX plus
// StaleIfError overflowed) must not leave the writes before it in Redis
// without their message: another instance would serve the overwritten
// value until its L1 TTL. And a Set with the longest TTL must work, alone
// or batched.
func TestAdversarialABatchThatFailsInRedisLeavesNoWriteUnpublished(t *testing.T) {
	ctx := context.Background()
	mr, _ := newMini(t)
	ns := advNamespace(t)
	o := tiered.Options{StaleIfError: time.Hour, RemoteTTLJitter: -1}
	g := newScriptGate("gate")
	ra := plainClient(t, mr.Addr())
	ra.AddHook(g)
	a := advCache(t, ra, ns, o)
	b := advCache(t, plainClient(t, mr.Addr()), ns, o)
	awaitApplied := appliedFrom(t, a, b)
	if err := a.Set(ctx, "k1", "old"); err != nil {
		t.Fatal(err)
	}
	awaitCond(t, 10*time.Second, "b to hold k1 in L1", func() bool {
		v, fromL1, err := getFrom(b, "k1")
		return err == nil && v == "old" && fromL1
	})

	gateErr := make(chan error, 1)
	go func() { gateErr <- a.Set(ctx, "gate", "x") }()
	<-g.reached
	errs := queueBehind(t, a,
		func() error { return a.Set(ctx, "k1", "new") },
		func() error { return a.Set(ctx, "k2", "forever", tiered.WithRemoteTTL(math.MaxInt64)) })
	close(g.release)
	if err := <-gateErr; err != nil {
		t.Fatal(err)
	}
	for i, e := range errs {
		if err := awaitErr(t, e, 10*time.Second, fmt.Sprintf("write %d", i)); err != nil {
			t.Errorf("write %d of the batch: %v", i, err)
		}
	}
	if err := a.Set(ctx, "k3", "forever", tiered.WithRemoteTTL(math.MaxInt64)); err != nil {
		t.Errorf("a lone Set with the longest TTL: %v", err)
	}
	awaitApplied()
	for _, k := range []string{"k1", "k2", "k3"} {
		want, held := redisHolds(t, mr, ns, k)
		v, err := b.Get(ctx, k)
		if held && (err != nil || v != want) || !held && !errors.Is(err, tiered.ErrNotFound) {
			t.Errorf("b serves %s for %s; Redis holds %q (present %v)", describe(v, err), k, want, held)
		}
	}
}

// TestAdversarialTheSenderOfABatchReturnsWhenItsCtxEnds: a writer handed
// the next batch (it holds other callers' writes too) sends it detached
// from its ctx, so that its deadline fails no one else's write; but the
// writer itself must still return once its ctx ends, as one whose write
// another caller sent does, not wait for a hung connection (here: the
// batch held on its way to Redis) until the client's ReadTimeout or
// forever. Once the batch lands, every instance serves what Redis holds.
func TestAdversarialTheSenderOfABatchReturnsWhenItsCtxEnds(t *testing.T) {
	ctx := context.Background()
	mr, _ := newMini(t)
	ns := advNamespace(t)
	first, batch := newScriptGate("gate"), newScriptGate("k-sender")
	ra := plainClient(t, mr.Addr())
	ra.AddHook(first)
	ra.AddHook(batch)
	batch.off.Store(true) // until the batch
	a := advCache(t, ra, ns, tiered.Options{})
	b := advCache(t, plainClient(t, mr.Addr()), ns, tiered.Options{})
	awaitApplied := appliedFrom(t, a, b)
	for _, k := range []string{"k-sender", "k-other"} {
		if err := a.Set(ctx, k, "old"); err != nil {
			t.Fatal(err)
		}
		awaitCond(t, 10*time.Second, "b to hold "+k+" in L1", func() bool {
			v, fromL1, err := getFrom(b, k)
			return err == nil && v == "old" && fromL1
		})
	}

	gateErr := make(chan error, 1)
	go func() { gateErr <- a.Set(ctx, "gate", "x") }()
	<-first.reached
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	batch.off.Store(false)
	errs := queueBehind(t, a,
		func() error { return a.Set(sctx, "k-sender", "new") },
		func() error { return a.Set(ctx, "k-other", "new") })
	close(first.release)
	if err := <-gateErr; err != nil {
		t.Fatal(err)
	}
	<-batch.reached // the sender's batch is on its way, and hangs there
	cancel()
	if err := awaitErr(t, errs[0], 10*time.Second, "the sender of a hung batch, its ctx cancelled"); !errors.Is(err, context.Canceled) {
		t.Errorf("the sender of a hung batch, its ctx cancelled, returned %v; want context.Canceled", err)
	}
	close(batch.release)
	if err := awaitErr(t, errs[1], 10*time.Second, "the other write of the batch"); err != nil {
		t.Errorf("the other write of the batch (its ctx alive): %v", err)
	}
	awaitApplied()
	for _, k := range []string{"k-sender", "k-other"} {
		want, held := redisHolds(t, mr, ns, k)
		if !held || want != "new" {
			t.Errorf("Redis holds %q (present %v) for %s; want \"new\" (a sent write is not taken back)", want, held, k)
		}
		for name, c := range map[string]*tiered.Cache[string]{"writer": a, "other": b} {
			if v, err := c.Get(ctx, k); err != nil || v != want {
				t.Errorf("%s serves %s for %s; Redis holds %q", name, describe(v, err), k, want)
			}
		}
	}
}

// writeLog records when each write of a run began and ended (ticks of one
// counter), to tell a value older than a write from one written with it.
type writeLog struct {
	tick atomic.Int64
	mu   sync.Mutex
	sets map[string]*span   // by value (each is written once)
	dels map[string][]*span // by key
}

type span struct{ start, end int64 } // end 0: not returned yet

func (l *writeLog) begin() *span { return &span{start: l.tick.Add(1)} }

func (l *writeLog) done(s *span) {
	end := l.tick.Add(1)
	l.mu.Lock()
	s.end = end
	l.mu.Unlock()
}

// older reports whether a read of key that found v (ok) or nothing (!ok)
// after a write that began at start returned is of a write that had
// returned before it began: what read-your-writes forbids.
func (l *writeLog) older(key, v string, ok bool, start int64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ok {
		s := l.sets[v]
		return s == nil || s.end != 0 && s.end < start
	}
	for _, d := range l.dels[key] {
		if d.end == 0 || d.end > start {
			return false
		}
	}
	return true
}

// TestAdversarialConcurrentBatchedWritesOfTwoInstancesKeepOwnWritesAndEndAsRedisHolds:
// two instances, each with many goroutines, Set and Delete (one key or two)
// the same few keys at once, so that each instance's writes go in batches
// that name a key several times, Sets and Deletes of it mixed, and race
// the other instance's batches. After each write returned, its goroutine
// reads the key on its instance: it must never get a value (or absence)
// whose write had returned before its own began. At the end, once each
// applied the other's messages, both serve exactly what Redis holds.
func TestAdversarialConcurrentBatchedWritesOfTwoInstancesKeepOwnWritesAndEndAsRedisHolds(t *testing.T) {
	for _, backend := range []string{"miniredis", "redis"} {
		t.Run(backend, func(t *testing.T) {
			var clients [2]*redis.Client
			var raw redis.Cmdable
			ns := advNamespace(t)
			if backend == "redis" {
				rdb := realRedis(t)
				raw = rdb
				cleanNamespace(t, rdb, ns)
				for i := range clients {
					clients[i] = plainClient(t, rdb.Options().Addr)
				}
			} else {
				mr, rdb := newMini(t)
				raw = rdb
				for i := range clients {
					clients[i] = plainClient(t, mr.Addr())
				}
			}
			a := advCache(t, clients[0], ns, tiered.Options{})
			b := advCache(t, clients[1], ns, tiered.Options{})
			aHeardB, bHeardA := appliedFrom(t, b, a), appliedFrom(t, a, b)
			runRandomWrites(t, map[string]*tiered.Cache[string]{"a": a, "b": b})
			aHeardB()
			bHeardA()
			if s := a.Stats(); s.WriteBatches == 0 {
				t.Logf("no batches formed on a (%+v); the run tested single writes only", s)
			}
			ctx := context.Background()
			for i := range 6 {
				k := fmt.Sprintf("k%d", i)
				want, held := rawPayload(t, raw, ns, k)
				for name, c := range map[string]*tiered.Cache[string]{"a": a, "b": b} {
					v, err := c.Get(ctx, k)
					if held && (err != nil || v != want) || !held && !errors.Is(err, tiered.ErrNotFound) {
						t.Errorf("%s serves %s for %s; Redis holds %q (present %v)", name, describe(v, err), k, want, held)
					}
				}
			}
		})
	}
}

// runRandomWrites runs, on each cache, 12 goroutines of 50 Sets and
// Deletes each over 6 keys, each followed by a read-your-writes check.
func runRandomWrites(t *testing.T, caches map[string]*tiered.Cache[string]) {
	ctx := context.Background()
	l := &writeLog{sets: map[string]*span{}, dels: map[string][]*span{}}
	var wg sync.WaitGroup
	for name, c := range caches {
		for g := range 12 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := uint64(g*7919 + len(name))
				next := func(n int) int {
					rng = rng*6364136223846793005 + 1442695040888963407
					return int(rng>>33) % n
				}
				for i := range 50 {
					k := fmt.Sprintf("k%d", next(6))
					s := l.begin()
					var err error
					if next(10) < 7 {
						v := fmt.Sprintf("%s-%d-%d", name, g, i)
						l.mu.Lock()
						l.sets[v] = s
						l.mu.Unlock()
						err = c.Set(ctx, k, v)
					} else {
						keys := []string{k}
						if next(2) == 0 {
							keys = append(keys, fmt.Sprintf("k%d", next(6)))
						}
						l.mu.Lock()
						for _, dk := range keys {
							l.dels[dk] = append(l.dels[dk], s)
						}
						l.mu.Unlock()
						err = c.Delete(ctx, keys...)
					}
					l.done(s)
					if err != nil {
						t.Errorf("%s: write of %s: %v", name, k, err)
						return
					}
					v, err := c.Get(ctx, k)
					if err != nil && !errors.Is(err, tiered.ErrNotFound) {
						t.Errorf("%s: Get(%s): %v", name, k, err)
						return
					}
					if l.older(k, v, err == nil, s.start) {
						l.mu.Lock()
						t.Errorf("%s: after its own write %s-%d-%d (%d..%d) of %s returned, Get = %s (%+v, deletes %s): a value written before it",
							name, name, g, i, s.start, s.end, k, describe(v, err), l.sets[v], describeSpans(l.dels[k]))
						l.mu.Unlock()
					}
				}
			}()
		}
	}
	wg.Wait()
}

func describeSpans(ss []*span) string {
	out := ""
	for _, s := range ss {
		out += fmt.Sprintf("%d..%d ", s.start, s.end)
	}
	return out
}
