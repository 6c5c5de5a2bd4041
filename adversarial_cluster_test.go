//go:build unix

package tiered

import (
	"context"
	"errors"
	"net"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Adversarial tests of the Cluster liveness rules, run by TestCluster on
// its shared cluster. Each stalls or breaks the cluster-bus traffic that
// ONE master sends into the node holding a reader's subscription (the bus
// proxy of that node tells the connections apart by the sender's node id in
// the first message), and checks the README's bound: a reader serves an
// overwritten value for at most 4 × HeartbeatInterval after the Set
// returned.

// StallFrom holds, both ways, every connection (present or future) whose
// first message is a cluster-bus message from the node with id: what that
// node sends to the proxy's node over the bus. Others flow.
func (p *tcpProxy) StallFrom(id string) {
	p.setStall(func(c *proxyConn) bool {
		// A cluster-bus message header: "RCmb", totlen, ver, port, type,
		// count, currentEpoch, configEpoch, offset, then the sender's
		// 40-byte name at offset 40.
		return len(c.head) >= 80 && string(c.head[:4]) == "RCmb" && string(c.head[40:80]) == id
	})
}

// KillHeld closes the connections held now, dropping what they hold (a
// link reset by the network), and lets every other connection through.
func (p *tcpProxy) KillHeld() int {
	p.mu.Lock()
	var victims []*proxyConn
	for c := range p.conns {
		if p.stall != nil && p.stall(c) && !c.dead {
			c.dead = true
			victims = append(victims, c)
		}
	}
	p.stall = nil
	p.mu.Unlock()
	p.cond.Broadcast()
	for _, c := range victims {
		_ = c.client.Close()
		_ = c.server.Close()
	}
	return len(victims)
}

// pathState returns what c's subscriber knows of the path from the master at
// addr: the highest heartbeat acknowledged and echoed, the last sent through
// any master, and whether the path is tracked and down.
func pathState(c *Cache[string], addr string) (acked, echoed, sent uint64, tracked, down bool) {
	c.sub.stateMu.Lock()
	defer c.sub.stateMu.Unlock()
	p := c.sub.paths.byAddr[addr]
	if p == nil {
		return 0, 0, c.sub.paths.seq, false, false
	}
	return p.acked, p.echoed, c.sub.paths.seq, true, p.down
}

// busSetup is a writer and a reader, the node holding the reader's
// subscription, and a key whose master is another node, held in the
// reader's L1.
type busSetup struct {
	w, r    *Cache[string]
	subNode string
	master  string // the key's master, not subNode
	key     string
}

func newBusSetup(t *testing.T, tc *testCluster, interval time.Duration, name string) busSetup {
	t.Helper()
	caches := clusterInstances(t, tc, 2, Options{HeartbeatInterval: interval})
	s := busSetup{w: caches[0], r: caches[1]}
	if s.subNode = tc.subscriptionNode(t, s.r); s.subNode == "" {
		t.Fatal("cannot find the node of the reader's subscription")
	}
	for m := range tc.masters(t, tc.live()) {
		if m != s.subNode {
			s.master = m
			break
		}
	}
	slots := tc.slotsOf(t, s.master)
	for i := 0; s.key == ""; i++ {
		if k := name + "-" + strconv.Itoa(i); slots[keySlot(s.r.remote.key(k))] {
			s.key = k
		}
	}
	s.hold(t, "old")
	return s
}

// hold writes v and waits until the reader holds it in L1, its
// subscription healthy.
func (s busSetup) hold(t *testing.T, v string) {
	t.Helper()
	ctx := context.Background()
	if err := s.w.Set(ctx, s.key, v); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the reader to hold "+v+" in L1", func() bool {
		got, err := s.r.Get(ctx, s.key)
		e, ok := s.r.local.get(s.key)
		return err == nil && got == v && ok && e.value == v && s.r.sub.healthy()
	})
}

// lastOld polls the reader until deadline and returns when it last served
// old (zero if never).
func (s busSetup) lastOld(deadline time.Time, old string) time.Time {
	var last time.Time
	for time.Now().Before(deadline) {
		if v, err := s.r.Get(context.Background(), s.key); err == nil && v == old {
			last = time.Now()
		}
		time.Sleep(time.Millisecond) // polling, as waitUntil does
	}
	return last
}

// testClusterStalledBusOneMaster stalls only what the key's master sends
// into the reader's subscription node (the other masters' links, and the
// subscription's own connection, flow): the heartbeats through the other
// masters and the PINGs keep coming back, and must not hide the one path
// that is broken.
func testClusterStalledBusOneMaster(t *testing.T, tc *testCluster) {
	const interval = 100 * time.Millisecond
	const stall = 1200 * time.Millisecond // below cluster-node-timeout (2 s)
	bound := 4*interval + 400*time.Millisecond
	s := newBusSetup(t, tc, interval, "stall-one")
	before := s.r.Stats()
	tc.bus[s.subNode].StallFrom(tc.nodeID(t, s.master))
	stalledAt := time.Now()
	err := s.w.Set(context.Background(), s.key, "new")
	setAt := time.Now()
	last := time.Time{}
	if err == nil {
		last = s.lastOld(stalledAt.Add(stall), "old")
	}
	tc.bus[s.subNode].Resume()
	if err != nil {
		t.Fatalf("Set while one bus link is stalled: %v", err)
	}
	after := s.r.Stats()
	if !last.IsZero() && last.Sub(setAt) > bound {
		t.Errorf("with the bus link from one master (%s) into the subscription's node (%s) stalled, the reader served the overwritten value %v after the Set returned (bound %v; gaps +%d)",
			s.master, s.subNode, last.Sub(setAt).Round(time.Millisecond), bound, after.SubscriptionGaps-before.SubscriptionGaps)
	}
	if after.SubscriptionGaps == before.SubscriptionGaps {
		t.Error("a stalled bus link from one master was not counted as a gap")
	}
	t.Logf("bus link %s -> %s stalled: old value served until %v after the Set (0 = never); gaps +%d",
		s.master, s.subNode, max(last.Sub(setAt), 0).Round(time.Millisecond), after.SubscriptionGaps-before.SubscriptionGaps)
	waitUntil(t, 30*time.Second, "the cluster to be healthy again", func() bool { return tc.healthy(tc.addrs) })
}

// testClusterBusLinkReset stalls what the key's master sends into the
// reader's subscription node for about one HeartbeatInterval (a heartbeat
// through that master is acknowledged meanwhile), then resets that link,
// dropping what it held: the Set's invalidation and the heartbeat are lost,
// the master reconnects at once and the next heartbeats come back, well
// within 3 intervals. A heartbeat that was acknowledged and never came back
// while a later one did was lost: so may have been any invalidation sent
// before it, and the reader must stop serving from L1.
func testClusterBusLinkReset(t *testing.T, tc *testCluster) {
	const interval = time.Second // 3 intervals without an echo: far longer than the reset takes
	bound := 4*interval + 500*time.Millisecond
	s := newBusSetup(t, tc, interval, "bus-reset")
	// Start the stall right after a heartbeat through the master came back.
	waitUntil(t, 10*time.Second, "a heartbeat through "+s.master+" to come back", func() bool {
		_, echoed, sent, _, _ := pathState(s.r, s.master)
		return echoed != 0 && echoed == sent
	})
	before := s.r.Stats()
	tc.bus[s.subNode].StallFrom(tc.nodeID(t, s.master))
	err := s.w.Set(context.Background(), s.key, "new")
	setAt := time.Now()
	if err != nil {
		tc.bus[s.subNode].Resume()
		t.Fatalf("Set while the bus link is stalled: %v", err)
	}
	waitUntil(t, 5*time.Second, "a heartbeat through "+s.master+" to be acknowledged and held", func() bool {
		acked, echoed, _, _, _ := pathState(s.r, s.master)
		return acked > echoed
	})
	if n := tc.bus[s.subNode].KillHeld(); n == 0 {
		t.Fatal("no bus connection was held")
	}
	last := s.lastOld(setAt.Add(bound+time.Second), "old")
	after := s.r.Stats()
	if !last.IsZero() && last.Sub(setAt) > bound {
		t.Errorf("after a reset of the bus link %s -> %s that lost the Set's invalidation and an acknowledged heartbeat, the reader served the overwritten value %v after the Set returned (bound %v; gaps +%d)",
			s.master, s.subNode, last.Sub(setAt).Round(time.Millisecond), bound, after.SubscriptionGaps-before.SubscriptionGaps)
	}
	t.Logf("bus link %s -> %s reset after a stall: old value served until %v after the Set (0 = never); gaps +%d",
		s.master, s.subNode, max(last.Sub(setAt), 0).Round(time.Millisecond), after.SubscriptionGaps-before.SubscriptionGaps)
	waitUntil(t, 30*time.Second, "the cluster to be healthy again", func() bool { return tc.healthy(tc.addrs) })
	s.r.local.invalidate(s.key)
}

// testClusterNewMasterStall promotes a replica by hand (CLUSTER FAILOVER:
// no write is lost), and stalls what the new master sends into the reader's
// subscription node right after the reader's subscriber first saw it in the
// slot map (and flushed L1 for the change of masters). A write through the
// new master must not be hidden: the new master has 3 intervals to echo,
// like any other.
func testClusterNewMasterStall(t *testing.T, tc *testCluster) {
	ctx := context.Background()
	const interval = 100 * time.Millisecond
	const stall = 1200 * time.Millisecond
	bound := 4*interval + 400*time.Millisecond
	s := newBusSetup(t, tc, interval, "new-master")
	replica := tc.masters(t, s.master)[s.master]
	if replica == "" {
		t.Fatalf("master %s has no replica", s.master)
	}
	// The reader read the key from the old master, which its subscriber
	// knew (it serves L1 only once it knows the masters): the change of
	// masters must flush L1.
	if _, _, _, tracked, _ := pathState(s.r, s.master); !tracked {
		t.Fatalf("the reader serves L1 without knowing the master %s of what it holds", s.master)
	}
	flushes := s.r.Stats().Flushes
	if err := tc.node(t, replica).Do(ctx, "cluster", "failover").Err(); err != nil {
		t.Fatalf("CLUSTER FAILOVER on %s: %v", replica, err)
	}
	waitUntil(t, 20*time.Second, "the reader's subscriber to track the new master "+replica+" and flush L1", func() bool {
		_, _, _, tracked, _ := pathState(s.r, replica)
		return tracked && s.r.Stats().Flushes > flushes
	})
	tc.bus[s.subNode].StallFrom(tc.nodeID(t, replica))
	stalledAt := time.Now()
	// The reader reads the key from the new master (its L1 was flushed).
	var readErr error
	if v, err := s.r.Get(ctx, s.key); err != nil || v != "old" {
		readErr = err
	}
	err := s.w.Set(ctx, s.key, "new")
	setAt := time.Now()
	var last time.Time
	if err == nil {
		last = s.lastOld(stalledAt.Add(stall), "old")
	}
	tc.bus[s.subNode].Resume()
	if err != nil || readErr != nil {
		t.Fatalf("Get (%v) or Set (%v) of a key on the new master", readErr, err)
	}
	if !last.IsZero() && last.Sub(setAt) > bound {
		t.Errorf("with the bus link from the new master %s stalled right after it joined the slot map, the reader served the overwritten value %v after the Set returned (bound %v)",
			replica, last.Sub(setAt).Round(time.Millisecond), bound)
	}
	t.Logf("new master %s, its bus link stalled at once: old value served until %v after the Set (0 = never)",
		replica, max(last.Sub(setAt), 0).Round(time.Millisecond))
	waitUntil(t, 30*time.Second, "the cluster to be healthy again", func() bool { return tc.healthy(tc.addrs) })
}

// testClusterWaitReplicasTryAgain deletes, with WaitReplicas, a key x and
// the two keys of a half-migrated slot, all on one master whose replica is
// stopped: the pipeline runs x's script, gets TRYAGAIN for the other, and
// WAIT finds no replica. The migration then completes, so the retry of the
// TRYAGAIN script succeeds on the slot's new master (MOVED), whose replica
// is up. x was deleted on its master only: the Delete must say so, not
// return nil. x's script comes first in the pipeline, or last: go-redis
// sends a whole pipeline again when its first reply is TRYAGAIN, which
// must not run x's script twice.
func testClusterWaitReplicasTryAgain(t *testing.T, tc *testCluster) {
	t.Run("KeyFirst", func(t *testing.T) { testWaitReplicasTryAgain(t, tc, true) })
	t.Run("KeyLast", func(t *testing.T) { testWaitReplicasTryAgain(t, tc, false) })
}

func testWaitReplicasTryAgain(t *testing.T, tc *testCluster, xFirst bool) {
	ctx := context.Background()
	cc := tc.client(t)
	c := newTestCache[string](t, cc, Options{Namespace: uniqueNamespace(t), WaitReplicas: 1, WaitTimeout: 300 * time.Millisecond})
	masterOf := func(k string) string {
		m, err := cc.MasterForKey(ctx, c.remote.key(k))
		if err != nil {
			t.Fatal(err)
		}
		return m.Options().Addr
	}
	a, b := "{u}a", "{u}b"
	src := masterOf(a)
	slot := keySlot(c.remote.key(a))
	var x, dst string
	for i := 0; x == ""; i++ {
		if k := "tryagain-" + strconv.Itoa(i); masterOf(k) == src && keySlot(c.remote.key(k)) != slot {
			x = k
		}
	}
	replicas := tc.masters(t, src)
	for m := range replicas {
		if m != src {
			dst = m
			break
		}
	}
	for _, k := range []string{x, a, b} {
		if err := c.Set(ctx, k, "v1"); err != nil {
			t.Fatalf("Set %s: %v", k, err)
		}
	}
	srcNode, dstNode := tc.node(t, src), tc.node(t, dst)
	srcID, dstID := tc.nodeID(t, src), tc.nodeID(t, dst)
	host, port, _ := net.SplitHostPort(dst)
	for _, step := range []struct {
		node *redis.Client
		args []any
	}{
		{dstNode, []any{"cluster", "setslot", slot, "importing", srcID}},
		{srcNode, []any{"cluster", "setslot", slot, "migrating", dstID}},
		{srcNode, []any{"migrate", host, port, "", 0, 5000, "keys", c.remote.key(a)}},
	} {
		if err := step.node.Do(ctx, step.args...).Err(); err != nil {
			t.Fatalf("%v: %v", step.args, err)
		}
	}
	finished := false
	finish := func() {
		if finished {
			return
		}
		finished = true
		_ = srcNode.Do(ctx, "migrate", host, port, "", 0, 5000, "keys", c.remote.key(b)).Err()
		for m := range replicas {
			if err := tc.node(t, m).Do(ctx, "cluster", "setslot", slot, "node", dstID).Err(); err != nil {
				t.Errorf("CLUSTER SETSLOT %d NODE on %s: %v", slot, m, err)
			}
		}
	}
	t.Cleanup(finish)
	tryAgains := func() int {
		info, _ := srcNode.Info(ctx, "errorstats").Result()
		for _, line := range strings.Split(info, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "errorstat_TRYAGAIN:count="); ok {
				n, _ := strconv.Atoi(v)
				return n
			}
		}
		return 0
	}
	// Count the invalidations naming x: the Delete runs x's script once.
	// The subscriber's node may be another than x's master, which forwards
	// its messages over the cluster bus, in order: markers published on
	// x's master fence the count, so that the Sets' messages, still on
	// their way, are not counted, nor the Delete's left out.
	ps := tc.client(t).Subscribe(ctx, c.remote.channel)
	t.Cleanup(func() { _ = ps.Close() })
	if _, err := ps.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	receiveUntil := func(marker string, each func(payload string)) {
		t.Helper()
		for {
			msg, err := ps.ReceiveMessage(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if msg.Payload == marker {
				return
			}
			each(msg.Payload)
		}
	}
	if err := srcNode.Publish(ctx, c.remote.channel, "start").Err(); err != nil {
		t.Fatal(err)
	}
	receiveUntil("start", func(string) {})
	mark := tryAgains()
	resume := stopProcess(t, tc.nodes[replicas[src]])
	done := make(chan error, 1)
	keys := []string{x, a, b}
	if !xFirst {
		keys = []string{a, b, x}
	}
	go func() { done <- c.Delete(ctx, keys...) }()
	// The first attempt got TRYAGAIN (its WAIT then waits 300 ms in vain);
	// complete the migration before the retries.
	waitUntil(t, 5*time.Second, "the Delete to be answered TRYAGAIN", func() bool { return tryAgains() > mark })
	finish()
	err := <-done
	resume()
	// A marker published after the Delete returned ends the count.
	if err := srcNode.Publish(ctx, c.remote.channel, "end").Err(); err != nil {
		t.Fatal(err)
	}
	named := 0
	receiveUntil("end", func(payload string) {
		if m, err := decodeInvalidation(payload); err == nil && slices.Contains(m.keys, x) {
			named++
		}
	})
	if named != 1 {
		t.Errorf("one Delete published %d invalidations naming %s: its script ran %d times", named, x, named)
	}
	if !errors.Is(err, ErrRemoteUnavailable) || !strings.Contains(err.Error(), strconv.Quote(x)) {
		t.Errorf("Delete with WaitReplicas of %s (its master's replica stopped) and a half-migrated slot's keys: %v; want ErrRemoteUnavailable naming %q as not replicated", x, err, x)
	}
	t.Logf("Delete with WaitReplicas, replica stopped, TRYAGAIN then MOVED: %v", err)
	waitUntil(t, 30*time.Second, "the cluster to be healthy again", func() bool { return tc.healthy(tc.addrs) })
}

// stuckReload reports whether a goroutine of the process is inside the
// subscriber's slot-map reload, waiting for a node's answer.
func stuckReload() bool {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "reloadMasters") && strings.Contains(g, "loadState") && strings.Contains(g, "Read(") {
			return true
		}
	}
	return false
}

// testClusterCloseHungMaster stops (SIGSTOP) a master that holds no
// subscription of the cache, for less than cluster-node-timeout, with a
// default ClusterClient, until the subscriber's slot-map reload waits for
// that master's answer (go-redis ignores the context's deadline then, and
// waits ReadTimeout, 3 s). Close must not wait for it: like the heartbeat
// publishes, nothing of the cache is left to do on that answer.
func testClusterCloseHungMaster(t *testing.T, tc *testCluster) {
	c := newTestCache[string](t, tc.client(t), Options{Namespace: uniqueNamespace(t), HeartbeatInterval: 50 * time.Millisecond})
	if err := c.WaitReady(context.Background()); err != nil {
		t.Fatal(err)
	}
	sub := tc.subscriptionNode(t, c)
	var victim string
	for m := range tc.masters(t, tc.live()) {
		if m != sub {
			victim = m
			break
		}
	}
	resume := stopProcess(t, tc.nodes[victim])
	stuck := false
	for start := time.Now(); !stuck && time.Since(start) < 800*time.Millisecond; {
		stuck = stuckReload()
		time.Sleep(5 * time.Millisecond) // polling, as waitUntil does
	}
	if !stuck {
		resume()
		t.Log("no slot-map reload asked the hung master this time (it picks a node at random): nothing to check")
		return
	}
	closed := make(chan struct{})
	go func() {
		_ = c.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(500 * time.Millisecond):
		t.Errorf("Close waited for a slot-map reload stuck on the hung master %s", victim)
	}
	resume()
	<-closed
	waitUntil(t, 30*time.Second, "the cluster to be healthy again", func() bool { return tc.healthy(tc.addrs) })
}
