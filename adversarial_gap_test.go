package tiered

// Adversarial tests of the subscription's prompt redial: after a receive
// error the receive loop reads again at once, and only an error within
// retryPause of the one before waits retryPause. Each test attacks the
// heal that now comes sooner (kills in rapid succession, a kill during a
// replay, a restart right after a kill, many Caches on one client), the
// bound on a failed read whose redial is slow, or the loop's pacing
// (Redis down, a connection that dies right after it subscribed).
// All run on private redis-servers; they use the public API but for the
// shared helpers' readiness and log-position waits.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// gapWrite is the last value a writer stored under a key, and when its Set
// returned.
type gapWrite struct {
	n  int
	at time.Time
}

// gapBook records, per key, the last write whose Set returned.
type gapBook struct {
	mu sync.Mutex
	m  map[string]gapWrite
}

func (b *gapBook) put(k string, n int) {
	b.mu.Lock()
	b.m[k] = gapWrite{n, time.Now()}
	b.mu.Unlock()
}

func (b *gapBook) get(k string) gapWrite {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.m[k]
}

// stormCase is one namespace of a kill storm: a writer on its own client
// and a reader on the victim's client.
type stormCase struct {
	w, r *Cache[string]
	book *gapBook
}

// runKillStorm starts nsCount namespaces, each with a writer on a direct
// client and a reader on one shared client behind a proxy (so a storm of
// kills hits the readers' one subscription only). It runs, for d, a writer
// per namespace, readers, and a killer that every few ms either kills the
// readers' subscription or holds it, lets a write's message get stuck in
// the proxy, and kills it (the message is lost). Readers fail if L1 serves
// a value older than one whose Set returned more than bound before the
// read began. Then it stops, lets the subscription heal, and checks that
// every key serves its last value, from L1 once it is there.
func runKillStorm(t *testing.T, nsCount int, d, maxPause time.Duration) {
	ctx := context.Background()
	const interval = 100 * time.Millisecond
	// README bound: a kill is noticed at once; 4 × HeartbeatInterval is the
	// bound for a silent stall, used here as a generous allowance.
	const bound = 4 * interval
	const keys = 20
	srv := startRedisServer(t)
	proxy := startProxy(t, srv.Addr)
	shared := redis.NewClient(&redis.Options{Addr: proxy.Addr})
	t.Cleanup(func() { _ = shared.Close() })

	cases := make([]*stormCase, nsCount)
	for i := range cases {
		opts := Options{HeartbeatInterval: interval}
		w := newTestCache[string](t, clientOn(t, srv.Addr), opts)
		opts.Namespace = w.opts.Namespace
		r := newTestCache[string](t, shared, opts)
		c := &stormCase{w: w, r: r, book: &gapBook{m: map[string]gapWrite{}}}
		for k := range keys {
			key := "k" + strconv.Itoa(k)
			if err := w.Set(ctx, key, "0"); err != nil {
				t.Fatal(err)
			}
			c.book.put(key, 0)
		}
		awaitReceived(t, r, keys)
		for k := range keys {
			mustHoldInL1(t, r, "k"+strconv.Itoa(k), "0")
		}
		awaitLogPosition(t, r)
		cases[i] = c
	}
	before := cases[0].r.Stats()

	var stop atomic.Bool
	var wg sync.WaitGroup
	var failMu sync.Mutex
	var fails []string
	fail := func(s string) {
		failMu.Lock()
		if len(fails) < 10 {
			fails = append(fails, s)
		}
		failMu.Unlock()
	}
	var l1Hits, stormReads atomic.Uint64
	for ci, c := range cases {
		wg.Add(2)
		go func() { // writer
			defer wg.Done()
			next := make(map[string]int)
			for !stop.Load() {
				key := "k" + strconv.Itoa(rand.IntN(keys))
				next[key]++
				if err := c.w.Set(ctx, key, strconv.Itoa(next[key])); err != nil {
					fail(fmt.Sprintf("ns %d: Set(%s): %v", ci, key, err))
					return
				}
				c.book.put(key, next[key])
				time.Sleep(time.Duration(rand.IntN(500)) * time.Microsecond)
			}
		}()
		go func() { // reader
			defer wg.Done()
			for !stop.Load() {
				key := "k" + strconv.Itoa(rand.IntN(keys))
				last := c.book.get(key)
				began := time.Now()
				v, src, err := c.r.GetFrom(ctx, key)
				if err != nil {
					continue // Redis reads may fail while connections are killed
				}
				stormReads.Add(1)
				time.Sleep(20 * time.Microsecond) // leave the killer some CPU
				if src != SourceLocal {
					continue
				}
				l1Hits.Add(1)
				n, _ := strconv.Atoi(v)
				if n < last.n && began.Sub(last.at) > bound {
					fail(fmt.Sprintf("ns %d: L1 served %s = %d, %v after Set(%s, %d) returned (bound %v)",
						ci, key, n, began.Sub(last.at), key, last.n, bound))
				}
			}
		}()
	}
	var kills, rounds atomic.Int64
	wg.Add(1)
	go func() { // killer
		defer wg.Done()
		for !stop.Load() {
			rounds.Add(1)
			if rand.IntN(2) == 0 {
				kills.Add(int64(proxy.KillSubscribers()))
			} else {
				proxy.StallSubscribers()
				time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
				kills.Add(int64(proxy.KillSubscribers()))
				proxy.Resume()
			}
			// Half the pauses are short (a burst), half up to maxPause: a
			// burst of kills within retryPause makes the receive loop wait
			// (it must not redial in a loop), and the longer pauses let it
			// heal, so that heals and replays race the next kill.
			pause := 5 * time.Millisecond
			if rand.IntN(2) == 0 {
				pause = maxPause
			}
			time.Sleep(time.Millisecond + rand.N(pause-time.Millisecond))
		}
	}()
	time.Sleep(d) // let the storm run
	stop.Store(true)
	wg.Wait()
	proxy.Resume()
	for _, f := range fails {
		t.Error(f)
	}
	after := cases[0].r.Stats()
	t.Logf("storm: %d kill rounds, %d connections killed, %d gaps, %d replayed, %d flushed; %d reads, %d from L1",
		rounds.Load(), kills.Load(), after.SubscriptionGaps-before.SubscriptionGaps, after.GapsReplayed-before.GapsReplayed,
		after.GapsFlushed-before.GapsFlushed, stormReads.Load(), l1Hits.Load())
	if kills.Load() < 20 || after.GapsReplayed-before.GapsReplayed < 5 {
		t.Errorf("%d connections killed, %d gaps replayed: the attack did not run (want ≥ 20 and ≥ 5)",
			kills.Load(), after.GapsReplayed-before.GapsReplayed)
	}

	// Quiesce: the reader is healthy, and a write made now has been applied
	// (so every earlier message has, or the heal replayed it).
	if err := cases[0].r.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	for ci, c := range cases {
		got := c.r.Stats().InvalidationsReceived
		if err := c.w.Set(ctx, "fence", "x"); err != nil {
			t.Fatal(err)
		}
		awaitReceived(t, c.r, got+1)
		for k := range keys {
			key := "k" + strconv.Itoa(k)
			want := strconv.Itoa(c.book.get(key).n)
			v, src, err := c.r.GetFrom(ctx, key)
			if err != nil || v != want {
				t.Errorf("ns %d after the storm: %s = %q (%v), %v; want %q", ci, key, v, src, err, want)
				continue
			}
			mustHoldInL1(t, c.r, key, want)
		}
	}
}

// TestGapKillStormWhileAnotherInstanceWritesServesNoOverwrittenValue:
// kills (and holds-then-kills, losing messages stuck in the proxy) of the
// reader's subscription, in bursts 1-5 ms apart and with pauses up to
// 150 ms, while another instance writes the keys the reader holds in L1.
// With the immediate re-read, heals (and replays) race the next kill.
func TestGapKillStormWhileAnotherInstanceWritesServesNoOverwrittenValue(t *testing.T) {
	runKillStorm(t, 1, 3*time.Second, 150*time.Millisecond)
}

// TestGapKillStormOnManyCachesSharingOneClient: the same storm on four
// Caches (four namespaces) sharing the reader's client and so its one
// subscription; each namespace's log is replayed at every heal, four logs
// one after the other, which the next kill races.
func TestGapKillStormOnManyCachesSharingOneClient(t *testing.T) {
	runKillStorm(t, 4, 3*time.Second, 150*time.Millisecond)
}

// gapGate holds, before it is sent, the first pipeline holding an XRANGE
// after arm (a replay's read of the log), until release.
type gapGate struct {
	armed   atomic.Bool
	reached chan struct{}
	release chan struct{}
	done    chan struct{}
}

func newGapGate() *gapGate {
	return &gapGate{reached: make(chan struct{}), release: make(chan struct{}), done: make(chan struct{})}
}

func (g *gapGate) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (g *gapGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }

func (g *gapGate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if cmd.Name() == "xrange" && g.armed.CompareAndSwap(true, false) {
				close(g.reached)
				<-g.release
				err := next(ctx, cmds)
				close(g.done)
				return err
			}
		}
		return next(ctx, cmds)
	}
}

// loseOne holds r's subscription (through proxy), runs write, whose
// message gets stuck in the proxy, and kills the subscription: the
// message is lost.
func loseOne(t *testing.T, proxy *tcpProxy, write func()) {
	t.Helper()
	proxy.StallSubscribers()
	write()
	if n := proxy.KillSubscribers(); n == 0 {
		t.Fatal("no subscriber connection to kill")
	}
	proxy.Resume()
}

// TestGapKillDuringAReplayLosesNothing: a write's message is lost in gap
// 1; the heal's replay is held before it reads the log; meanwhile a write
// arrives live, and a third is lost in gap 2. After the replay and the
// second heal, no old value may be served, and an untouched key is still
// served from L1 (the heal was a replay).
func TestGapKillDuringAReplayLosesNothing(t *testing.T) {
	ctx := context.Background()
	srv := startRedisServer(t)
	proxy := startProxy(t, srv.Addr)
	gate := newGapGate()
	rdbB := redis.NewClient(&redis.Options{Addr: proxy.Addr})
	rdbB.AddHook(gate)
	t.Cleanup(func() { _ = rdbB.Close() })
	a := newTestCache[string](t, clientOn(t, srv.Addr), Options{})
	b := newTestCache[string](t, rdbB, Options{Namespace: a.opts.Namespace})
	for _, k := range []string{"held", "k1", "k2", "k3"} {
		if err := a.Set(ctx, k, "old"); err != nil {
			t.Fatal(err)
		}
	}
	awaitReceived(t, b, 4)
	awaitLogPosition(t, b)
	for _, k := range []string{"held", "k1", "k2", "k3"} {
		mustHoldInL1(t, b, k, "old")
	}
	st := b.Stats()

	gate.armed.Store(true)
	loseOne(t, proxy, func() {
		if err := a.Set(ctx, "k1", "new"); err != nil {
			t.Fatal(err)
		}
	})
	<-gate.reached // the heal's replay waits
	got := b.Stats().InvalidationsReceived
	if err := a.Set(ctx, "k2", "new"); err != nil {
		t.Fatal(err)
	}
	awaitReceived(t, b, got+1)
	gapCalls := b.sub.gapCount.Load() // no Stats counter moves for a gap while unhealthy
	loseOne(t, proxy, func() {
		if err := a.Set(ctx, "k3", "new"); err != nil {
			t.Fatal(err)
		}
	})
	waitUntil(t, invWait, "gap 2 noticed", func() bool { return b.sub.gapCount.Load() > gapCalls })
	close(gate.release)
	<-gate.done
	if err := b.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"k1", "k2", "k3"} {
		flushL1Buffer(b)
		v, src, err := b.GetFrom(ctx, k)
		if err != nil || v != "new" {
			t.Errorf("after the heals: %s = %q (%v), %v; want \"new\"", k, v, src, err)
		}
	}
	now := b.Stats()
	t.Logf("gaps %d, replayed %d, flushed %d", now.SubscriptionGaps-st.SubscriptionGaps,
		now.GapsReplayed-st.GapsReplayed, now.GapsFlushed-st.GapsFlushed)
	if now.GapsReplayed != st.GapsReplayed+1 || now.GapsFlushed != st.GapsFlushed {
		t.Errorf("%d gaps replayed, %d flushed; want 1, 0 (the held replay gave way to a second)",
			now.GapsReplayed-st.GapsReplayed, now.GapsFlushed-st.GapsFlushed)
	}
	mustHoldInL1(t, b, "held", "old")
}

// TestGapRestartRightAfterAKillNeverServesWhatTheOldServerHeld: the
// reader's subscription is killed and Redis restarted (empty, a new
// run_id) at once, so the kill's heal and replay race the restart. Once
// bound 2 of the README has passed (4 × HeartbeatInterval, plus an
// allowance), neither instance may serve, from L1, a value the new server
// never had. Repeated a few times, each with a fresh position.
func TestGapRestartRightAfterAKillNeverServesWhatTheOldServerHeld(t *testing.T) {
	ctx := context.Background()
	srv := startRedisServer(t)
	admin := clientOn(t, srv.Addr)
	opts := Options{HeartbeatInterval: 100 * time.Millisecond}
	cs := newInstances[string](t, 2, dialerOn(t, srv.Addr), opts)
	a, b := cs[0], cs[1]
	for round := range 4 {
		want := "v" + strconv.Itoa(round)
		waitUntil(t, invWait, "a Set to succeed", func() bool { return a.Set(ctx, "k", want) == nil })
		for _, c := range cs {
			if err := c.WaitReady(ctx); err != nil {
				t.Fatal(err)
			}
			mustHoldInL1(t, c, "k", want)
			awaitLogPosition(t, c)
		}
		if round > 0 {
			// Make sure a replay would be attempted (a heal after the
			// first flushed one): a plain kill first.
			g := b.Stats().GapsReplayed
			killPubsub(t, admin)
			waitUntil(t, invWait, "a replayed heal", func() bool { return b.Stats().GapsReplayed > g && b.Ready() })
			mustHoldInL1(t, b, "k", want)
		}
		_ = admin.ClientKillByFilter(ctx, "TYPE", "pubsub").Err()
		killed := time.Now()
		srv.Restart()
		restarted := time.Now()
		// go-redis redials inside the read that failed, before the gap
		// is known: bound 2 of the README (4 × HeartbeatInterval) applies,
		// plus an allowance for -race on 2 shared cores.
		bound := 4*opts.HeartbeatInterval + 250*time.Millisecond
		for deadline := killed.Add(bound + 500*time.Millisecond); time.Now().Before(deadline); {
			for i, c := range cs {
				started := time.Now()
				v, src, err := c.GetFrom(ctx, "k")
				if err == nil && v == want && started.Sub(killed) > bound {
					t.Fatalf("round %d: instance %d served %q (from %v) %v after Redis restarted empty; epoch %d, gap calls %d, stats %+v",
						round, i, v, src, time.Since(restarted), c.sub.epoch.Load(), c.sub.gapCount.Load(), c.Stats())
				}
			}
		}
	}
}

// countingDialer returns a Dialer that counts its calls in n.
func countingDialer(n *atomic.Int64) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		n.Add(1)
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
}

// TestGapRedisDownTheLoopDoesNotSpin: while Redis is down, an idle Cache
// keeps redialling, but at a modest rate (the old code: about one receive
// dial per retryPause, plus one per heartbeat).
func TestGapRedisDownTheLoopDoesNotSpin(t *testing.T) {
	srv := startRedisServer(t)
	var dials atomic.Int64
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr, Dialer: countingDialer(&dials)})
	t.Cleanup(func() { _ = rdb.Close() })
	c := newTestCache[string](t, rdb, Options{})
	gaps := c.Stats().SubscriptionGaps
	srv.Stop()
	waitUntil(t, invWait, "the outage noticed", func() bool { return c.Stats().SubscriptionGaps > gaps })
	start := dials.Load()
	time.Sleep(time.Second) // let time pass
	n := dials.Load() - start
	t.Logf("%d dials in 1 s with Redis down", n)
	if n > 50 {
		t.Errorf("%d dials in 1 s with Redis down: the loop spins", n)
	}
}

// TestGapASubscriptionThatDiesRightAfterSubscribingDoesNotMakeTheLoopSpin:
// every new pub/sub connection delivers its SUBSCRIBE confirmation (a
// successful read between two failures: pausing only after two failed
// reads in a row never paused here) and then dies. The loop must still pace its redials as it does while Redis is
// down, not redial as fast as the network allows; and once the connection
// stops flapping the Cache must heal.
func TestGapASubscriptionThatDiesRightAfterSubscribingDoesNotMakeTheLoopSpin(t *testing.T) {
	ctx := context.Background()
	srv := startRedisServer(t)
	p := startProxy(t, srv.Addr)
	rdb := redis.NewClient(&redis.Options{Addr: p.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	c := newTestCache[string](t, rdb, Options{})
	if err := c.Set(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	gaps := c.Stats().SubscriptionGaps
	p.flapping.Store(true)
	// Kick the current connection: the next confirmation (of the rebuild
	// or reconnect) starts the flapping.
	_ = clientOn(t, srv.Addr).ClientKillByFilter(ctx, "TYPE", "pubsub").Err()
	waitUntil(t, invWait, "the gap noticed", func() bool { return c.Stats().SubscriptionGaps > gaps })
	start := p.subscribers.Load()
	time.Sleep(time.Second) // let time pass
	n := p.subscribers.Load() - start
	t.Logf("%d pub/sub connections in 1 s while each dies right after subscribing", n)
	if n > 50 {
		t.Errorf("%d pub/sub connections in 1 s: the receive loop redials without pause", n)
	}
	if c.Ready() {
		t.Error("ready while every subscription dies at once")
	}
	p.flapping.Store(false)
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	mustHoldInL1(t, c, "k", "v")
}

// infoStat returns the integer field name of INFO stats.
func infoStat(t *testing.T, admin *redis.Client, name string) int64 {
	t.Helper()
	text, err := admin.Info(context.Background(), "stats").Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(text, "\r\n") {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	t.Fatalf("INFO stats has no %s", name)
	return 0
}

// TestGapOutputBufferKillsUnderAWriteStreamDoNotMakeTheLoopRedialWithoutPause:
// the same pacing attack on a real server: every message of the namespace
// is larger than the subscriber's output-buffer limit, so Redis drops the
// subscription at each write, after its SUBSCRIBE was confirmed. While
// another instance writes every ~1 ms, the reader's reconnections (INFO
// stats total_connections_received) must stay near one per retryPause.
func TestGapOutputBufferKillsUnderAWriteStreamDoNotMakeTheLoopRedialWithoutPause(t *testing.T) {
	ctx := context.Background()
	srv := startRedisServer(t, "--client-output-buffer-limit", "pubsub 4kb 4kb 0")
	admin := clientOn(t, srv.Addr)
	opts := Options{PublishValueMaxBytes: 64 << 10}
	w := newTestCache[string](t, clientOn(t, srv.Addr), opts)
	opts.Namespace = w.opts.Namespace
	r := newTestCache[string](t, clientOn(t, srv.Addr), opts)
	big := strings.Repeat("x", 32<<10) // each message ~32 KiB > 4 KiB
	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			_ = w.Set(ctx, "k"+strconv.Itoa(i%10), big)
			time.Sleep(time.Millisecond)
		}
	}()
	gaps := r.Stats().SubscriptionGaps
	waitUntil(t, invWait, "the reader's subscription dropped", func() bool { return r.Stats().SubscriptionGaps > gaps })
	conns := infoStat(t, admin, "total_connections_received")
	drops := int64(r.sub.gapCount.Load()) // Stats counts no gap while unhealthy
	time.Sleep(time.Second)               // let time pass
	conns = infoStat(t, admin, "total_connections_received") - conns
	drops = int64(r.sub.gapCount.Load()) - drops
	stop.Store(true)
	wg.Wait()
	t.Logf("in 1 s: %d connections received; the reader saw %d gaps (receive errors and resubscriptions)", conns, drops)
	if drops == 0 {
		t.Fatal("the reader saw no gap: the attack did not run")
	}
	if conns > 50 {
		t.Errorf("%d connections in 1 s (%d gaps seen): the receive loop redials without pause", conns, drops)
	}
}

// TestGapAFailedReadWhoseRedialHangsIsAGapWithinTheBound: the
// subscription's connection is killed while every new connection hangs
// (held by the proxy from its first byte). go-redis redials inside the
// failed read and only then returns its error, which is what declares the
// gap; the redial hangs, and pings wait behind it. The heartbeat must still stop L1's use within bound 2 of the
// README: 4 × HeartbeatInterval.
func TestGapAFailedReadWhoseRedialHangsIsAGapWithinTheBound(t *testing.T) {
	const (
		interval  = 200 * time.Millisecond
		allowance = 250 * time.Millisecond // -race on 2 shared cores
	)
	ctx := context.Background()
	srv := startRedisServer(t)
	proxy := startProxy(t, srv.Addr)
	a := newTestCache[string](t, clientOn(t, proxy.Addr), Options{HeartbeatInterval: interval})
	if err := a.Set(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	mustHoldInL1(t, a, "k", "v")
	proxy.StallAll()
	t.Cleanup(proxy.Resume)
	if proxy.KillSubscribers() == 0 {
		t.Fatal("no subscription to kill")
	}
	killed := time.Now()
	waitUntil(t, invWait, "a to stop using L1", func() bool { return !a.Ready() })
	if d := time.Since(killed); d > 4*interval+allowance {
		t.Errorf("a used L1 for %v after its subscription's connection was killed; the bound is 4 × %v + %v",
			d, interval, allowance)
	}
}

// TestGapAfterARestartAnotherInstancesWriteIsNotServedOver: Redis
// restarts (empty), right after a CLIENT KILL of the subscriptions or
// not; as soon as it answers, instance b writes k. Instance a held k in
// L1; its subscription's connection was reset by the restart before b's
// Set began, an error the README says is noticed at once, and b's message
// never reaches a (a was not subscribed to the new server yet). go-redis
// redials inside the read that failed and returns its error only then, so
// a may serve the old value while the new server is coming up, but no
// longer than bound 2 of the README (4 × HeartbeatInterval) after its
// connection was reset.
func TestGapAfterARestartAnotherInstancesWriteIsNotServedOver(t *testing.T) {
	for _, kill := range []bool{false, true} {
		t.Run(fmt.Sprintf("kill first %v", kill), func(t *testing.T) {
			ctx := context.Background()
			srv := startRedisServer(t)
			admin := clientOn(t, srv.Addr)
			cs := newInstances[string](t, 2, dialerOn(t, srv.Addr), Options{})
			a, b := cs[0], cs[1]
			if err := a.Set(ctx, "k", "old"); err != nil {
				t.Fatal(err)
			}
			mustHoldInL1(t, a, "k", "old")
			awaitLogPosition(t, a)
			if kill {
				_ = admin.ClientKillByFilter(ctx, "TYPE", "pubsub").Err()
			}
			reset := time.Now()
			srv.Restart()
			waitUntil(t, invWait, "b's Set on the new server", func() bool { return b.Set(ctx, "k", "new") == nil })
			wrote := time.Now()
			var stale int
			var last time.Duration
			for {
				v, src, err := a.GetFrom(ctx, "k")
				if err == nil && v == "new" {
					break
				}
				if err == nil && v == "old" {
					stale++
					last = time.Since(wrote)
				}
				if time.Since(wrote) > invWait {
					t.Fatalf("a never served the new value: %q (%v), %v", v, src, err)
				}
			}
			bound := 4*a.opts.HeartbeatInterval + 250*time.Millisecond // + -race on 2 shared cores
			if stale > 0 && wrote.Add(last).Sub(reset) > bound {
				t.Errorf("a served the old value %d times, until %v after b's Set returned, %v after its connection was reset (bound %v)",
					stale, last, wrote.Add(last).Sub(reset), bound)
			}
			t.Logf("a served the old value %d times, until %v after b's Set returned", stale, last)
		})
	}
}
