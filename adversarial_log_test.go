package tiered_test

// Adversarial black-box tests of gap recovery by replaying the invalidation
// log: a replayed heal restores the epoch of before the gap, so what L1
// filled before it is served again. Each test tries to make an instance
// serve a value overwritten while its subscription was down. Each runs on
// a private redis-server (the log key is outside the namespace's prefix).

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tieredcache/tiered"
)

// killPubsub closes n's pub/sub connections (CLIENT KILL TYPE pubsub of
// one instance): what they had not delivered yet is lost.
func (n *advNet) killPubsub() int {
	n.mu.Lock()
	var cs []*advConn
	for c := range n.conns {
		if c.pubsub.Load() {
			cs = append(cs, c)
		}
	}
	n.mu.Unlock()
	for _, c := range cs {
		_ = c.Close()
	}
	return len(cs)
}

// heals returns how many gaps c's subscriber healed, by replay or flush.
func heals(c *tiered.Cache[string]) uint64 {
	s := c.Stats()
	return s.GapsReplayed + s.GapsFlushed
}

// loseMessages runs writes while c's subscription (on n) delivers nothing,
// then kills it, so that the writes' messages are lost, and waits for the
// heal.
func loseMessages(t *testing.T, n *advNet, c *tiered.Cache[string], writes func()) {
	t.Helper()
	before := heals(c)
	n.hold()
	writes()
	if n.killPubsub() == 0 {
		t.Fatal("no pub/sub connection to kill")
	}
	n.release()
	awaitStats(t, c, "the gap to heal", func(s tiered.Stats) bool { return s.GapsReplayed+s.GapsFlushed > before })
	awaitL1InUse(t, c)
}

// awaitReplayedHeal kills c's subscription until a gap heals by a replay
// (the first heal, and a gap before the position is known, flush), so that
// c has a position in the log.
func awaitReplayedHeal(t *testing.T, n *advNet, c *tiered.Cache[string]) {
	t.Helper()
	for i := 0; c.Stats().GapsReplayed == 0; i++ {
		if i == 50 {
			t.Fatalf("no gap healed by a replay after 50 gaps: %+v", c.Stats())
		}
		loseMessages(t, n, c, func() {})
	}
}

// mustServe fails unless c answers want for key, from either tier.
func mustServe(t *testing.T, c *tiered.Cache[string], key, want, when string) {
	t.Helper()
	v, local, err := getFrom(c, key)
	if err != nil || v != want {
		t.Fatalf("%s: %s = %s (from L1: %v); want %q", when, key, describe(v, err), local, want)
	}
}

// inL1 waits until c serves key from L1 (ristretto buffers new keys) and
// fails unless the value is want.
func inL1(t *testing.T, c *tiered.Cache[string], key, want string) {
	t.Helper()
	awaitCond(t, 5*time.Second, key+" = "+want+" in L1", func() bool {
		v, local, err := getFrom(c, key)
		return err == nil && v == want && local
	})
}

// pipelineGate holds, before it is sent, the first pipeline that holds a
// command named name, until release.
type pipelineGate struct {
	name    string
	reached chan struct{}
	release chan struct{}
	done    chan struct{}
	once    sync.Once
}

func newPipelineGate(name string) *pipelineGate {
	return &pipelineGate{name: name, reached: make(chan struct{}), release: make(chan struct{}), done: make(chan struct{})}
}

func (g *pipelineGate) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (g *pipelineGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }

func (g *pipelineGate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if cmd.Name() != g.name {
				continue
			}
			first := false
			g.once.Do(func() { first = true })
			if !first {
				break
			}
			close(g.reached)
			<-g.release
			err := next(ctx, cmds)
			close(g.done)
			return err
		}
		return next(ctx, cmds)
	}
}

// TestAdversarialLogAPositionReadFromTheLogTailCoversOnlyMessagesAlreadyApplied:
// after a flush heal the reader reads the log's tail as its position. A
// write that Redis ran before that read, whose message was still on its
// way to the reader when a gap lost it, is in the log before the position:
// a replay from there must not skip it. The reader filled k before the
// write; after the gap it must not serve the old value.
func TestAdversarialLogAPositionReadFromTheLogTailCoversOnlyMessagesAlreadyApplied(t *testing.T) {
	ctx := context.Background()
	addr := privateRedis(t)
	ns := advNamespace(t)
	w := advCache(t, plainClient(t, addr), ns, tiered.Options{})
	if err := w.Set(ctx, "k", "old"); err != nil {
		t.Fatal(err)
	}
	n := newAdvNet(addr)
	rdb := n.client(t)
	gate := newPipelineGate("xrevrange")
	rdb.AddHook(gate)
	r := advCache(t, rdb, ns, tiered.Options{})
	<-gate.reached // the first heal flushed; its tail read waits
	mustServe(t, r, "k", "old", "before the gap")
	inL1(t, r, "k", "old")

	n.hold()
	if err := w.Set(ctx, "k", "new"); err != nil {
		t.Fatal(err)
	}
	close(gate.release) // the tail read runs after the write
	<-gate.done
	if n.killPubsub() == 0 {
		t.Fatal("no pub/sub connection to kill")
	}
	n.release()
	awaitStats(t, r, "the gap to heal", func(s tiered.Stats) bool { return s.GapsReplayed+s.GapsFlushed > 0 })
	awaitL1InUse(t, r)
	mustServe(t, r, "k", "new", "after the heal")
}

// TestAdversarialLogAWriteOfAnInstanceWithoutTheLogLostInAGapIsNotServedOver:
// an instance with InvalidationLog -1 writes k while the reader's
// subscription is down. Its message is lost and the log has no entry of
// it; the reader must still not serve the old value after the heal.
func TestAdversarialLogAWriteOfAnInstanceWithoutTheLogLostInAGapIsNotServedOver(t *testing.T) {
	ctx := context.Background()
	addr := privateRedis(t)
	ns := advNamespace(t)
	unlogged := advCache(t, plainClient(t, addr), ns, tiered.Options{InvalidationLog: -1})
	if err := unlogged.Set(ctx, "k", "old"); err != nil {
		t.Fatal(err)
	}
	n := newAdvNet(addr)
	r := advCache(t, n.client(t), ns, tiered.Options{})
	awaitReplayedHeal(t, n, r)
	mustServe(t, r, "k", "old", "before the gap")
	inL1(t, r, "k", "old")
	loseMessages(t, n, r, func() {
		if err := unlogged.Set(ctx, "k", "new"); err != nil {
			t.Fatal(err)
		}
	})
	mustServe(t, r, "k", "new", "after the heal")
}

// TestAdversarialLogWritesOfEveryKindLostInAGapAreNotServedOverAfterAReplay:
// while the reader's subscription is down, another instance Sets a small
// value (carried with its message), a large one (not carried), Deletes
// many keys in one call and refreshes a value (RefreshAfter write-back).
// The heal replays the log; none of the old values may be served after it,
// and the keys nobody wrote stay in L1.
func TestAdversarialLogWritesOfEveryKindLostInAGapAreNotServedOverAfterAReplay(t *testing.T) {
	ctx := context.Background()
	addr := privateRedis(t)
	ns := advNamespace(t)
	const refreshAfter = 50 * time.Millisecond
	w := advCache(t, plainClient(t, addr), ns, tiered.Options{RefreshAfter: refreshAfter})
	n := newAdvNet(addr)
	r := advCache(t, n.client(t), ns, tiered.Options{RefreshAfter: time.Hour})
	big := strings.Repeat("x", 10<<10)
	keys := []string{"small", "big", "refreshed", "untouched"}
	for i := range 20 {
		keys = append(keys, "deleted"+strconv.Itoa(i))
	}
	for _, k := range keys {
		if err := w.Set(ctx, k, "old"); err != nil {
			t.Fatal(err)
		}
	}
	awaitReplayedHeal(t, n, r)
	for _, k := range keys {
		inL1(t, r, k, "old")
	}
	replayed := r.Stats().GapsReplayed
	loseMessages(t, n, r, func() {
		if err := w.Set(ctx, "small", "new"); err != nil {
			t.Fatal(err)
		}
		if err := w.Set(ctx, "big", big); err != nil {
			t.Fatal(err)
		}
		if err := w.Delete(ctx, keys[4:]...); err != nil {
			t.Fatal(err)
		}
		started := w.Stats().RefreshesStarted
		awaitCond(t, 5*time.Second, "a refresh of the value", func() bool {
			v, err := w.GetOrLoad(ctx, "refreshed", func(context.Context, string) (string, error) { return "new", nil })
			if err != nil || v != "old" && v != "new" {
				t.Fatalf("refreshing GetOrLoad = %s", describe(v, err))
			}
			return w.Stats().RefreshesStarted > started
		})
		awaitCond(t, 5*time.Second, "the refresh's write-back", func() bool {
			v, err := plainClient(t, addr).Get(ctx, ns+":refreshed").Result()
			return err == nil && strings.HasSuffix(v, "new")
		})
	})
	if r.Stats().GapsReplayed == replayed {
		t.Fatalf("the gap was not replayed: %+v", r.Stats())
	}
	mustServe(t, r, "small", "new", "after the heal")
	mustServe(t, r, "big", big, "after the heal")
	mustServe(t, r, "refreshed", "new", "after the heal")
	for _, k := range keys[4:] {
		if v, local, err := getFrom(r, k); !errors.Is(err, tiered.ErrNotFound) {
			t.Fatalf("after the heal: deleted %s = %s (from L1: %v)", k, describe(v, err), local)
		}
	}
	if _, local, _ := getFrom(r, "untouched"); !local {
		t.Errorf("untouched key not served from L1 after a replayed heal")
	}
}

// TestAdversarialLogAForeignValueUnderTheLogKeyMakesGapsFlush: a hash or a
// string under the log key. Writes still succeed, and a gap heals by a
// flush (never by serving what its lost messages replaced), again and again.
func TestAdversarialLogAForeignValueUnderTheLogKeyMakesGapsFlush(t *testing.T) {
	for _, foreign := range []string{"hash", "string"} {
		t.Run(foreign, func(t *testing.T) {
			ctx := context.Background()
			addr := privateRedis(t)
			ns := advNamespace(t)
			admin := plainClient(t, addr)
			w := advCache(t, plainClient(t, addr), ns, tiered.Options{})
			n := newAdvNet(addr)
			r := advCache(t, n.client(t), ns, tiered.Options{})
			awaitReplayedHeal(t, n, r)
			logKey := "tiered:log:" + ns
			if err := admin.Del(ctx, logKey).Err(); err != nil {
				t.Fatal(err)
			}
			var err error
			if foreign == "hash" {
				err = admin.HSet(ctx, logKey, "f", "v").Err()
			} else {
				err = admin.Set(ctx, logKey, "not a stream", 0).Err()
			}
			if err != nil {
				t.Fatal(err)
			}
			for i := range 3 {
				v := "v" + strconv.Itoa(i)
				if err := w.Set(ctx, "k", v); err != nil {
					t.Fatalf("Set with a %s under the log key: %v", foreign, err)
				}
				inL1(t, r, "k", v)
				loseMessages(t, n, r, func() {
					if err := w.Set(ctx, "k", v+"-lost"); err != nil {
						t.Fatal(err)
					}
				})
				mustServe(t, r, "k", v+"-lost", "after heal "+strconv.Itoa(i))
			}
			if s := r.Stats(); s.GapsReplayed != 1 {
				t.Errorf("a gap was replayed from a %s: %+v", foreign, s)
			}
		})
	}
}

// TestAdversarialLogTwoNamespacesOnOneClientRestoreOnlyIfBothReplay: one
// client, one subscriber, two namespaces. A gap loses a write of each;
// the log of one is deleted meanwhile. The heal must flush (neither may
// restore), and the other namespace's lost write must not be served over.
func TestAdversarialLogTwoNamespacesOnOneClientRestoreOnlyIfBothReplay(t *testing.T) {
	ctx := context.Background()
	addr := privateRedis(t)
	ns1, ns2 := advNamespace(t)+"-1", advNamespace(t)+"-2"
	admin := plainClient(t, addr)
	w1 := advCache(t, plainClient(t, addr), ns1, tiered.Options{})
	w2 := advCache(t, plainClient(t, addr), ns2, tiered.Options{})
	n := newAdvNet(addr)
	rdb := n.client(t)
	r1 := advCache(t, rdb, ns1, tiered.Options{})
	r2 := advCache(t, rdb, ns2, tiered.Options{})
	// Both logs must exist with a position: a write in each, then a gap.
	for i := 0; ; i++ {
		if err := w1.Set(ctx, "k", "old"); err != nil {
			t.Fatal(err)
		}
		if err := w2.Set(ctx, "k", "old"); err != nil {
			t.Fatal(err)
		}
		replayed := r1.Stats().GapsReplayed
		loseMessages(t, n, r1, func() {})
		if r1.Stats().GapsReplayed > replayed {
			break
		}
		if i == 50 {
			t.Fatalf("no replayed gap: %+v", r1.Stats())
		}
	}
	inL1(t, r1, "k", "old")
	inL1(t, r2, "k", "old")
	loseMessages(t, n, r1, func() {
		if err := w1.Set(ctx, "k", "new"); err != nil {
			t.Fatal(err)
		}
		if err := w2.Set(ctx, "k", "new"); err != nil {
			t.Fatal(err)
		}
		if err := admin.Del(ctx, "tiered:log:"+ns1).Err(); err != nil {
			t.Fatal(err)
		}
	})
	mustServe(t, r1, "k", "new", "after the heal")
	mustServe(t, r2, "k", "new", "after the heal")
	if s := r1.Stats(); s.GapsFlushed == 0 {
		t.Errorf("one log could not be replayed, yet no heal flushed: %+v", s)
	}
}
