package tiered

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// writeGate holds the write script of the key marker (its EVALSHA or EVAL)
// until release is closed, so that the writes that come meanwhile queue up
// behind it and go as one batch.
type writeGate struct {
	marker  string
	reached chan struct{}
	release chan struct{}
	once    sync.Once
}

func newWriteGate(rdb *redis.Client, marker string) *writeGate {
	g := &writeGate{marker: marker, reached: make(chan struct{}), release: make(chan struct{})}
	rdb.AddHook(processHook{process: func(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
		if isScript(cmd) && cmdHas(cmd, g.marker) {
			g.once.Do(func() {
				close(g.reached)
				<-g.release
			})
		}
		return next(ctx, cmd)
	}})
	return g
}

func isScript(cmd redis.Cmder) bool { return cmd.Name() == "evalsha" || cmd.Name() == "eval" }

func cmdHas(cmd redis.Cmder, s string) bool {
	for _, a := range cmd.Args() {
		if v, ok := a.(string); ok && strings.Contains(v, s) {
			return true
		}
	}
	return false
}

// queued returns how many writes wait in c's (single-node) queue.
func queued[V any](c *Cache[V]) int {
	q := &c.remote.queue
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.pending)
}

// subscribeRaw subscribes to c's invalidation channel and returns its
// messages' payloads.
func subscribeRaw[V any](t *testing.T, rdb *redis.Client, c *Cache[V]) <-chan string {
	t.Helper()
	ps := rdb.Subscribe(context.Background(), c.remote.channel)
	t.Cleanup(func() { _ = ps.Close() })
	if _, err := ps.Receive(context.Background()); err != nil {
		t.Fatal(err)
	}
	out := make(chan string, 1000)
	go func() {
		for m := range ps.Channel() {
			out <- m.Payload
		}
	}()
	return out
}

func nextMessage(t *testing.T, msgs <-chan string) string {
	t.Helper()
	select {
	case m := <-msgs:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no invalidation message")
		return ""
	}
}

// batchOf runs first (whose write the gate holds) and then each of rest
// in order, once the one before is queued, and releases the gate once all
// of rest wait in the queue: rest goes to Redis as one batch. It returns
// the errors of rest.
func batchOf[V any](t *testing.T, c *Cache[V], g *writeGate, first func() error, rest ...func() error) []error {
	t.Helper()
	firstErr := make(chan error, 1)
	go func() { firstErr <- first() }()
	<-g.reached
	errs := make([]chan error, len(rest))
	for i, f := range rest {
		errs[i] = make(chan error, 1)
		go func() { errs[i] <- f() }()
		waitUntil(t, 10*time.Second, fmt.Sprintf("write %d to queue", i), func() bool { return queued(c) == i+1 })
	}
	close(g.release)
	if err := <-firstErr; err != nil {
		t.Fatalf("the gated write: %v", err)
	}
	out := make([]error, len(rest))
	for i := range errs {
		out[i] = <-errs[i]
	}
	return out
}

func TestConcurrentSetsGoAsFewerMessagesAndEveryInstanceEndsWithWhatRedisHolds(t *testing.T) {
	run := func(t *testing.T, rdb *redis.Client) {
		ctx := context.Background()
		ns := uniqueNamespace(t)
		a := newTestCache[string](t, rdb, Options{Namespace: ns})
		b := newTestCache[string](t, rdb, Options{Namespace: ns})
		const writers, perWriter, keys = 16, 40, 24
		for k := range keys {
			key := fmt.Sprintf("k%d", k)
			if err := a.Set(ctx, key, "old"); err != nil {
				t.Fatal(err)
			}
			if _, err := b.Get(ctx, key); err != nil { // b holds it in L1
				t.Fatal(err)
			}
		}
		before := a.Stats()
		var wg sync.WaitGroup
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range perWriter {
					key := fmt.Sprintf("k%d", (w*7+i)%keys)
					var err error
					if i%5 == 4 {
						err = a.Delete(ctx, key)
					} else {
						err = a.Set(ctx, key, fmt.Sprintf("w%d-%d", w, i))
					}
					if err != nil {
						t.Error(err)
					}
				}
			}()
		}
		wg.Wait()
		after := a.Stats()
		writes := uint64(writers * perWriter)
		published := after.InvalidationsPublished - before.InvalidationsPublished
		if published >= writes || after.WriteBatches == 0 {
			t.Fatalf("%d writes went as %d messages (%d batches); want fewer messages than writes", writes, published, after.WriteBatches)
		}
		t.Logf("%d writes: %d messages, %d batches holding %d writes", writes, published, after.WriteBatches, after.WritesCoalesced)
		waitUntil(t, 10*time.Second, "b to receive every message of a", func() bool {
			return b.Stats().InvalidationsReceived >= after.InvalidationsPublished
		})
		for k := range keys {
			key := fmt.Sprintf("k%d", k)
			want, err := rdb.Get(ctx, a.remote.key(key)).Bytes()
			wantV := "(none)"
			if err == nil {
				p, _ := envelopePayload(want)
				wantV, _ = a.codec.decode(p)
			}
			for name, c := range map[string]*Cache[string]{"writer": a, "other": b} {
				got := "(none)"
				if e, ok := c.local.get(key); ok {
					got, _ = e.result()
				} else if v, err := c.Get(ctx, key); err == nil {
					got = v
				}
				if got != wantV {
					t.Errorf("%s serves %s = %q; Redis holds %q", name, key, got, wantV)
				}
			}
		}
	}
	t.Run("miniredis", func(t *testing.T) {
		_, rdb := newMiniredis(t)
		run(t, rdb)
	})
	t.Run("redis", func(t *testing.T) {
		if os.Getenv("REDIS_ADDR") == "" {
			t.Skip("REDIS_ADDR is not set")
		}
		run(t, realRedis(t))
	})
}

func TestALoneWriteSendsTheSingleWriteMessage(t *testing.T) {
	ctx := context.Background()
	_, rdb := newMiniredis(t)
	// Without the invalidation log, whose messages older instances do not
	// read anyway (see Options.InvalidationLog).
	a := newTestCache[string](t, rdb, Options{InvalidationLog: -1})
	msgs := subscribeRaw(t, rdb, a)
	if err := a.Set(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	m := nextMessage(t, msgs)
	inv, err := decodeInvalidation(m)
	if err != nil || m[0] != msgValue || inv.kind != msgValue || len(inv.keys) != 1 || inv.keys[0] != "k" || inv.origin != a.id {
		t.Fatalf("a lone Set published %q (%+v, %v); want a msgValue message naming k", m, inv, err)
	}
	if err := a.Delete(ctx, "k", "j"); err != nil {
		t.Fatal(err)
	}
	m = nextMessage(t, msgs)
	if inv, err := decodeInvalidation(m); err != nil || m[0] != msgKeys || inv.kind != msgKeys || len(inv.keys) != 2 {
		t.Fatalf("a lone Delete published %q (%+v, %v); want a msgKeys message naming k and j", m, inv, err)
	}
	if s := a.Stats(); s.WriteBatches != 0 || s.WritesCoalesced != 0 {
		t.Errorf("lone writes counted as batches: %+v", s)
	}
}

// batchEnv is a writer whose writes of the key "gate" are held, and
// another instance that holds every key of the test in L1.
type batchEnv struct {
	mr   *miniredis.Miniredis
	rdb  *redis.Client
	a, b *Cache[string]
	gate *writeGate
	msgs <-chan string
}

func newBatchEnv(t *testing.T) *batchEnv {
	mr, rdb := newMiniredis(t)
	e := &batchEnv{mr: mr, rdb: rdb}
	e.gate = newWriteGate(rdb, ":gate")
	ns := uniqueNamespace(t)
	e.a = newTestCache[string](t, rdb, Options{Namespace: ns})
	_, other := newMiniredisClient(t, mr)
	e.b = newTestCache[string](t, other, Options{Namespace: ns})
	e.msgs = subscribeRaw(t, other, e.a)
	return e
}

func newMiniredisClient(t *testing.T, mr *miniredis.Miniredis) (*miniredis.Miniredis, *redis.Client) {
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	return mr, rdb
}

// hold makes b hold key in L1 with value v.
func (e *batchEnv) hold(t *testing.T, key, v string) {
	ctx := context.Background()
	if err := e.a.Set(ctx, key, v); err != nil {
		t.Fatal(err)
	}
	nextMessage(t, e.msgs)
	waitUntil(t, 10*time.Second, "b to hold "+key, func() bool {
		got, err := e.b.Get(ctx, key)
		_, inL1 := e.b.local.get(key)
		return err == nil && got == v && inL1
	})
}

// batchMessage returns the entries of the next message, which must be a
// batch.
func (e *batchEnv) batchMessage(t *testing.T) []invalidation {
	t.Helper()
	for {
		m := nextMessage(t, e.msgs)
		if m[0] != msgBatch && m[0] != msgBatch-msgLogged {
			continue // the gated write's own
		}
		invs, err := decodeMessage(m)
		if err != nil {
			t.Fatal(err)
		}
		return invs
	}
}

// settled waits until b applied every message a published, and checks that
// a and b serve what Redis holds for key (want; "" for nothing).
func (e *batchEnv) settled(t *testing.T, key, want string) {
	t.Helper()
	ctx := context.Background()
	waitUntil(t, 10*time.Second, "b to apply a's messages", func() bool {
		return e.b.Stats().InvalidationsReceived >= e.a.Stats().InvalidationsPublished
	})
	raw, err := e.mr.Get(e.a.remote.key(key))
	switch {
	case want == "" && err == nil:
		t.Fatalf("Redis holds %q under %s; want nothing", raw, key)
	case want != "":
		p, _ := envelopePayload(raw)
		if v, _ := e.a.codec.decode(p); v != want {
			t.Fatalf("Redis holds %q under %s (%v); want %q", p, key, err, want)
		}
	}
	for name, c := range map[string]*Cache[string]{"writer": e.a, "other": e.b} {
		got, err := c.Get(ctx, key)
		if want == "" && !errors.Is(err, ErrNotFound) || want != "" && got != want {
			t.Errorf("%s: Get(%s) = %q, %v; want %q (what Redis holds)", name, key, got, err, want)
		}
	}
}

func TestTwoSetsOfOneKeyInOneBatchTheLaterWinsEverywhere(t *testing.T) {
	ctx := context.Background()
	e := newBatchEnv(t)
	e.hold(t, "k", "old")
	errs := batchOf(t, e.a, e.gate, func() error { return e.a.Set(ctx, "gate", "x") },
		func() error { return e.a.Set(ctx, "k", "v1") },
		func() error { return e.a.Set(ctx, "k", "v2") })
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	invs := e.batchMessage(t)
	if len(invs) != 2 || invs[0].keys[0] != "k" || invs[1].keys[0] != "k" || invs[0].version >= invs[1].version ||
		invs[0].kind != msgValue || invs[1].kind != msgValue {
		t.Fatalf("batch message %+v; want two value entries of k, versions increasing", invs)
	}
	e.settled(t, "k", "v2")
	if s := e.a.Stats(); s.WriteBatches != 1 || s.WritesCoalesced != 2 {
		t.Errorf("WriteBatches %d, WritesCoalesced %d; want 1 and 2", s.WriteBatches, s.WritesCoalesced)
	}
}

func TestASetAndADeleteOfOneKeyInOneBatchEndAsRedisRanThem(t *testing.T) {
	ctx := context.Background()
	for _, setFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("setFirst=%v", setFirst), func(t *testing.T) {
			e := newBatchEnv(t)
			e.hold(t, "k", "old")
			set := func() error { return e.a.Set(ctx, "k", "new") }
			del := func() error { return e.a.Delete(ctx, "k") }
			ops, want := []func() error{set, del}, ""
			if !setFirst {
				ops, want = []func() error{del, set}, "new"
			}
			for _, err := range batchOf(t, e.a, e.gate, func() error { return e.a.Set(ctx, "gate", "x") }, ops...) {
				if err != nil {
					t.Fatal(err)
				}
			}
			invs := e.batchMessage(t)
			if len(invs) != 2 || invs[0].version >= invs[1].version {
				t.Fatalf("batch message %+v; want two entries, versions increasing", invs)
			}
			e.settled(t, "k", want)
		})
	}
}

func TestEveryCallOfAFailedBatchGetsAnErrorAndDropsItsKey(t *testing.T) {
	ctx := context.Background()
	e := newBatchEnv(t)
	e.hold(t, "k1", "old")
	e.hold(t, "k2", "old")
	errInjected := errors.New("injected batch failure")
	e.rdb.AddHook(processHook{process: func(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
		if isScript(cmd) && (cmdHas(cmd, batchScript.Hash()) || cmdHas(cmd, "local versions = {}")) {
			cmd.SetErr(errInjected)
			return errInjected
		}
		return next(ctx, cmd)
	}})
	// a holds k1 and k2 in L1 too (its own Sets).
	for _, k := range []string{"k1", "k2"} {
		if _, ok := e.a.local.get(k); !ok {
			t.Fatalf("a does not hold %s before the test", k)
		}
	}
	errs := batchOf(t, e.a, e.gate, func() error { return e.a.Set(ctx, "gate", "x") },
		func() error { return e.a.Set(ctx, "k1", "new") },
		func() error { return e.a.Delete(ctx, "k2") })
	for i, err := range errs {
		if !errors.Is(err, errInjected) || !errors.Is(err, ErrRemoteUnavailable) {
			t.Errorf("write %d of the failed batch returned %v; want the batch's error", i, err)
		}
	}
	for _, k := range []string{"k1", "k2"} {
		if e, ok := e.a.local.get(k); ok {
			t.Errorf("after its write failed, a serves %s from L1: %v", k, e.value)
		}
	}
}

func TestAWriteWhoseCtxEndsWhileQueuedReturnsCtxErrAndWritesNothing(t *testing.T) {
	ctx := context.Background()
	e := newBatchEnv(t)
	firstErr := make(chan error, 1)
	go func() { firstErr <- e.a.Set(ctx, "gate", "x") }()
	<-e.gate.reached
	cctx, cancel := context.WithCancel(ctx)
	cancelled := make(chan error, 1)
	go func() { cancelled <- e.a.Set(cctx, "gone", "v") }()
	waitUntil(t, 10*time.Second, "the Set to queue", func() bool { return queued(e.a) == 1 })
	kept := make(chan error, 1)
	go func() { kept <- e.a.Set(ctx, "kept", "v") }()
	waitUntil(t, 10*time.Second, "the second Set to queue", func() bool { return queued(e.a) == 2 })
	cancel()
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Fatalf("a Set whose ctx ended while queued returned %v; want context.Canceled", err)
	}
	if n := queued(e.a); n != 1 {
		t.Fatalf("%d writes queued after the cancelled one left; want 1", n)
	}
	close(e.gate.release)
	if err := <-firstErr; err != nil {
		t.Fatal(err)
	}
	if err := <-kept; err != nil {
		t.Fatalf("the write queued behind a cancelled one: %v", err)
	}
	if e.mr.Exists(e.a.remote.key("gone")) {
		t.Error("Redis holds the key of a Set cancelled while queued")
	}
	if !e.mr.Exists(e.a.remote.key("kept")) {
		t.Error("Redis lacks the key of the Set queued behind the cancelled one")
	}
}

func TestBatchMessagesCarryValuesOnlyUpToPublishValueMaxBytes(t *testing.T) {
	ctx := context.Background()
	e := newBatchEnv(t)
	big := strings.Repeat("x", e.a.opts.PublishValueMaxBytes+1)
	errs := batchOf(t, e.a, e.gate, func() error { return e.a.Set(ctx, "gate", "x") },
		func() error { return e.a.Set(ctx, "small", "v") },
		func() error { return e.a.Set(ctx, "big", big) })
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	invs := e.batchMessage(t)
	if len(invs) != 2 || invs[0].kind != msgValue || invs[0].envelope == "" || invs[1].kind != msgKeys || invs[1].envelope != "" {
		t.Fatalf("batch entries %+v; want the small value carried and the big one only named", invs)
	}
	e.settled(t, "big", big)
}

// msgBatchOf returns a msgBatch message of entries, as batchScript
// publishes it.
func msgBatchOf(origin uint64, entries ...invalidation) string {
	b := messageHead(msgBatch, origin)
	for _, m := range entries {
		b = binary.BigEndian.AppendUint64(append(b, m.kind), m.version)
		b = append(b, batchEntryTail(m.kind, m.keys, len(m.envelope))...)
		b = append(b, m.envelope...)
	}
	return string(b)
}

func TestDecodeMessageReadsBatchesInOrder(t *testing.T) {
	env := string(encodeEnvelope(kindValue, 3_000_000, []byte("v")))
	p := msgBatchOf(7, invalidation{kind: msgKeys, version: 5, keys: []string{"a", "bc"}},
		invalidation{kind: msgValue, version: 6, keys: []string{"a"}, envelope: env})
	invs, err := decodeMessage(p)
	if err != nil || len(invs) != 2 || invs[0].origin != 7 || invs[1].origin != 7 ||
		invs[0].version != 5 || strings.Join(invs[0].keys, ",") != "a,bc" || invs[0].envelope != "" ||
		invs[1].version != 6 || invs[1].keys[0] != "a" || invs[1].envelope != env {
		t.Fatalf("decodeMessage = %+v, %v", invs, err)
	}
	for _, bad := range []string{"b", "b1234567", p[:len(p)-1], p + "x", string(messageHead(msgBatch, 1))} {
		if _, err := decodeMessage(bad); err == nil {
			t.Errorf("decodeMessage(%q) accepted garbage", bad)
		}
	}
}
