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
	"net"
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
	bus   map[string]*tcpProxy // by node address: the proxy on the node's announced cluster-bus port
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
	tc := &testCluster{nodes: make(map[string]*redisServer), bus: make(map[string]*tcpProxy)}
	for range 6 {
		// An explicit bus port: the default (port+10000) may not be free,
		// or may not even exist for a high ephemeral port. The node
		// announces a proxy in front of it, so that a test can stall what
		// the other nodes send it over the bus.
		busPort := freePort(t)
		bus := startProxy(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(busPort)))
		_, announced, _ := net.SplitHostPort(bus.Addr)
		s := startRedisServer(t,
			"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", strconv.Itoa(int(clusterNodeTimeout.Milliseconds())),
			"--cluster-port", strconv.Itoa(busPort),
			"--cluster-announce-bus-port", announced,
			// Replicas sync at once instead of after the default 5 s delay.
			"--repl-diskless-sync-delay", "0",
		)
		tc.nodes[s.Addr] = s
		tc.bus[s.Addr] = bus
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
	t.Run("SubscriptionSpread", func(t *testing.T) { testClusterSubscriptionSpread(t, tc) })
	t.Run("WaitReplicas", func(t *testing.T) { testClusterWaitReplicas(t, tc) })
	t.Run("Batch", func(t *testing.T) { testClusterBatch(t, tc) })
	t.Run("Coalescing", func(t *testing.T) { testClusterCoalescing(t, tc) })
	t.Run("StalledBusLink", func(t *testing.T) { testClusterStalledBus(t, tc) })
	t.Run("Migration", func(t *testing.T) { testClusterMigration(t, tc) })
	t.Run("HungMaster", func(t *testing.T) { testClusterHungMaster(t, tc) })
	t.Run("StalledBusOneMaster", func(t *testing.T) { testClusterStalledBusOneMaster(t, tc) })
	t.Run("BusLinkReset", func(t *testing.T) { testClusterBusLinkReset(t, tc) })
	t.Run("NewMasterStall", func(t *testing.T) { testClusterNewMasterStall(t, tc) })
	t.Run("WaitReplicasTryAgain", func(t *testing.T) { testClusterWaitReplicasTryAgain(t, tc) })
	t.Run("CloseHungMaster", func(t *testing.T) { testClusterCloseHungMaster(t, tc) })
	t.Run("MasterDown", func(t *testing.T) { testClusterMasterDown(t, tc) })
	tc.restartStopped(t)
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
	r.sub.add(r.remote.channel, "", probe)
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
	t.Logf("  published on the subscriber's node (%d): p50 %v, p99 %v; forwarded over the cluster bus, through the test's bus proxies (%d): p50 %v, p99 %v, max %v",
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
	// (An instance may serve it at once: its own slot-map reload can see
	// the promotion before this test does. Hence served, not a zero time.)
	recovered := make([]time.Duration, len(caches))
	served := make([]bool, len(caches))
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
							recovered[i], served[i] = at.Round(time.Millisecond), true
							return
						}
					}
				}
				time.Sleep(time.Millisecond) // polling, as waitUntil does
			}
		}()
	}
	probing.Wait()
	for i := range recovered {
		if !served[i] {
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
	// A Delete over both masters runs each master's part: the healthy one
	// deletes its key, and the error names only the other's.
	if err := w.Set(ctx, off, "v2"); err != nil {
		t.Errorf("Set of a key on another master: %v", err)
	}
	err = w.Delete(ctx, on, off)
	if !errors.Is(err, ErrRemoteUnavailable) {
		t.Errorf("Delete with a replica stopped: %v, want ErrRemoteUnavailable", err)
	} else if msg := err.Error(); !strings.Contains(msg, strconv.Quote(on)) || strings.Contains(msg, strconv.Quote(off)) {
		t.Errorf("Delete with a replica stopped: %q; want it to name %q (its replica is stopped) and not %q", msg, on, off)
	}
	if n, err := readOnlyClient(t, replicaOf(off)).Exists(ctx, w.remote.key(off)).Result(); err != nil || n != 0 {
		t.Errorf("a Delete with another master's replica stopped left %s on its healthy master's replica: %d, %v", off, n, err)
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

// testClusterStalledBus stalls what the other nodes send, over the cluster
// bus, to the node that holds a reader's subscription (a proxy on that
// node's announced bus port holds it; the subscription's own connection and
// every command connection are untouched). A Set of a key on another master
// then reaches Redis but its invalidation does not reach the reader: the
// reader must notice within the stated bound (4 × HeartbeatInterval) and
// stop serving the overwritten value from L1.
func testClusterStalledBus(t *testing.T, tc *testCluster) {
	ctx := context.Background()
	const interval = 100 * time.Millisecond
	// Well below cluster-node-timeout (2 s), after which the other nodes
	// would fail the stalled node over.
	const stall = 1200 * time.Millisecond
	bound := 4*interval + 400*time.Millisecond // slack for a loaded 2-core machine
	caches := clusterInstances(t, tc, 2, Options{HeartbeatInterval: interval})
	w, r := caches[0], caches[1]
	subNode := tc.subscriptionNode(t, r)
	if subNode == "" {
		t.Fatal("cannot find the node of the reader's subscription")
	}
	subSlots := tc.slotsOf(t, subNode)
	var key string
	for i := 0; key == ""; i++ {
		if k := "stalled-bus-" + strconv.Itoa(i); !subSlots[keySlot(r.remote.key(k))] {
			key = k
		}
	}
	if err := w.Set(ctx, key, "old"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the reader to hold the value in L1", func() bool {
		if _, err := r.Get(ctx, key); err != nil {
			return false
		}
		e, ok := r.local.get(key)
		return ok && e.value == "old"
	})
	before := r.Stats()

	tc.bus[subNode].StallAll()
	stalledAt := time.Now()
	if err := w.Set(ctx, key, "new"); err != nil {
		tc.bus[subNode].Resume()
		t.Fatalf("Set while the bus link is stalled: %v", err)
	}
	setAt := time.Now()
	var lastOld time.Time
	for time.Since(stalledAt) < stall {
		if v, err := r.Get(ctx, key); err == nil && v == "old" {
			lastOld = time.Now()
		}
		time.Sleep(time.Millisecond) // polling, as waitUntil does
	}
	tc.bus[subNode].Resume()
	after := r.Stats()
	if !lastOld.IsZero() && lastOld.Sub(setAt) > bound {
		t.Errorf("the reader served the overwritten value %v after the Set returned (bound %v; gaps +%d, heartbeat misses +%d)",
			lastOld.Sub(setAt).Round(time.Millisecond), bound, after.SubscriptionGaps-before.SubscriptionGaps,
			after.HeartbeatMisses-before.HeartbeatMisses)
	}
	if after.SubscriptionGaps == before.SubscriptionGaps {
		t.Error("a stalled bus link into the subscription's node was not counted as a gap")
	}
	t.Logf("stalled bus link into %s: the reader served the old value until %v after the Set returned (0 = never); gaps +%d, heartbeat misses +%d",
		subNode, max(lastOld.Sub(setAt), 0).Round(time.Millisecond), after.SubscriptionGaps-before.SubscriptionGaps,
		after.HeartbeatMisses-before.HeartbeatMisses)
	waitUntil(t, 30*time.Second, "the cluster to be healthy again", func() bool { return tc.healthy(tc.addrs) })
	waitUntil(t, 10*time.Second, "the reader to be healthy and read the new value", func() bool {
		v, err := r.Get(ctx, key)
		return err == nil && v == "new" && r.sub.healthy()
	})
}

// nodeID returns the cluster node id of the node at addr.
func (tc *testCluster) nodeID(t *testing.T, addr string) string {
	for _, n := range mustClusterNodes(t, tc, addr) {
		if n.addr == addr {
			return n.id
		}
	}
	t.Fatalf("no node id for %s", addr)
	return ""
}

// testClusterMigration half-migrates the slot of "{t}" from its master to
// another (key {t}a moved, {t}b not), then completes the migration:
//
//   - A Delete of both keys is answered TRYAGAIN: an answer, not an outage,
//     so right after it keys on the same master and on a third master are
//     written and read as usual.
//   - With WaitReplicas, a Set and a Delete of the moved key follow ASK, and
//     after the migration a Set through a client whose slot map is stale
//     follows MOVED.
func testClusterMigration(t *testing.T, tc *testCluster) {
	ctx := context.Background()
	ns := uniqueNamespace(t)
	plain := newTestCache[string](t, tc.client(t), Options{Namespace: ns})
	waitCC := tc.client(t)
	waited := newTestCache[string](t, waitCC, Options{Namespace: ns, WaitReplicas: 1, WaitTimeout: time.Second})
	cc := tc.client(t)
	masterOf := func(k string) string {
		m, err := cc.MasterForKey(ctx, plain.remote.key(k))
		if err != nil {
			t.Fatal(err)
		}
		return m.Options().Addr
	}
	src := masterOf("{t}a")
	var dst, third string
	for m := range tc.masters(t, src) {
		switch {
		case m == src:
		case dst == "":
			dst = m
		default:
			third = m
		}
	}
	var same, other string // a key on src outside the slot, one on the third master
	for i := 0; same == "" || other == ""; i++ {
		k := "migration-" + strconv.Itoa(i)
		switch masterOf(k) {
		case src:
			if keySlot(plain.remote.key(k)) != keySlot(plain.remote.key("{t}a")) {
				same = k
			}
		case third:
			other = k
		}
	}
	for _, k := range []string{"{t}a", "{t}b", same, other} {
		if err := waited.Set(ctx, k, "v1"); err != nil {
			t.Fatalf("Set %s with WaitReplicas before the migration: %v", k, err)
		}
	}
	// The write's own client learns the slot map before the migration.
	slot := keySlot(plain.remote.key("{t}a"))
	srcID, dstID := tc.nodeID(t, src), tc.nodeID(t, dst)
	srcNode, dstNode := tc.node(t, src), tc.node(t, dst)
	host, port, _ := net.SplitHostPort(dst)
	for _, step := range []struct {
		node *redis.Client
		args []any
	}{
		{dstNode, []any{"cluster", "setslot", slot, "importing", srcID}},
		{srcNode, []any{"cluster", "setslot", slot, "migrating", dstID}},
		{srcNode, []any{"migrate", host, port, "", 0, 5000, "keys", plain.remote.key("{t}a")}},
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
		_ = srcNode.Do(ctx, "migrate", host, port, "", 0, 5000, "keys", plain.remote.key("{t}b")).Err()
		for m := range tc.masters(t, src) {
			if err := tc.node(t, m).Do(ctx, "cluster", "setslot", slot, "node", dstID).Err(); err != nil {
				ks, _ := tc.node(t, m).Do(ctx, "cluster", "getkeysinslot", slot, 10).Result()
				t.Errorf("CLUSTER SETSLOT %d NODE on %s: %v (keys %v)", slot, m, err, ks)
			}
		}
	}
	t.Cleanup(finish)

	// TRYAGAIN: one key of the script moved, one not.
	err := plain.Delete(ctx, "{t}a", "{t}b")
	if !redis.HasErrorPrefix(err, "TRYAGAIN") {
		t.Errorf("Delete of a half-migrated slot's keys: %v, want TRYAGAIN", err)
	}
	for _, k := range []string{same, other} {
		if err := plain.Set(ctx, k, "v2"); err != nil {
			t.Errorf("Set %s right after a TRYAGAIN: %v", k, err)
		}
		plain.local.invalidate(k)
		if v, err := plain.Get(ctx, k); err != nil || v != "v2" {
			t.Errorf("Get %s right after a TRYAGAIN = %q, %v", k, v, err)
		}
	}

	// ASK, with WaitReplicas: the moved key is on the target.
	if err := waited.Set(ctx, "{t}a", "v2"); err != nil {
		t.Errorf("Set with WaitReplicas of a key moved by a running migration (ASK): %v", err)
	}
	if err := waited.Delete(ctx, "{t}a"); err != nil {
		t.Errorf("Delete with WaitReplicas of a key moved by a running migration (ASK): %v", err)
	}
	pipe := dstNode.Pipeline() // the target answers for an importing slot after ASKING
	pipe.Do(ctx, "asking")
	exists := pipe.Exists(ctx, plain.remote.key("{t}a"))
	_, _ = pipe.Exec(ctx)
	if n, err := exists.Result(); err != nil || n != 0 {
		t.Errorf("after the Delete, the migration's target still holds the key: %d, %v", n, err)
	}

	// MOVED, with WaitReplicas: waitCC still maps the slot to src.
	finish()
	if err := waited.Set(ctx, "{t}b", "v3"); err != nil {
		t.Errorf("Set with WaitReplicas of a key whose slot moved (MOVED): %v", err)
	}
	raw, err := dstNode.Get(ctx, plain.remote.key("{t}b")).Bytes()
	if p, _ := envelopePayload(raw); err != nil || string(p) != "v3" {
		t.Errorf("the slot's new master holds %q, %v; want v3", raw, err)
	}
	if err := waited.Delete(ctx, "{t}b", same, other); err != nil {
		t.Errorf("Delete with WaitReplicas over 3 masters after the migration: %v", err)
	}
	waitUntil(t, 30*time.Second, "the cluster to be healthy again", func() bool { return tc.healthy(tc.addrs) })
}

// testClusterMasterDown kills a master (not the one holding the process'
// subscription) with cluster-require-full-coverage off, and until its
// replica is promoted checks that keys on the healthy masters work as
// before: every Set of them succeeds, a Delete that also names a key on the
// dead master deletes the others and names only that key in its error, and
// a reader that GetOrLoads keys of every master keeps serving the healthy
// masters' keys from L1 (the dead master's miss and are loaded, and are
// dropped when it answers again).
func testClusterMasterDown(t *testing.T, tc *testCluster) {
	ctx := context.Background()
	ns := uniqueNamespace(t)
	// One process, one Cache (and so its breakers) for reads and writes.
	r := newTestCache[string](t, tc.client(t), Options{Namespace: ns})
	w := r
	check := redis.NewClusterClient(&redis.ClusterOptions{Addrs: tc.addrs, DialerRetries: 1})
	t.Cleanup(func() { _ = check.Close() })
	for _, a := range tc.addrs {
		if err := tc.node(t, a).ConfigSet(ctx, "cluster-require-full-coverage", "no").Err(); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, a := range tc.addrs {
			if tc.nodes[a].cmd != nil {
				_ = tc.node(t, a).ConfigSet(ctx, "cluster-require-full-coverage", "yes").Err()
			}
		}
	})
	subs := map[string]bool{tc.subscriptionNode(t, r): true}
	var victim string
	for m := range tc.masters(t, tc.live()) {
		if !subs[m] {
			victim = m
		}
	}
	replica := tc.masters(t, victim)[victim]
	victimSlots := tc.slotsOf(t, victim)
	onVictim := func(k string) bool { return victimSlots[keySlot(r.remote.key(k))] }
	// The reader's keys on healthy masters (in its L1), the writer's, and
	// keys on the dead master that nobody read before (each read of one
	// misses L1 and tries Redis).
	var read, written, fresh []string
	for _, k := range clusterKeys(10000) {
		switch {
		case onVictim(k):
			fresh = append(fresh, k)
		case len(read) < 300:
			read = append(read, k)
		case len(written) < 30:
			written = append(written, k)
		}
	}
	deadKey := fresh[0]
	fresh = fresh[1:]
	load := func(context.Context, string) (string, error) { return "v1", nil }
	for _, k := range read {
		if _, err := r.GetOrLoad(ctx, k, load); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 10*time.Second, "the reader's L1 to hold "+k, func() bool {
			_, ok := r.local.get(k)
			return ok
		})
	}

	tc.nodes[victim].Stop()
	killedAt := time.Now()
	promoted := make(chan struct{})
	go func() {
		defer close(promoted)
		rdb := redis.NewClient(&redis.Options{Addr: replica})
		defer rdb.Close()
		for time.Since(killedAt) < 20*time.Second {
			if info, err := rdb.Info(ctx, "replication").Result(); err == nil && strings.Contains(info, "role:master") {
				return
			}
			time.Sleep(20 * time.Millisecond) // polling, as waitUntil does
		}
	}()
	// Each round: a read of a key on the dead master (it fails, or loads),
	// a Set of a key on a healthy master, reads of 10 keys on healthy
	// masters (in L1 before the kill); and once, a Delete naming keys on
	// both.
	var sets, setErrs, liveReads, liveHits, deadReads int
	var firstSetErr error
	before := r.Stats()
	deleted := false
	for i := 0; ; i++ {
		select {
		case <-promoted:
		default:
			_, _, _ = r.GetOrLoadFrom(ctx, fresh[i%len(fresh)], load)
			deadReads++
			sets++
			if err := w.Set(ctx, written[i%len(written)], strconv.Itoa(i)); err != nil {
				setErrs++
				if firstSetErr == nil {
					firstSetErr = err
				}
			}
			for j := range 10 {
				_, src, _ := r.GetOrLoadFrom(ctx, read[(i*10+j)%len(read)], load)
				liveReads++
				if src == SourceLocal {
					liveHits++
				}
			}
			if !deleted && time.Since(killedAt) > 500*time.Millisecond {
				deleted = true
				a, b := written[0], written[1]
				start := time.Now()
				err := w.Delete(ctx, a, b, deadKey)
				t.Logf("a Delete naming keys on two healthy masters and the dead one returned after %v: %v",
					time.Since(start).Round(time.Microsecond), err)
				if !errors.Is(err, ErrRemoteUnavailable) {
					t.Errorf("Delete naming a key on the dead master: %v, want ErrRemoteUnavailable", err)
				} else if msg := err.Error(); !strings.Contains(msg, strconv.Quote(deadKey)) || strings.Contains(msg, strconv.Quote(a)) {
					t.Errorf("Delete naming a key on the dead master: %q; want it to name %q and not %q", msg, deadKey, a)
				}
				for _, k := range []string{a, b} {
					if n, err := check.Exists(ctx, w.remote.key(k)).Result(); err != nil || n != 0 {
						t.Errorf("a Delete naming a key on the dead master left %s on a healthy one: %d, %v", k, n, err)
					}
				}
			}
			continue
		}
		break
	}
	after := r.Stats()
	ratio := float64(liveHits) / float64(max(liveReads, 1))
	t.Logf("master %s down for %v until its replica's promotion: Sets of keys on healthy masters %d (%d failed, first: %v); reader: %d reads of keys on healthy masters, %.1f%% L1 hits; %d reads of the dead master's keys; flushes +%d",
		victim, time.Since(killedAt).Round(time.Millisecond), sets, setErrs, firstSetErr, liveReads, 100*ratio, deadReads,
		after.Flushes-before.Flushes)
	if setErrs != 0 {
		t.Errorf("%d of %d Sets of keys on healthy masters failed while one master was down (first: %v)", setErrs, sets, firstSetErr)
	}
	if ratio < 0.9 {
		t.Errorf("with one master down, the reader served %.1f%% of the healthy masters' keys from L1, want at least 90%%", 100*ratio)
	}
}

// testClusterHungMaster stops (SIGSTOP) a master that holds neither
// instance's subscription, for less than cluster-node-timeout (no
// failover), with default ClusterClients: a PUBLISH to it, a slot-map
// reload that asks it, a call for one of its keys each wait for the
// client's ReadTimeout (3 s). The subscriptions must stay healthy (the
// heartbeats through the other masters, and the PINGs, still come back),
// L1 keeps serving, and invalidations of keys on the other masters still
// arrive.
func testClusterHungMaster(t *testing.T, tc *testCluster) {
	ctx := context.Background()
	const interval = 100 * time.Millisecond // a path is dead after 300 ms
	const hang = 1500 * time.Millisecond    // below cluster-node-timeout (2 s)
	caches := clusterInstances(t, tc, 2, Options{HeartbeatInterval: interval})
	w, r := caches[0], caches[1]
	subs := map[string]bool{tc.subscriptionNode(t, w): true, tc.subscriptionNode(t, r): true}
	var victim string
	for m := range tc.masters(t, tc.live()) {
		if !subs[m] {
			victim = m
		}
	}
	victimSlots := tc.slotsOf(t, victim)
	var live []string
	for _, k := range clusterKeys(60) {
		if !victimSlots[keySlot(r.remote.key(k))] {
			live = append(live, k)
		}
	}
	for _, k := range live {
		if err := w.Set(ctx, k, "v1"); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 10*time.Second, "the reader's L1 to hold "+k, func() bool {
			v, err := r.Get(ctx, k)
			e, ok := r.local.get(k)
			return err == nil && v == "v1" && ok && e.value == "v1"
		})
	}
	waitUntil(t, 10*time.Second, "both subscriptions to be healthy", func() bool {
		return w.sub.healthy() && r.sub.healthy()
	})
	before := []Stats{w.Stats(), r.Stats()}
	resume := stopProcess(t, tc.nodes[victim])
	stoppedAt := time.Now()
	for i := 0; time.Since(stoppedAt) < hang; i++ {
		k := live[i%len(live)]
		if err := w.Set(ctx, k, "v2-"+strconv.Itoa(i)); err != nil {
			t.Errorf("Set of a key on a healthy master while another master hangs: %v", err)
		}
		waitUntil(t, 5*time.Second, "the reader to get the invalidation of "+k, func() bool {
			e, ok := r.local.get(k)
			return !ok || e.value == "v2-"+strconv.Itoa(i)
		})
	}
	resume()
	for i, c := range caches {
		s := c.Stats()
		if gaps, misses := s.SubscriptionGaps-before[i].SubscriptionGaps, s.HeartbeatMisses-before[i].HeartbeatMisses; gaps != 0 || misses != 0 {
			t.Errorf("instance %d: %d subscription gaps, %d heartbeat misses while a master that holds no subscription hung", i, gaps, misses)
		}
	}
	waitUntil(t, 30*time.Second, "the cluster to be healthy again", func() bool { return tc.healthy(tc.addrs) })
}

// testClusterCoalescing runs concurrent Sets and Deletes of keys in a few
// slots (hash tags) and in many: batches are per slot (a script touching
// two slots fails with CROSSSLOT), they form, and the other instance ends
// with what Redis holds for every key.
func testClusterCoalescing(t *testing.T, tc *testCluster) {
	ctx := context.Background()
	ns := uniqueNamespace(t)
	a := newTestCache[string](t, tc.client(t), Options{Namespace: ns})
	b := newTestCache[string](t, tc.client(t), Options{Namespace: ns})
	check := tc.client(t)
	var keys []string
	for i := range 8 {
		keys = append(keys, fmt.Sprintf("{hot%d}k", i%2), fmt.Sprintf("{hot%d}j%d", i%2, i), "spread-"+strconv.Itoa(i))
	}
	for _, k := range keys {
		if err := a.Set(ctx, k, "old"); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Get(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 30 {
				k := keys[(w*5+i)%len(keys)]
				var err error
				if i%6 == 5 {
					err = a.Delete(ctx, k, keys[(w+i)%len(keys)])
				} else {
					err = a.Set(ctx, k, fmt.Sprintf("w%d-%d", w, i))
				}
				if err != nil {
					t.Errorf("write %s: %v", k, err)
				}
			}
		}()
	}
	wg.Wait()
	s := a.Stats()
	if s.WriteBatches == 0 {
		t.Errorf("no batch formed from 16 concurrent writers: %+v", s)
	}
	t.Logf("cluster: 480 writes, %d messages, %d batches holding %d writes", s.InvalidationsPublished, s.WriteBatches, s.WritesCoalesced)
	waitUntil(t, 10*time.Second, "b to apply every message of a", func() bool {
		return b.Stats().InvalidationsReceived >= a.Stats().InvalidationsPublished
	})
	for _, k := range keys {
		want := "(none)"
		if raw, err := check.Get(ctx, a.remote.key(k)).Bytes(); err == nil {
			p, _ := envelopePayload(raw)
			want, _ = a.codec.decode(p)
		}
		for name, c := range map[string]*Cache[string]{"writer": a, "other": b} {
			got := "(none)"
			if v, err := c.Get(ctx, k); err == nil {
				got = v
			}
			if got != want {
				t.Errorf("%s: Get(%s) = %q; Redis holds %q", name, k, got, want)
			}
		}
	}
}
