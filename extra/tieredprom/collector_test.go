package tieredprom_test

import (
	"context"
	"errors"
	"maps"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"
	"github.com/tieredcache/tiered"
	"github.com/tieredcache/tiered/extra/tieredprom"
)

// fixed is a StatsSource that always returns the same Stats.
type fixed tiered.Stats

func (f fixed) Stats() tiered.Stats { return tiered.Stats(f) }

// distinctStats returns Stats whose field i holds base+i, so that every
// exported value names the one field it came from.
func distinctStats(base uint64) tiered.Stats {
	var s tiered.Stats
	v := reflect.ValueOf(&s).Elem()
	for i := range v.NumField() {
		v.Field(i).SetUint(base + uint64(i))
	}
	return s
}

// counter is one gathered counter.
type counter struct {
	help  string
	value float64
}

// gather gathers reg and returns every counter by metric name and cache
// label, failing on anything that is not a counter with exactly the labels
// want (plus "cache").
func gather(t *testing.T, reg prometheus.Gatherer, want prometheus.Labels) map[string]map[string]counter {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	got := make(map[string]map[string]counter)
	for _, mf := range families {
		if mf.GetType() != dto.MetricType_COUNTER {
			t.Errorf("%s is a %v, want a counter", mf.GetName(), mf.GetType())
		}
		byCache := make(map[string]counter)
		for _, m := range mf.GetMetric() {
			labels := make(prometheus.Labels)
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			cache, ok := labels["cache"]
			delete(labels, "cache")
			if !ok || !maps.Equal(labels, want) {
				t.Errorf("%s has labels %v, want cache and %v", mf.GetName(), m.GetLabel(), want)
			}
			byCache[cache] = counter{mf.GetHelp(), m.GetCounter().GetValue()}
		}
		got[mf.GetName()] = byCache
	}
	return got
}

// snake turns a Go field name into snake case: LocalTooLarge -> local_too_large.
func snake(field string) string {
	var b strings.Builder
	rs := []rune(field)
	for i, r := range rs {
		if i > 0 && unicode.IsUpper(r) && (unicode.IsLower(rs[i-1]) || i+1 < len(rs) && unicode.IsLower(rs[i+1])) {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToLower(r))
	}
	return b.String()
}

// TestEveryStatsFieldIsExported fails when tiered.Stats has a field that no
// metric exports, or that is exported under a name other than its own: add
// the field's row to metrics in metrics.go.
func TestEveryStatsFieldIsExported(t *testing.T) {
	const base = 1000
	src := fixed(distinctStats(base))
	c := tieredprom.NewCollector(tieredprom.Options{})
	if err := c.Add("c", src); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	got := gather(t, reg, nil)

	fieldOf := make(map[float64]string) // value -> field
	typ := reflect.TypeFor[tiered.Stats]()
	for i := range typ.NumField() {
		fieldOf[base+float64(i)] = typ.Field(i).Name
	}
	exported := make(map[string]bool)
	for name, byCache := range got {
		field, ok := fieldOf[byCache["c"].value]
		if !ok {
			t.Errorf("%s = %v, which is no field of Stats", name, byCache["c"].value)
			continue
		}
		if exported[field] {
			t.Errorf("Stats.%s is exported twice (again as %s)", field, name)
		}
		exported[field] = true
		if want := "tiered_" + snake(field) + "_total"; name != want {
			t.Errorf("Stats.%s is exported as %s, want %s", field, name, want)
		}
	}
	for i := range typ.NumField() {
		if f := typ.Field(i); !exported[f.Name] {
			t.Errorf("Stats.%s (%v) is not exported: add its row to metrics in metrics.go, with its comment in stats.go as help", f.Name, f.Type)
		}
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("promlint: %v %v", problems, err)
	}
}

// newCache returns a Cache on a fresh miniredis, with L1 in use: a new Cache
// answers from Redis until its subscription's first heartbeat comes back,
// and the tests count L1 hits exactly.
func newCache(t *testing.T) *tiered.Cache[string] {
	t.Helper()
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	c, err := tiered.New[string](tiered.Options{Redis: rdb, Namespace: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })

	ctx := context.Background()
	if err := c.Set(ctx, "warm", "x"); err != nil {
		t.Fatal(err)
	}
	// Each Get before the heartbeat is a round trip to miniredis.
	for deadline := time.Now().Add(10 * time.Second); c.Stats().LocalHits == 0; {
		if _, err := c.Get(ctx, "warm"); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatal("L1 never answered: the subscription did not become healthy")
		}
	}
	return c
}

// exercise runs reads and writes on c whose effect on its Stats is known,
// and returns the Stats they should leave.
func exercise(t *testing.T, c *tiered.Cache[string]) tiered.Stats {
	t.Helper()
	ctx := context.Background()
	want := c.Stats()
	if err := c.Set(ctx, "a", "A"); err != nil {
		t.Fatal(err)
	}
	want.InvalidationsPublished++
	for range 2 {
		if v, err := c.Get(ctx, "a"); v != "A" || err != nil {
			t.Fatalf(`Get("a") = %q, %v`, v, err)
		}
		want.LocalHits++ // an own Set is served from L1
	}
	if _, err := c.Get(ctx, "nope"); !errors.Is(err, tiered.ErrNotFound) {
		t.Fatalf(`Get("nope"): %v, want ErrNotFound`, err)
	}
	want.LocalMisses++
	want.RemoteMisses++
	load := func(_ context.Context, key string) (string, error) { return strings.ToUpper(key), nil }
	if v, err := c.GetOrLoad(ctx, "b", load); v != "B" || err != nil {
		t.Fatalf(`GetOrLoad("b") = %q, %v`, v, err)
	}
	want.LocalMisses++
	want.RemoteMisses++
	want.Loads++
	want.LeasesGranted++ // a miss of both tiers takes the key's lease
	fail := func(context.Context, string) (string, error) { return "", errors.New("db down") }
	if _, err := c.GetOrLoad(ctx, "c", fail); err == nil {
		t.Fatal(`GetOrLoad("c") with a failing loader: no error`)
	}
	want.LocalMisses++
	want.RemoteMisses++
	want.Loads++
	want.LeasesGranted++ // a miss of both tiers takes the key's lease
	want.LoadErrors++

	if got := c.Stats(); got != want {
		t.Fatalf("the cache counted differently from what this test expects:\n got %+v\nwant %+v", got, want)
	}
	return want
}

// statsField returns the field of s called name.
func statsField(s tiered.Stats, name string) float64 {
	return float64(reflect.ValueOf(s).FieldByName(name).Uint())
}

func TestCollectorExportsACacheExactly(t *testing.T) {
	c := newCache(t)
	col := tieredprom.NewCollector(tieredprom.Options{Namespace: "myapp", ConstLabels: prometheus.Labels{"service": "api"}})
	if err := col.Add("users", c); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(col)
	want := exercise(t, c)

	got := gather(t, reg, prometheus.Labels{"service": "api"})
	typ := reflect.TypeFor[tiered.Stats]()
	if len(got) != typ.NumField() {
		t.Errorf("gathered %d metrics, want one per Stats field (%d)", len(got), typ.NumField())
	}
	for i := range typ.NumField() {
		field := typ.Field(i).Name
		name := "myapp_tiered_" + snake(field) + "_total"
		m, ok := got[name]["users"]
		if !ok {
			t.Errorf("no %s{cache=\"users\"}", name)
			continue
		}
		if w := statsField(want, field); m.value != w {
			t.Errorf("%s = %v, want %v (Stats.%s)", name, m.value, w, field)
		}
		if m.help == "" {
			t.Errorf("%s has no help", name)
		}
	}
	// The counters this test drove are not all zero.
	if got["myapp_tiered_local_hits_total"]["users"].value < 2 || got["myapp_tiered_loads_total"]["users"].value != 2 {
		t.Errorf("local hits %v, loads %v: want at least 2 and exactly 2",
			got["myapp_tiered_local_hits_total"]["users"].value, got["myapp_tiered_loads_total"]["users"].value)
	}
}

func TestCollectorAddRemove(t *testing.T) {
	col := tieredprom.NewCollector(tieredprom.Options{})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(col)
	if got := gather(t, reg, nil); len(got) != 0 {
		t.Errorf("no caches: gathered %d metrics, want none", len(got))
	}

	users, orders := distinctStats(100), distinctStats(200)
	if err := col.Add("users", fixed(users)); err != nil {
		t.Fatal(err)
	}
	if err := col.Add("orders", fixed(orders)); err != nil {
		t.Fatal(err)
	}
	if err := col.Add("users", fixed(orders)); err == nil {
		t.Error("Add of a name already in use: no error")
	}
	if err := col.Add("x", nil); err == nil {
		t.Error("Add of a nil source: no error")
	}
	if err := col.Add("\xff", fixed(users)); err == nil {
		t.Error("Add of a name that is not UTF-8: no error")
	}
	got := gather(t, reg, nil)
	if m := got["tiered_local_hits_total"]; len(m) != 2 || m["users"].value != float64(users.LocalHits) || m["orders"].value != float64(orders.LocalHits) {
		t.Errorf("two caches: tiered_local_hits_total = %v, want users %d and orders %d", m, users.LocalHits, orders.LocalHits)
	}

	if !col.Remove("users") {
		t.Error("Remove(users) = false, want true")
	}
	if col.Remove("users") {
		t.Error("second Remove(users) = true, want false")
	}
	got = gather(t, reg, nil)
	if m := got["tiered_local_hits_total"]; len(m) != 1 || m["orders"].value != float64(orders.LocalHits) {
		t.Errorf("after Remove(users): tiered_local_hits_total = %v, want orders %d only", m, orders.LocalHits)
	}
	if err := col.Add("users", fixed(users)); err != nil {
		t.Errorf("Add after Remove: %v", err)
	}
}

func TestConstLabelCacheIsRejectedAtRegistration(t *testing.T) {
	col := tieredprom.NewCollector(tieredprom.Options{ConstLabels: prometheus.Labels{"cache": "x"}})
	if err := prometheus.NewRegistry().Register(col); err == nil || !strings.Contains(err.Error(), "duplicate label names") {
		t.Errorf(`Register with ConstLabels{"cache"}: %v, want an error about duplicate label names`, err)
	}
}
