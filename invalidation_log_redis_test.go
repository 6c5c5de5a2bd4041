package tiered

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// killSubscriptionOf kills, as CLIENT KILL would, the pub/sub connection
// of the client named name, and returns how many it killed.
func killSubscriptionOf(t *testing.T, admin *redis.Client, name string) int {
	t.Helper()
	ctx := context.Background()
	list, err := admin.ClientList(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(list, "\n") {
		if !strings.Contains(line, " name="+name+" ") || strings.Contains(line, " sub=0 ") {
			continue
		}
		for _, f := range strings.Fields(line) {
			if id, ok := strings.CutPrefix(f, "id="); ok {
				if err := admin.Do(ctx, "client", "kill", "id", id).Err(); err != nil {
					t.Fatal(err)
				}
				n++
			}
		}
	}
	return n
}

// The goal: after a CLIENT KILL of one instance's subscription
// while another writes 10 of the 1,000 keys the first holds in L1, the
// first serves the 10 new values, never the old ones, and (with the log)
// at least 90% of the other 990 from L1 once healthy again.
func TestAGapIsRecoveredFromTheInvalidationLog(t *testing.T) {
	for _, tc := range []struct {
		name string
		log  time.Duration
	}{{"flushed without the log", -1}, {"replayed from the log", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			srv := startRedisServer(t)
			admin := clientOn(t, srv.Addr)
			rdbA := redis.NewClient(&redis.Options{Addr: srv.Addr, ClientName: "reader"})
			t.Cleanup(func() { _ = rdbA.Close() })
			const n, written = 1000, 10
			b := newTestCache[string](t, clientOn(t, srv.Addr), Options{InvalidationLog: tc.log})
			a := newTestCache[string](t, rdbA, Options{Namespace: b.opts.Namespace, InvalidationLog: tc.log})
			if err := a.WaitReady(ctx); err != nil {
				t.Fatal(err)
			}
			key := func(i int) string { return "k" + strconv.Itoa(i) }
			for i := range n {
				if err := b.Set(ctx, key(i), "old"); err != nil {
					t.Fatal(err)
				}
			}
			awaitReceived(t, a, n)
			if tc.log == 0 {
				awaitLogPosition(t, a)
			}
			for i := range n {
				mustGet(t, a, key(i), "old")
			}
			flushL1Buffer(a)
			for i := range n {
				if _, src, _ := a.GetFrom(ctx, key(i)); src != SourceLocal {
					t.Fatalf("%s not in a's L1 before the gap", key(i))
				}
			}

			gaps := a.Stats().SubscriptionGaps
			if killed := killSubscriptionOf(t, admin, "reader"); killed != 1 {
				t.Fatalf("killed %d subscriptions of a; want 1", killed)
			}
			for i := range written {
				if err := b.Set(ctx, key(i), "new"); err != nil {
					t.Fatal(err)
				}
			}
			awaitHealed(t, a, gaps+1)

			for i := range written {
				mustGet(t, a, key(i), "new")
			}
			local := 0
			for i := written; i < n; i++ {
				v, src, err := a.GetFrom(ctx, key(i))
				if err != nil || v != "old" {
					t.Fatalf("Get(%s) = %q, %v; want old", key(i), v, err)
				}
				if src == SourceLocal {
					local++
				}
			}
			st := a.Stats()
			ratio := 100 * float64(local) / float64(n-written)
			t.Logf("%s: %d of %d unwritten keys served from L1 after the gap (%.1f%%); %d gaps replayed (%d entries), %d flushed",
				tc.name, local, n-written, ratio, st.GapsReplayed, st.EntriesReplayed, st.GapsFlushed)
			if tc.log < 0 {
				if st.GapsFlushed != 1 || st.GapsReplayed != 0 {
					t.Errorf("without the log: %d gaps flushed, %d replayed; want 1, 0", st.GapsFlushed, st.GapsReplayed)
				}
				return
			}
			if st.GapsReplayed != 1 || st.GapsFlushed != 0 || st.EntriesReplayed == 0 {
				t.Errorf("%d gaps replayed (%d entries), %d flushed; want 1 (at least one entry: a write the kill lost), 0",
					st.GapsReplayed, st.EntriesReplayed, st.GapsFlushed)
			}
			if ratio < 90 {
				t.Errorf("%.1f%% of the unwritten keys served from L1 after the gap; want at least 90%%", ratio)
			}
		})
	}
}

// When the log cannot prove that the instance saw every invalidation since
// its position, the gap heals by a flush, and what L1 held is not served.
func TestAGapFlushesWhenTheLogCannotProveIt(t *testing.T) {
	for _, tc := range []struct {
		name string
		// during runs while a's subscription is held down, after b
		// overwrote k (unless it restarts Redis).
		during func(t *testing.T, srv *redisServer, admin *redis.Client, a, b *Cache[string])
		want   string // what a must then read for k
	}{
		{"Redis restarted empty", func(t *testing.T, srv *redisServer, _ *redis.Client, _, _ *Cache[string]) {
			srv.Restart()
		}, ""},
		{"the log trimmed past the position", func(t *testing.T, _ *redisServer, admin *redis.Client, a, b *Cache[string]) {
			// A window of 1 µs, that is 0 ms, and one entry per stream node:
			// a write trims every entry of an earlier millisecond.
			ctx := context.Background()
			pos := logPosition(a)
			ms, _ := splitStreamID(pos.id)
			waitUntil(t, invWait, "Redis' clock to pass the position's millisecond", func() bool {
				now, err := admin.Time(ctx).Result()
				return err == nil && uint64(now.UnixMilli()) > ms
			})
			if err := b.Set(ctx, "k", "new"); err != nil {
				t.Fatal(err)
			}
			if n, _ := admin.XRange(ctx, a.remote.logKey, pos.id, pos.id).Result(); len(n) != 0 {
				t.Fatalf("the log still holds the position %s", pos.id)
			}
		}, "new"},
		{"the log deleted", func(t *testing.T, _ *redisServer, admin *redis.Client, a, _ *Cache[string]) {
			if err := admin.Del(context.Background(), a.remote.logKey).Err(); err != nil {
				t.Fatal(err)
			}
		}, "new"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			srv := startRedisServer(t, "--stream-node-max-entries", "1")
			admin := clientOn(t, srv.Addr)
			proxy := startProxy(t, srv.Addr)
			log := time.Duration(0)
			if strings.Contains(tc.name, "trimmed") {
				log = time.Microsecond
			}
			b := newTestCache[string](t, clientOn(t, srv.Addr), Options{InvalidationLog: log})
			a := newTestCache[string](t, clientOn(t, proxy.Addr), Options{Namespace: b.opts.Namespace, InvalidationLog: log})
			if err := a.WaitReady(ctx); err != nil {
				t.Fatal(err)
			}
			for _, k := range []string{"k", "other"} {
				if err := b.Set(ctx, k, "old"); err != nil {
					t.Fatal(err)
				}
			}
			awaitReceived(t, a, 2)
			awaitLogPosition(t, a)
			mustGet(t, a, "k", "old")
			mustGet(t, a, "other", "old")
			mustHoldInL1(t, a, "other", "old")

			gaps := a.Stats().SubscriptionGaps
			proxy.StallSubscribers()
			if n := proxy.KillSubscribers(); n != 1 {
				t.Fatalf("killed %d subscriber connections; want 1", n)
			}
			waitUntil(t, invWait, "a to notice the drop", func() bool { return a.Stats().SubscriptionGaps > gaps })
			if !strings.Contains(tc.name, "restarted") {
				for i := range 3 {
					if err := b.Set(ctx, "k", "new"+strconv.Itoa(i)); err != nil {
						t.Fatal(err)
					}
				}
				if err := b.Set(ctx, "k", "new"); err != nil {
					t.Fatal(err)
				}
			}
			tc.during(t, srv, admin, a, b)
			proxy.Resume()
			awaitHealed(t, a, gaps+1)

			v, err := a.Get(ctx, "k")
			if tc.want == "" {
				if !errors.Is(err, ErrNotFound) {
					t.Errorf("Get(k) after Redis restarted empty = %q, %v; want ErrNotFound", v, err)
				}
			} else if err != nil || v != tc.want {
				t.Errorf("Get(k) = %q, %v; want %q", v, err, tc.want)
			}
			if _, src, _ := a.GetFrom(ctx, "other"); src == SourceLocal {
				t.Error("an entry filled before the gap is served from L1 after a heal that could not replay")
			}
			if st := a.Stats(); st.GapsFlushed != 1 || st.GapsReplayed != 0 {
				t.Errorf("%d gaps flushed, %d replayed; want 1, 0", st.GapsFlushed, st.GapsReplayed)
			}
		})
	}
}
