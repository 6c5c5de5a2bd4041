//go:build unix

package tiered

import (
	"context"
	"fmt"
	"maps"
	"slices"
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
	caches := clusterInstances(t, tc, n, Options{HeartbeatInterval: 100 * time.Millisecond})
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
		gaps := make([]uint64, n)
		for i, c := range caches {
			gaps[i] = c.Stats().SubscriptionGaps
		}
		for _, m := range masters {
			if err := tc.node(t, m).Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
				t.Fatal(err)
			}
		}
		for i, c := range caches {
			waitUntil(t, 10*time.Second, fmt.Sprintf("instance %d to notice the kill", i), func() bool {
				return c.Stats().SubscriptionGaps > gaps[i]
			})
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
