//go:build unix

package tiered

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A fleet's subscriptions spread evenly over a cluster's masters (each
// costs its node a copy of every invalidation), and each stays on its node
// when go-redis reconnects it by itself: kills of every pubsub connection
// must not gather them on the master of the namespace channel's slot.
func testClusterSubscriptionSpread(t *testing.T, tc *testCluster) {
	const n, rounds = 30, 5
	ctx := context.Background()
	caches := clusterInstances(t, tc, n, Options{})
	for i, c := range caches {
		if err := c.WaitReady(ctx); err != nil {
			t.Fatalf("instance %d: %v", i, err)
		}
	}
	masters := slices.Sorted(maps.Keys(tc.masters(t, tc.live())))
	fair := n / len(masters)
	placement := func(when string) []string {
		t.Helper()
		nodes := make([]string, n)
		per := make(map[string]int)
		for i, c := range caches {
			if nodes[i] = tc.subscriptionNode(t, c); nodes[i] == "" {
				t.Fatalf("%s: instance %d's subscription is on no master", when, i)
			}
			per[nodes[i]]++
		}
		var counts []string
		for _, m := range masters {
			list, err := tc.node(t, m).Do(ctx, "CLIENT", "LIST", "TYPE", "pubsub").Text()
			if err != nil {
				t.Fatal(err)
			}
			counts = append(counts, fmt.Sprintf("%s: %d ours (%d pubsub clients)", m, per[m], strings.Count(list, "\n")))
			if per[m] > 2*fair {
				t.Errorf("%s: master %s holds %d of %d subscriptions, more than twice its fair share of %d", when, m, per[m], n, fair)
			}
		}
		t.Logf("%s: %s", when, strings.Join(counts, ", "))
		return nodes
	}
	first := placement("at start")
	for round := 1; round <= rounds; round++ {
		// Every pubsub connection on the masters is killed: each instance
		// has resubscribed once every pubsub client there is a new one (a
		// higher client id), n of them in all.
		killed := make(map[string]int64)
		for _, m := range masters {
			killed[m] = maxPubSubClientID(t, tc, m)
			if err := tc.node(t, m).Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
				t.Fatal(err)
			}
		}
		waitUntil(t, 30*time.Second, fmt.Sprintf("round %d: all %d subscriptions back, on new connections", round, n), func() bool {
			total := 0
			for _, m := range masters {
				ids := pubSubClientIDs(t, tc, m)
				if len(ids) > 0 && slices.Min(ids) <= killed[m] {
					return false
				}
				total += len(ids)
			}
			return total == n
		})
		for i, c := range caches {
			if err := c.WaitReady(ctx); err != nil {
				t.Fatalf("round %d, instance %d: %v", round, i, err)
			}
		}
		now := placement(fmt.Sprintf("after kill round %d", round))
		moved := 0
		for i := range now {
			if now[i] != first[i] {
				moved++
			}
		}
		if moved > 0 {
			t.Errorf("after kill round %d: %d of %d subscriptions moved to another master", round, moved, n)
		}
	}
}

// pubSubClientIDs returns the ids of the node's clients in pub/sub mode.
func pubSubClientIDs(t *testing.T, tc *testCluster, addr string) []int64 {
	t.Helper()
	list, err := tc.node(t, addr).Do(context.Background(), "CLIENT", "LIST", "TYPE", "pubsub").Text()
	if err != nil {
		t.Fatal(err)
	}
	var ids []int64
	for line := range strings.Lines(list) {
		f, _, _ := strings.Cut(line, " ")
		if id, ok := strings.CutPrefix(f, "id="); ok {
			n, err := strconv.ParseInt(id, 10, 64)
			if err != nil {
				t.Fatalf("CLIENT LIST: %q", line)
			}
			ids = append(ids, n)
		}
	}
	return ids
}

func maxPubSubClientID(t *testing.T, tc *testCluster, addr string) int64 {
	ids := pubSubClientIDs(t, tc, addr)
	if len(ids) == 0 {
		return 0
	}
	return slices.Max(ids)
}
