//go:build unix

package tiered

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Tests on a real Redis Cluster: 3 masters with one replica each, started
// from redis-server processes on free loopback ports by TestCluster and torn
// down when it ends. The subtests share the cluster. The failover subtests
// run last, each killing a master; the killed node is restarted (it rejoins
// as a replica) before the next one.

// clusterNodeTimeout is the cluster's node timeout: a master that does not
// answer for that long is failed over to its replica.
const clusterNodeTimeout = 2000 * time.Millisecond

// testCluster is a local Redis Cluster.
type testCluster struct {
	nodes map[string]*redisServer // by address
	addrs []string
}

// clusterNodeInfo is one line of CLUSTER NODES.
type clusterNodeInfo struct {
	id, addr, masterID string
	master, failed     bool
	slots              []string
}

// startTestCluster starts 6 redis-server processes in cluster mode, joins
// them with redis-cli --cluster create (3 masters, 1 replica each), and
// waits until every node reports cluster_state:ok and every replica is in
// sync. It skips the test (fails under CI) if redis-server or redis-cli is
// missing.
func startTestCluster(t *testing.T) *testCluster {
	t.Helper()
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		skipOrFail(t, "redis-cli is not installed: the cluster tests need redis-server and redis-cli (apt-get install redis-server redis-tools)")
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		skipOrFail(t, "redis-server is not installed: the cluster tests need redis-server and redis-cli (apt-get install redis-server redis-tools)")
	}
	start := time.Now()
	tc := &testCluster{nodes: make(map[string]*redisServer)}
	for range 6 {
		s := startRedisServer(t,
			"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", strconv.Itoa(int(clusterNodeTimeout.Milliseconds())),
			// An explicit bus port: the default (port+10000) may not be free,
			// or may not even exist for a high ephemeral port.
			"--cluster-port", strconv.Itoa(freePort(t)),
			// Replicas sync at once instead of after the default 5 s delay.
			"--repl-diskless-sync-delay", "0",
		)
		tc.nodes[s.Addr] = s
		tc.addrs = append(tc.addrs, s.Addr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := append([]string{"--cluster", "create"}, tc.addrs...)
	args = append(args, "--cluster-replicas", "1", "--cluster-yes")
	if out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	waitUntil(t, 60*time.Second, "cluster_state:ok and replicas in sync on every node", func() bool {
		return tc.healthy(tc.addrs)
	})
	t.Logf("cluster: 3 masters + 3 replicas up in %v", time.Since(start).Round(time.Millisecond))
	return tc
}

// node returns a plain client on one node, closed at cleanup.
func (tc *testCluster) node(t *testing.T, addr string) *redis.Client {
	rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: time.Second})
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// healthy reports whether every node of addrs says cluster_state:ok and
// knows 3 masters with slots and 3 replicas, none failing, and every master
// has its replica online.
func (tc *testCluster) healthy(addrs []string) bool {
	ctx := context.Background()
	for _, addr := range addrs {
		rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: time.Second})
		info, err := rdb.ClusterInfo(ctx).Result()
		repl, err2 := rdb.Info(ctx, "replication").Result()
		_ = rdb.Close()
		if err != nil || err2 != nil || !strings.Contains(info, "cluster_state:ok") {
			return false
		}
		switch {
		case strings.Contains(repl, "role:slave"):
			if !strings.Contains(repl, "master_link_status:up") {
				return false
			}
		case !strings.Contains(repl, "state=online"):
			return false
		}
		nodes, err := tc.clusterNodes(addr)
		if err != nil {
			return false
		}
		masters, replicas := 0, 0
		for _, n := range nodes {
			switch {
			case n.failed:
				return false
			case n.master && len(n.slots) > 0:
				masters++
			case !n.master && n.masterID != "-":
				replicas++
			}
		}
		if masters != 3 || replicas != 3 {
			return false
		}
	}
	return true
}

// clusterNodes returns CLUSTER NODES as seen by the node at addr.
func (tc *testCluster) clusterNodes(addr string) ([]clusterNodeInfo, error) {
	rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: time.Second})
	defer rdb.Close()
	out, err := rdb.ClusterNodes(context.Background()).Result()
	if err != nil {
		return nil, err
	}
	var nodes []clusterNodeInfo
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 8 {
			continue
		}
		addr, _, _ := strings.Cut(f[1], "@")
		flags := strings.Split(f[2], ",")
		nodes = append(nodes, clusterNodeInfo{
			id:       f[0],
			addr:     addr,
			masterID: f[3],
			master:   slices.Contains(flags, "master"),
			failed:   slices.Contains(flags, "fail") || slices.Contains(flags, "fail?"),
			slots:    f[8:],
		})
	}
	return nodes, sc.Err()
}

// masters returns the address of each master, and of its replica, as the
// node at from sees them.
func (tc *testCluster) masters(t *testing.T, from string) map[string]string {
	t.Helper()
	nodes := mustClusterNodes(t, tc, from)
	byID := make(map[string]string)
	for _, n := range nodes {
		byID[n.id] = n.addr
	}
	m := make(map[string]string)
	for _, n := range nodes {
		if n.master && !n.failed && len(n.slots) > 0 {
			if _, ok := m[n.addr]; !ok {
				m[n.addr] = ""
			}
		}
		if !n.master && !n.failed {
			m[byID[n.masterID]] = n.addr
		}
	}
	return m
}

// client returns a ClusterClient with default options (what a user who
// does not tune anything gets), closed at cleanup.
func (tc *testCluster) client(t *testing.T) *redis.ClusterClient {
	rdb := redis.NewClusterClient(&redis.ClusterOptions{Addrs: tc.addrs})
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// TestCluster runs the cache on a real 6-node Redis Cluster.
func TestCluster(t *testing.T) {
	tc := startTestCluster(t)
	t.Run("ReadsWritesDeletes", func(t *testing.T) { testClusterReadsWritesDeletes(t, tc) })
	t.Run("Invalidation", func(t *testing.T) { testClusterInvalidation(t, tc) })
	t.Run("WaitReplicas", func(t *testing.T) { testClusterWaitReplicas(t, tc) })
	t.Run("Batch", func(t *testing.T) { testClusterBatch(t, tc) })
	t.Run("Failover", func(t *testing.T) { testClusterFailover(t, tc, failoverMode{}) })
	tc.restartStopped(t)
	t.Run("FailoverLosingWrites", func(t *testing.T) { testClusterFailover(t, tc, failoverMode{stallReplica: true}) })
	tc.restartStopped(t)
	t.Run("FailoverWithWaitReplicas", func(t *testing.T) {
		testClusterFailover(t, tc, failoverMode{stallReplica: true, wait: true})
	})
}

// clusterKeys returns n keys spread over many slots (and so every master).
func clusterKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = "key-" + strconv.Itoa(i)
	}
	return keys
}

func testClusterReadsWritesDeletes(t *testing.T, tc *testCluster) {
	ctx := context.Background()
	ns := uniqueNamespace(t)
	a := newTestCache[string](t, tc.client(t), Options{Namespace: ns})
	b := newTestCache[string](t, tc.client(t), Options{Namespace: ns})
	check := tc.client(t)

	// Keys over many slots, plus 1,500 keys in one slot (a hash tag), which
	// take two script calls on one node.
	keys := clusterKeys(300)
	for i := range 1500 {
		keys = append(keys, "{hot}"+strconv.Itoa(i))
	}
	slotsUsed := make(map[uint16]bool)
	for _, k := range keys {
		slotsUsed[keySlot(a.remote.key(k))] = true
		if err := a.Set(ctx, k, "v-"+k); err != nil {
			t.Fatalf("Set %s: %v", k, err)
		}
	}
	for _, k := range keys[:300] {
		if got, err := b.Get(ctx, k); err != nil || got != "v-"+k {
			t.Fatalf("Get %s on the other instance = %q, %v; want %q", k, got, err, "v-"+k)
		}
		waitUntil(t, 10*time.Second, "Get to fill L1 on the other instance", func() bool {
			_, ok := b.local.get(k)
			return ok
		})
	}
	loads := atomic.Int64{}
	for _, k := range []string{"absent-1", "absent-2", "{hot}absent"} {
		got, err := b.GetOrLoad(ctx, k, func(context.Context, string) (string, error) {
			loads.Add(1)
			return "loaded", nil
		})
		if err != nil || got != "loaded" {
			t.Fatalf("GetOrLoad %s = %q, %v", k, got, err)
		}
		if raw, err := check.Get(ctx, b.remote.key(k)).Bytes(); err != nil {
			t.Fatalf("GetOrLoad %s did not write Redis back: %v", k, err)
		} else if p, err := envelopePayload(raw); err != nil || string(p) != "loaded" {
			t.Fatalf("Redis holds %q for %s", raw, k)
		}
	}

	// One Delete of keys in ~300 slots on all three masters: grouped by
	// slot, pipelined, no CROSSSLOT.
	before := b.Stats().InvalidationsPublished
	if err := b.Delete(ctx, keys...); err != nil {
		t.Fatalf("Delete of %d keys in %d slots: %v", len(keys), len(slotsUsed), err)
	}
	sent := b.Stats().InvalidationsPublished - before
	// One message per slot, plus one for the slot of the 1,500 tagged keys,
	// which takes two script calls.
	if want := uint64(len(slotsUsed) + 1); sent != want {
		t.Errorf("Delete published %d invalidations, want %d (one per slot, per 1,000 keys)", sent, want)
	}
	for _, k := range keys {
		if n, err := check.Exists(ctx, a.remote.key(k)).Result(); err != nil || n != 0 {
			t.Fatalf("after Delete, EXISTS %s = %d, %v", k, n, err)
		}
	}
	waitUntil(t, 10*time.Second, "instance a to drop every deleted key", func() bool {
		for _, k := range keys {
			if _, ok := a.local.get(k); ok {
				return false
			}
		}
		return true
	})
	for _, k := range keys[:300] {
		if _, err := a.Get(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get %s after Delete: %v, want ErrNotFound", k, err)
		}
	}
	if s := a.Stats(); s.RemoteErrors != 0 {
		t.Errorf("instance a counted %d Redis errors", s.RemoteErrors)
	}
	if s := b.Stats(); s.RemoteErrors != 0 {
		t.Errorf("instance b counted %d Redis errors", s.RemoteErrors)
	}
	t.Logf("%d keys in %d slots deleted with %d scripts", len(keys), len(slotsUsed), sent)
}

// clusterInstances creates n Caches on one namespace, each with its own
// default ClusterClient (as separate processes would have).
func clusterInstances(t *testing.T, tc *testCluster, n int, opts Options) []*Cache[string] {
	t.Helper()
	if opts.Namespace == "" {
		opts.Namespace = uniqueNamespace(t)
	}
	caches := make([]*Cache[string], n)
	for i := range caches {
		caches[i] = newTestCache[string](t, tc.client(t), opts)
	}
	return caches
}

func testClusterInvalidation(t *testing.T, tc *testCluster) {
	ctx := context.Background()
	caches := clusterInstances(t, tc, 3, Options{})
	keys := clusterKeys(60)
	loadV0 := func(context.Context, string) (string, error) { return "v0", nil }
	for _, c := range caches {
		for _, k := range keys {
			if v, err := c.GetOrLoad(ctx, k, loadV0); err != nil || v != "v0" {
				t.Fatalf("GetOrLoad %s = %q, %v", k, v, err)
			}
		}
	}
	inL1 := func(c *Cache[string], k, want string) bool {
		e, ok := c.local.get(k)
		return ok && e.value == want
	}
	for _, c := range caches {
		for _, k := range keys {
			waitUntil(t, 10*time.Second, "L1 filled", func() bool { return inL1(c, k, "v0") })
		}
	}

	// Each instance in turn overwrites every key; the other two must stop
	// serving the old value and then read the new one.
	for round, w := range caches {
		want := "v" + strconv.Itoa(round+1)
		for _, k := range keys {
			if err := w.Set(ctx, k, want); err != nil {
				t.Fatalf("Set: %v", err)
			}
		}
		for i, c := range caches {
			for _, k := range keys {
				waitUntil(t, 10*time.Second, fmt.Sprintf("instance %d to drop %s", i, k), func() bool {
					e, ok := c.local.get(k)
					return !ok || e.value == want
				})
				if v, err := c.Get(ctx, k); err != nil || v != want {
					t.Fatalf("instance %d: Get %s = %q, %v; want %q", i, k, v, err, want)
				}
			}
		}
	}

	// One Delete of keys on every master from one instance reaches both
	// others.
	if err := caches[1].Delete(ctx, keys...); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	for i, c := range caches {
		waitUntil(t, 10*time.Second, fmt.Sprintf("instance %d to drop the deleted keys", i), func() bool {
			for _, k := range keys {
				if _, ok := c.local.get(k); ok {
					return false
				}
			}
			return true
		})
	}

	// Invalidation latency on the cluster: from the start of a Set on one
	// instance until another has applied its invalidation. A probe member on
	// the reader's subscription, called right after the reader's Cache,
	// reports it (a spinning reader would take the CPU the receive path
	// needs on a 2-core machine).
	//
	// Messages published on the node that holds the reader's subscription
	// are delivered there; others cross the cluster bus, whose outgoing
	// links Redis 7.0 opens without TCP_NODELAY: a few of those arrive
	// ~40 ms late (Nagle against delayed ACKs). Both are reported.
	const trials = 300
	var local, bus []time.Duration
	w, r := caches[0], caches[2]
	subNode := tc.subscriptionNode(t, r)
	cc := tc.client(t)
	probe := &clusterProbe{applied: make(chan time.Time, 1)}
	r.sub.add(r.remote.channel, probe)
	t.Cleanup(func() { r.sub.remove(r.remote.channel, probe) })
	for i := range trials {
		k := keys[i%len(keys)]
		master, err := cc.MasterForKey(ctx, w.remote.key(k))
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := w.Set(ctx, k, "new-"+strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
		select {
		case at := <-probe.applied:
			if master.Options().Addr == subNode {
				local = append(local, at.Sub(start))
			} else {
				bus = append(bus, at.Sub(start))
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("trial %d: the reader did not get the invalidation within 10 s", i)
		}
	}
	pct := func(d []time.Duration, p float64) time.Duration {
		if len(d) == 0 {
			return 0
		}
		d = slices.Clone(d)
		slices.Sort(d)
		return d[min(len(d)-1, int(p*float64(len(d))))]
	}
	all := append(slices.Clone(local), bus...)
	t.Logf("invalidation latency on the cluster (Set start -> another instance has dropped the key from L1), %d trials: p50 %v, p90 %v, p99 %v, max %v",
		trials, pct(all, .5), pct(all, .9), pct(all, .99), pct(all, 1))
	t.Logf("  published on the subscriber's node (%d): p50 %v, p99 %v; forwarded over the cluster bus (%d): p50 %v, p99 %v, max %v",
		len(local), pct(local, .5), pct(local, .99), len(bus), pct(bus, .5), pct(bus, .99), pct(bus, 1))
	for i, c := range caches {
		if s := c.Stats(); s.SubscriptionGaps != 0 || s.RemoteErrors != 0 {
			t.Errorf("instance %d: %d subscription gaps, %d Redis errors on a healthy cluster", i, s.SubscriptionGaps, s.RemoteErrors)
		}
	}
}

// clusterProbe is an extra member on an instance's subscription: it records
// when each invalidation on the instance's channel has been applied.
type clusterProbe struct{ applied chan time.Time }

func (p *clusterProbe) subscribed() {}

func (p *clusterProbe) invalidated(string) {
	select {
	case p.applied <- time.Now():
	default:
	}
}

// subscriptionNode returns the address of the node that holds c's
// invalidation subscription, found by asking each master how many
// subscribers its heartbeat channel has (pub/sub state is per node).
func (tc *testCluster) subscriptionNode(t *testing.T, c *Cache[string]) string {
	for m := range tc.masters(t, tc.live()) {
		n, err := tc.node(t, m).PubSubNumSub(context.Background(), c.sub.hbChannel).Result()
		if err == nil && n[c.sub.hbChannel] > 0 {
			return m
		}
	}
	return ""
}

// failoverStaleBound is how long after a replica's promotion a failover
// test lets an L1 serve a value that differs from what Redis now holds. The
// stated bound is one HeartbeatInterval plus one slot-map reload (every
// interval the subscriber reloads the slot map, and a change of masters
// flushes L1; a reload that tries the dead master first spends ~0.4 s in
// go-redis' dial retries): about 1 s by default. The rest is slack for a
// loaded 2-core machine.
const failoverStaleBound = 3 * time.Second

// failoverTracker records per-key versions: what the "database" holds (the
// loader returns it; writers bump it before they Set) and the highest
// version whose Set returned nil.
type failoverTracker struct {
	keys  []string
	index map[string]int
	db    []atomic.Int64
	acked []atomic.Int64
}

func (f *failoverTracker) load(_ context.Context, key string) (string, error) {
	return strconv.FormatInt(f.db[f.index[key]].Load(), 10), nil
}

// slotsOf returns the slots the master at addr serves.
func (tc *testCluster) slotsOf(t *testing.T, addr string) map[uint16]bool {
	slots := make(map[uint16]bool)
	for _, n := range mustClusterNodes(t, tc, addr) {
		if n.addr != addr {
			continue
		}
		for _, r := range n.slots {
			if strings.HasPrefix(r, "[") {
				continue // a slot being migrated
			}
			lo, hi, found := strings.Cut(r, "-")
			a, _ := strconv.Atoi(lo)
			b := a
			if found {
				b, _ = strconv.Atoi(hi)
			}
			for s := a; s <= b; s++ {
				slots[uint16(s)] = true
			}
		}
	}
	return slots
}

// failoverMode selects a failover scenario.
type failoverMode struct {
	stallReplica bool // stall the victim's replica before the kill, so writes are lost
	wait         bool // Options.WaitReplicas = 1
}

// testClusterFailover kills a master while 3 instances read and write (and a
// 4th, idle one holds values in L1 without touching Redis), and checks that
// reads fail open during the failover, that L1 hits come back soon after
// the replica's promotion, and that no L1 keeps serving a value Redis no
// longer holds.
//
// Without stallReplica it kills the master holding instance 0's subscription:
// its subscription breaks (a gap) and must come back on the promoted
// replica. With stallReplica it kills the master holding the fewest of the
// subscriptions (never the idle instance's if another will do), after
// stopping its replica (SIGSTOP) and filling the replication link, so that
// the master acknowledges writes its replica never gets; writers stop
// before the kill, so readers hit L1 and only the subscriber's cluster
// watch can tell the instances that the promoted replica holds older
// values than they do. With wait too, Set waits for the replica
// (WaitReplicas 1): the writes made while the replica is stopped fail, and
// no acknowledged write may be lost.
func testClusterFailover(t *testing.T, tc *testCluster, mode failoverMode) {
	ctx := context.Background()
	ns := uniqueNamespace(t)
	var killedAt atomic.Int64
	opts := Options{Namespace: ns}
	if mode.wait {
		opts.WaitReplicas, opts.WaitTimeout = 1, 200*time.Millisecond
	}
	active := make([]*Cache[string], 3)
	for i := range active {
		opts.Logger = clusterLogger(t, i, &killedAt)
		active[i] = newTestCache[string](t, tc.client(t), opts)
	}
	opts.Logger = clusterLogger(t, 3, &killedAt)
	idle := newTestCache[string](t, tc.client(t), opts)
	caches := append(slices.Clip(active), idle)
	// The checker's own client does not spend 0.4 s redialing a dead node.
	check := redis.NewClusterClient(&redis.ClusterOptions{Addrs: tc.addrs, DialerRetries: 1})
	t.Cleanup(func() { _ = check.Close() })

	f := &failoverTracker{keys: clusterKeys(300), index: make(map[string]int)}
	f.db = make([]atomic.Int64, len(f.keys))
	f.acked = make([]atomic.Int64, len(f.keys))
	for i, k := range f.keys {
		f.index[k] = i
		f.db[i].Store(1)
		err := active[i%3].Set(ctx, k, "1")
		for try := 0; err != nil && mode.wait && try < 5; try++ {
			err = active[i%3].Set(ctx, k, "1") // the replica may be slow to acknowledge
		}
		if err != nil {
			t.Fatalf("Set: %v", err)
		}
		f.acked[i].Store(1)
	}

	subNodes := make([]string, len(caches))
	for i, c := range caches {
		if subNodes[i] = tc.subscriptionNode(t, c); subNodes[i] == "" {
			t.Fatalf("cannot find the node of instance %d's subscription", i)
		}
	}
	var victim string
	if !mode.stallReplica {
		victim = subNodes[0]
	} else {
		// The master with the fewest of our subscriptions, never the idle
		// instance's if another will do.
		best := -1
		for m := range tc.masters(t, tc.live()) {
			n := 0
			for i, sn := range subNodes {
				if sn == m {
					n++
					if caches[i] == idle {
						n += 100
					}
				}
			}
			if best < 0 || n < best {
				victim, best = m, n
			}
		}
	}
	replica := tc.masters(t, victim)[victim]
	if replica == "" {
		t.Fatalf("master %s has no replica", victim)
	}
	var ours []int
	for i, sn := range subNodes {
		if sn == victim {
			ours = append(ours, i)
		}
	}
	victimSlots := tc.slotsOf(t, victim)
	onVictim := func(k string) bool { return victimSlots[keySlot(idle.remote.key(k))] }
	// A probe key on the victim per instance, that nobody else reads.
	probes := make([]string, len(caches))
	for i := range probes {
		for j := 0; probes[i] == ""; j++ {
			if p := fmt.Sprintf("probe-%d-%d", i, j); onVictim(p) {
				probes[i] = p
			}
		}
		if err := caches[i].Set(ctx, probes[i], "probe"); err != nil {
			t.Fatal(err)
		}
	}
	victimKeys := 0
	for _, k := range f.keys {
		if onVictim(k) {
			victimKeys++
		}
	}
	t.Logf("killing master %s (replica %s; %d of %d keys live there); it holds the subscription of instances %v (3 is the idle one)",
		victim, replica, victimKeys, len(f.keys), ours)

	// Writers (one per active instance, each owning a third of the keys, so
	// versions per key only grow) and readers (two per active instance).
	var (
		stopWrites, stopReads = make(chan struct{}), make(chan struct{})
		writers, readers      sync.WaitGroup
		writes, writeErrs     atomic.Int64
		ackedOnVictim         atomic.Int64
		failedOnVictim        atomic.Int64
		reads, readErrs       atomic.Int64
		firstReadErr          atomic.Pointer[error]
	)
	for w, c := range active {
		writers.Add(1)
		go func() {
			defer writers.Done()
			tick := time.NewTicker(time.Millisecond)
			defer tick.Stop()
			for i := w; ; i += 3 {
				select {
				case <-stopWrites:
					return
				case <-tick.C:
				}
				i %= len(f.keys)
				v := f.db[i].Add(1)
				err := c.Set(ctx, f.keys[i], strconv.FormatInt(v, 10))
				writes.Add(1)
				if err != nil {
					writeErrs.Add(1)
					if onVictim(f.keys[i]) {
						failedOnVictim.Add(1)
					}
					continue
				}
				f.acked[i].Store(v)
				if onVictim(f.keys[i]) {
					ackedOnVictim.Add(1)
				}
			}
		}()
		for r := range 2 {
			readers.Add(1)
			go func() {
				defer readers.Done()
				rng := rand.New(rand.NewPCG(uint64(w), uint64(r)))
				for {
					select {
					case <-stopReads:
						return
					default:
					}
					k := f.keys[rng.IntN(len(f.keys))]
					if _, err := c.GetOrLoad(ctx, k, f.load); err != nil {
						readErrs.Add(1)
						firstReadErr.CompareAndSwap(nil, &err)
					}
					reads.Add(1)
				}
			}()
		}
	}
	stopWriters := sync.OnceFunc(func() {
		close(stopWrites)
		writers.Wait()
	})
	stopAll := sync.OnceFunc(func() {
		stopWriters()
		close(stopReads)
		readers.Wait()
	})
	t.Cleanup(stopAll)

	waitUntil(t, 20*time.Second, "some writes before the kill", func() bool { return writes.Load() > 300 })
	resume := func() {}
	if mode.stallReplica {
		// Stop the replica and fill the replication link (both socket
		// buffers) with a few large writes, so that what the master
		// acknowledges next stays in its memory and dies with it.
		resume = stopProcess(t, tc.nodes[replica])
		var junk string
		for j := 0; junk == ""; j++ {
			if k := "junk-" + strconv.Itoa(j); victimSlots[keySlot(k)] {
				junk = k
			}
		}
		big := strings.Repeat("x", 8<<20)
		for range 3 {
			if err := tc.node(t, victim).Set(ctx, junk, big, 0).Err(); err != nil {
				t.Fatal(err)
			}
		}
		if mode.wait {
			// Writes now wait for the stopped replica in vain and fail.
			mark := failedOnVictim.Load()
			waitUntil(t, 10*time.Second, "writes to the master to fail while its replica is stopped", func() bool {
				return failedOnVictim.Load() >= mark+3
			})
		} else {
			mark := ackedOnVictim.Load()
			waitUntil(t, 10*time.Second, "writes acknowledged by the master while its replica is stopped", func() bool {
				return ackedOnVictim.Load() >= mark+50
			})
		}
		// Stop writing, so that what the idle instance reads next stays in
		// its L1: values the promoted replica will not have.
		stopWriters()
	}
	// The idle instance reads every key once, then never touches Redis
	// again: only the cluster watch can tell it that what it holds is gone.
	for _, k := range f.keys {
		if _, err := idle.GetOrLoad(ctx, k, f.load); err != nil {
			t.Fatal(err)
		}
	}
	before := make([]Stats, len(caches))
	for i, c := range caches {
		before[i] = c.Stats()
	}
	killed := time.Now()
	killedAt.Store(killed.UnixNano())
	tc.nodes[victim].Stop()
	resume()

	// Wait for the replica's promotion, as a surviving master sees it.
	survivor := tc.live()
	var promoted time.Time
	waitUntil(t, 30*time.Second, "the replica "+replica+" to be promoted", func() bool {
		nodes, err := tc.clusterNodes(survivor)
		if err != nil {
			return false
		}
		for _, n := range nodes {
			if n.addr == replica && n.master && len(n.slots) > 0 {
				promoted = time.Now()
				return true
			}
		}
		return false
	})
	t.Logf("replica promoted %v after the kill", promoted.Sub(killed).Round(time.Millisecond))

	// Stop writing: from now on Redis only changes by loads filling keys it
	// lost altogether. Then check, for a while, that no instance's L1 serves
	// a value Redis does not hold.
	stopWriters()
	var (
		lastDiverged time.Time
		diverged     = make(map[string]bool)
		flushedAt    = make([]time.Duration, len(caches))
		checked      = make(chan struct{})
		flushWatch   = make(chan struct{})
	)
	go func() {
		defer close(flushWatch)
		base := make([]uint64, len(caches))
		for ci, c := range caches {
			base[ci] = c.Stats().Flushes
		}
		for time.Since(promoted) < failoverStaleBound+2*time.Second {
			done := true
			for ci, c := range caches {
				if flushedAt[ci] == 0 && c.Stats().Flushes > base[ci] {
					flushedAt[ci] = time.Since(promoted)
				}
				done = done && flushedAt[ci] != 0
			}
			if done {
				return
			}
			time.Sleep(100 * time.Microsecond) // polling, as waitUntil does
		}
	}()
	go func() {
		defer close(checked)
		for time.Since(promoted) < failoverStaleBound+2*time.Second {
			// Reload the checker's slot map (a default client would keep
			// dialing the dead master for a minute).
			_ = check.ForEachMaster(ctx, func(context.Context, *redis.Client) error { return nil })
			raw := make([]*redis.StringCmd, len(f.keys))
			pipe := check.Pipeline()
			for i, k := range f.keys {
				raw[i] = pipe.Get(ctx, idle.remote.key(k))
			}
			_, _ = pipe.Exec(ctx)
			for i, k := range f.keys {
				b, err := raw[i].Bytes()
				if err != nil && err != redis.Nil {
					continue // not reachable: nothing to compare with
				}
				l2 := ""
				if err == nil {
					if p, err := envelopePayload(b); err == nil {
						l2 = string(p)
					}
				}
				for ci, c := range caches {
					if e, ok := c.local.get(k); ok && e.value != l2 {
						lastDiverged = time.Now()
						diverged[fmt.Sprintf("%d/%s:L1=%s,L2=%s", ci, k, e.value, l2)] = true
					}
				}
			}
		}
	}()

	// Time until each instance serves, from L1, a value it read from the
	// promoted master: its subscription is healthy, and a Get of its probe
	// key (dropped from L1 first) reads Redis and fills L1.
	recovered := make([]time.Duration, len(caches))
	var probing sync.WaitGroup
	for i, c := range caches {
		probing.Add(1)
		go func() {
			defer probing.Done()
			for time.Since(promoted) < 30*time.Second {
				c.local.invalidate(probes[i])
				if v, err := c.Get(ctx, probes[i]); err == nil && v == "probe" {
					at := time.Since(promoted)
					// The fill is in ristretto's buffer for a moment.
					for start := time.Now(); time.Since(start) < 100*time.Millisecond; time.Sleep(100 * time.Microsecond) {
						if _, ok := c.local.get(probes[i]); ok {
							recovered[i] = at.Round(time.Millisecond)
							return
						}
					}
				}
				time.Sleep(time.Millisecond) // polling, as waitUntil does
			}
		}()
	}
	probing.Wait()
	for i, d := range recovered {
		if d == 0 {
			t.Errorf("instance %d did not serve L1 hits for keys on the promoted master within 30 s of the promotion (subscription healthy: %v, stats %+v)",
				i, caches[i].sub.healthy(), caches[i].Stats())
		}
	}
	<-checked
	<-flushWatch
	stopAll()
	t.Logf("L1 hits for keys on the promoted master resumed %v after the promotion (per instance; the last is the idle one)", recovered)
	t.Logf("L1 flushed (first flush after the promotion) %v after the promotion (per instance; 0 = none seen)", roundAll(flushedAt))

	// Writes Redis lost: acknowledged versions newer than what it holds.
	lostKeys, lostVersions := 0, int64(0)
	_ = check.ForEachMaster(ctx, func(context.Context, *redis.Client) error { return nil })
	for i, k := range f.keys {
		b, err := check.Get(ctx, idle.remote.key(k)).Bytes()
		var l2 int64
		if err == nil {
			if p, err := envelopePayload(b); err == nil {
				l2, _ = strconv.ParseInt(string(p), 10, 64)
			}
		} else if err != redis.Nil {
			t.Fatalf("GET %s after the failover: %v", k, err)
		}
		if a := f.acked[i].Load(); l2 < a {
			lostKeys++
			lostVersions += a - l2
		}
	}

	for i, c := range caches {
		s := c.Stats()
		t.Logf("instance %d: L1 hits %d, misses %d, bypassed %d, Redis errors %d; during the failover: gaps +%d, heartbeat misses +%d, flushes +%d",
			i, s.LocalHits, s.LocalMisses, s.LocalBypassed, s.RemoteErrors, s.SubscriptionGaps-before[i].SubscriptionGaps,
			s.HeartbeatMisses-before[i].HeartbeatMisses, s.Flushes-before[i].Flushes)
	}
	t.Logf("writes: %d (%d failed); reads: %d (%d errors); acknowledged writes lost by Redis' asynchronous replication: %d versions of %d keys",
		writes.Load(), writeErrs.Load(), reads.Load(), readErrs.Load(), lostVersions, lostKeys)
	switch {
	case mode.wait && lostKeys != 0:
		t.Errorf("with WaitReplicas 1, %d acknowledged writes were lost", lostVersions)
	case mode.stallReplica && !mode.wait && lostKeys == 0:
		t.Logf("the stopped replica got every acknowledged write this time: nothing was lost")
	}

	if n := readErrs.Load(); n != 0 {
		t.Errorf("GetOrLoad returned %d errors during the failover (first: %v); it must fail open", n, *firstReadErr.Load())
	}
	if after := lastDiverged.Sub(promoted); !lastDiverged.IsZero() && after > failoverStaleBound {
		list := slices.Sorted(maps.Keys(diverged))
		t.Errorf("an L1 served a value Redis does not hold %v after the promotion (bound %v; %d instance/keys, e.g. %v)",
			after.Round(time.Millisecond), failoverStaleBound, len(diverged), list[:min(len(list), 10)])
	} else if !lastDiverged.IsZero() {
		t.Logf("L1s served values Redis does not hold until %v after the promotion (%d instance/keys)", after.Round(time.Millisecond), len(diverged))
	}
	for _, i := range ours {
		if caches[i].Stats().SubscriptionGaps == before[i].SubscriptionGaps {
			t.Errorf("instance %d's subscription was on the killed master, yet no gap was counted", i)
		}
	}
	for i, c := range caches {
		if c.Stats().Flushes == before[i].Flushes {
			t.Errorf("instance %d did not flush L1 after the failover", i)
		}
	}
}

// restartStopped restarts every stopped node (it rejoins as a replica) and
// waits until the cluster is healthy again.
func (tc *testCluster) restartStopped(t *testing.T) {
	for _, a := range tc.addrs {
		if s := tc.nodes[a]; s.cmd == nil {
			s.start()
		}
	}
	start := time.Now()
	waitUntil(t, 60*time.Second, "the cluster to be healthy again", func() bool { return tc.healthy(tc.addrs) })
	t.Logf("cluster: healthy again %v after restarting the killed node", time.Since(start).Round(time.Millisecond))
}

// live returns the address of a node that is running.
func (tc *testCluster) live() string {
	for _, a := range tc.addrs {
		if tc.nodes[a].cmd != nil {
			return a
		}
	}
	return ""
}

func mustClusterNodes(t *testing.T, tc *testCluster, addr string) []clusterNodeInfo {
	t.Helper()
	nodes, err := tc.clusterNodes(addr)
	if err != nil {
		t.Fatalf("CLUSTER NODES on %s: %v", addr, err)
	}
	return nodes
}

func roundAll(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond)
	}
	return out
}

// clusterLogger returns a Logger that writes to t, with the time since the
// kill the failover tests record in killed (UnixNano).
func clusterLogger(t *testing.T, instance int, killed *atomic.Int64) *slog.Logger {
	return slog.New(slog.NewTextHandler(logWriter{t, instance, killed}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type logWriter struct {
	t        *testing.T
	instance int
	killed   *atomic.Int64
}

func (w logWriter) Write(p []byte) (int, error) {
	since := "before the kill"
	if k := w.killed.Load(); k != 0 {
		since = "kill+" + time.Duration(time.Now().UnixNano()-k).Round(time.Millisecond).String()
	}
	w.t.Logf("instance %d log, %s: %s", w.instance, since, strings.TrimSpace(string(p)))
	return len(p), nil
}

// readOnlyClient returns a client on a cluster replica that may read (it
// sends READONLY on each connection), closed at cleanup.
func readOnlyClient(t *testing.T, addr string) *redis.Client {
	rdb := redis.NewClient(&redis.Options{Addr: addr, OnConnect: func(ctx context.Context, cn *redis.Conn) error {
		return cn.ReadOnly(ctx).Err()
	}})
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// stopProcess stops (SIGSTOP) a redis-server until the returned function,
// also called at cleanup, resumes it.
func stopProcess(t *testing.T, s *redisServer) (resume func()) {
	p := s.cmd.Process
	if err := p.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resume = sync.OnceFunc(func() { _ = p.Signal(syscall.SIGCONT) })
	t.Cleanup(resume)
	return resume
}

func testClusterWaitReplicas(t *testing.T, tc *testCluster) {
	ctx := context.Background()
	ns := uniqueNamespace(t)
	cc := tc.client(t)
	w := newTestCache[string](t, cc, Options{Namespace: ns, WaitReplicas: 1, WaitTimeout: 300 * time.Millisecond})
	r := newTestCache[string](t, tc.client(t), Options{Namespace: ns})
	replicas := tc.masters(t, tc.live())
	replicaOf := func(k string) string {
		m, err := cc.MasterForKey(ctx, w.remote.key(k))
		if err != nil {
			t.Fatal(err)
		}
		return replicas[m.Options().Addr]
	}

	// When Set returns, the replica has the value already.
	keys := clusterKeys(100)
	for _, k := range keys {
		if err := w.Set(ctx, k, "v1"); err != nil {
			t.Fatalf("Set %s with WaitReplicas 1: %v", k, err)
		}
		raw, err := readOnlyClient(t, replicaOf(k)).Get(ctx, w.remote.key(k)).Bytes()
		if err != nil {
			t.Fatalf("the replica lacks %s right after Set returned: %v", k, err)
		}
		if p, _ := envelopePayload(raw); string(p) != "v1" {
			t.Fatalf("the replica holds %q for %s", raw, k)
		}
		if v, err := r.Get(ctx, k); err != nil || v != "v1" {
			t.Fatalf("Get %s on another instance = %q, %v", k, v, err)
		}
	}
	// Delete over every master: one pipeline with a WAIT per master.
	if err := w.Delete(ctx, keys...); err != nil {
		t.Fatalf("Delete with WaitReplicas 1: %v", err)
	}
	for _, k := range keys {
		if n, err := readOnlyClient(t, replicaOf(k)).Exists(ctx, w.remote.key(k)).Result(); err != nil || n != 0 {
			t.Fatalf("the replica still has %s right after Delete returned: %d, %v", k, n, err)
		}
	}

	// One replica stopped: writes to its master fail after WaitTimeout
	// (the master has them, the replica does not); others succeed.
	stalled := replicaOf(keys[0])
	var on, off string
	for _, k := range keys[1:] {
		if replicaOf(k) == stalled {
			on = k
		} else {
			off = k
		}
	}
	resume := stopProcess(t, tc.nodes[stalled])
	start := time.Now()
	err := w.Set(ctx, on, "v2")
	took := time.Since(start)
	if !errors.Is(err, ErrRemoteUnavailable) {
		t.Errorf("Set with the replica stopped: %v, want ErrRemoteUnavailable", err)
	}
	if took < 300*time.Millisecond {
		t.Errorf("Set with the replica stopped failed after %v, before WaitTimeout", took)
	}
	if _, ok := w.local.get(on); ok {
		t.Error("a Set that failed to replicate left its value in L1")
	}
	if err := w.Set(ctx, off, "v2"); err != nil {
		t.Errorf("Set of a key on another master: %v", err)
	}
	if err := w.Delete(ctx, on, off); !errors.Is(err, ErrRemoteUnavailable) {
		t.Errorf("Delete with a replica stopped: %v, want ErrRemoteUnavailable", err)
	}
	resume()
	waitUntil(t, 30*time.Second, "the cluster to be healthy again", func() bool { return tc.healthy(tc.addrs) })
	if err := w.Set(ctx, on, "v3"); err != nil {
		t.Errorf("Set after the replica resumed: %v", err)
	}
	t.Logf("Set with the replica stopped failed after %v (WaitTimeout 300ms)", took.Round(time.Millisecond))
}

// TestWaitReplicasStandalone checks WaitReplicas on one master with one
// replica.
func TestWaitReplicasStandalone(t *testing.T) {
	ctx := context.Background()
	master := startRedisServer(t, "--repl-diskless-sync-delay", "0")
	replica := startRedisServer(t, "--replicaof", "127.0.0.1", strconv.Itoa(master.port))
	rrdb := redis.NewClient(&redis.Options{Addr: replica.Addr})
	t.Cleanup(func() { _ = rrdb.Close() })
	waitUntil(t, 30*time.Second, "the replica to sync", func() bool {
		info, err := rrdb.Info(ctx, "replication").Result()
		return err == nil && strings.Contains(info, "master_link_status:up")
	})
	rdb := redis.NewClient(&redis.Options{Addr: master.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	c := newTestCache[string](t, rdb, Options{WaitReplicas: 1, WaitTimeout: 2 * time.Second})

	for i := range 50 {
		k := "k" + strconv.Itoa(i)
		if err := c.Set(ctx, k, "v"); err != nil {
			t.Fatalf("Set: %v", err)
		}
		if raw, err := rrdb.Get(ctx, c.remote.key(k)).Bytes(); err != nil {
			t.Fatalf("the replica lacks %s right after Set returned: %v", k, err)
		} else if p, _ := envelopePayload(raw); string(p) != "v" {
			t.Fatalf("the replica holds %q", raw)
		}
	}
	if err := c.Delete(ctx, "k0", "k1"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if n, err := rrdb.Exists(ctx, c.remote.key("k0"), c.remote.key("k1")).Result(); err != nil || n != 0 {
		t.Fatalf("the replica still has the keys right after Delete returned: %d, %v", n, err)
	}

	resume := stopProcess(t, replica)
	if err := c.Set(ctx, "k2", "v2"); !errors.Is(err, ErrRemoteUnavailable) {
		t.Errorf("Set with the replica stopped: %v, want ErrRemoteUnavailable", err)
	}
	if err := c.Delete(ctx, "k3"); !errors.Is(err, ErrRemoteUnavailable) {
		t.Errorf("Delete with the replica stopped: %v, want ErrRemoteUnavailable", err)
	}
	if v, err := c.Get(ctx, "k4"); err != nil || v != "v" {
		t.Errorf("Get with the replica stopped = %q, %v; reads do not wait", v, err)
	}
	resume()
	if err := c.Set(ctx, "k2", "v3"); err != nil {
		t.Errorf("Set after the replica resumed: %v", err)
	}
}

func TestWaitReplicasOptions(t *testing.T) {
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1"}})
	defer ring.Close()
	short := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", ReadTimeout: time.Second})
	defer short.Close()
	for _, o := range []Options{
		{Redis: ring, WaitReplicas: 1},
		{Redis: short, WaitReplicas: 1},                               // default WaitTimeout 1 s is not below ReadTimeout
		{Redis: short, WaitReplicas: 1, WaitTimeout: 2 * time.Second}, // nor is this
		{Redis: short, WaitReplicas: -1},
		{Redis: short, WaitReplicas: 1, WaitTimeout: -time.Second},
	} {
		o.Namespace = "ns"
		if c, err := New[string](o); !errors.Is(err, ErrInvalidOption) {
			if c != nil {
				_ = c.Close()
			}
			t.Errorf("New(%T, WaitReplicas %d, WaitTimeout %v): %v, want ErrInvalidOption", o.Redis, o.WaitReplicas, o.WaitTimeout, err)
		}
	}
	c, err := New[string](Options{Redis: short, Namespace: "ns", WaitReplicas: 1, WaitTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatalf("New with WaitTimeout below ReadTimeout: %v", err)
	}
	_ = c.Close()
}

func TestClusterClientReadingReplicasIsRejected(t *testing.T) {
	for i, o := range []*redis.ClusterOptions{
		{Addrs: []string{"127.0.0.1:1"}, ReadOnly: true},
		{Addrs: []string{"127.0.0.1:1"}, RouteByLatency: true},
		{Addrs: []string{"127.0.0.1:1"}, RouteRandomly: true},
	} {
		cc := redis.NewClusterClient(o)
		c, err := New[string](Options{Redis: cc, Namespace: "ns"})
		if !errors.Is(err, ErrInvalidOption) {
			t.Errorf("case %d: New with a ClusterClient that reads replicas: %v, want ErrInvalidOption", i, err)
		}
		if c != nil {
			_ = c.Close()
		}
		_ = cc.Close()
	}
}
