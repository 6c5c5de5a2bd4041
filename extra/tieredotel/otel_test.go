package tieredotel_test

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/tieredcache/tiered"
	"github.com/tieredcache/tiered/extra/tieredotel"
)

// fixed is a StatsSource that always returns the same Stats.
type fixed tiered.Stats

func (f fixed) Stats() tiered.Stats { return tiered.Stats(f) }

// distinctStats returns Stats whose field i holds base+i, so that every
// observed value names the one field it came from.
func distinctStats(base uint64) tiered.Stats {
	var s tiered.Stats
	v := reflect.ValueOf(&s).Elem()
	for i := range v.NumField() {
		v.Field(i).SetUint(base + uint64(i))
	}
	return s
}

// newMeter returns a meter whose measurements reader collects.
func newMeter(t *testing.T) (*sdkmetric.ManualReader, *sdkmetric.MeterProvider) {
	t.Helper()
	reader := sdkmetric.NewManualReader()
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = provider.Shutdown(context.Background()) })
	return reader, provider
}

// observed is one collected instrument.
type observed struct {
	unit, description string
	byCache           map[string]int64
}

// collect collects reader and returns every instrument by name, failing on
// anything that is not a cumulative monotonic int64 sum whose points carry
// exactly the attribute cache.
func collect(t *testing.T, reader *sdkmetric.ManualReader) map[string]observed {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatalf("Collect: %v", err)
	}
	got := make(map[string]observed)
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			sum, ok := m.Data.(metricdata.Sum[int64])
			if !ok || !sum.IsMonotonic || sum.Temporality != metricdata.CumulativeTemporality {
				t.Errorf("%s is a %T (%+v), want a cumulative monotonic Sum[int64]", m.Name, m.Data, m.Data)
				continue
			}
			o := observed{m.Unit, m.Description, make(map[string]int64)}
			for _, p := range sum.DataPoints {
				cache, ok := p.Attributes.Value("cache")
				if !ok || p.Attributes.Len() != 1 {
					t.Errorf("%s has attributes %v, want cache only", m.Name, p.Attributes.ToSlice())
				}
				o.byCache[cache.AsString()] = p.Value
			}
			if len(o.byCache) > 0 {
				got[m.Name] = o
			}
		}
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

// TestEveryStatsFieldIsObserved fails when tiered.Stats has a field that no
// instrument observes, or that is observed under a name other than its own:
// add the field's row to metrics in metrics.go.
func TestEveryStatsFieldIsObserved(t *testing.T) {
	const base = 1000
	reader, provider := newMeter(t)
	if _, err := tieredotel.Register(provider.Meter("test"), "c", fixed(distinctStats(base))); err != nil {
		t.Fatal(err)
	}
	got := collect(t, reader)

	fieldOf := make(map[int64]string) // value -> field
	typ := reflect.TypeFor[tiered.Stats]()
	for i := range typ.NumField() {
		fieldOf[base+int64(i)] = typ.Field(i).Name
	}
	exported := make(map[string]bool)
	for name, o := range got {
		field, ok := fieldOf[o.byCache["c"]]
		if !ok {
			t.Errorf("%s = %v, which is no field of Stats", name, o.byCache)
			continue
		}
		if exported[field] {
			t.Errorf("Stats.%s is observed twice (again as %s)", field, name)
		}
		exported[field] = true
		if want := "tiered." + snake(field); name != want {
			t.Errorf("Stats.%s is observed as %s, want %s", field, name, want)
		}
		if !strings.HasPrefix(o.unit, "{") || !strings.HasSuffix(o.unit, "}") || o.description == "" {
			t.Errorf("%s has unit %q and description %q, want a {annotation} and a description", name, o.unit, o.description)
		}
	}
	for i := range typ.NumField() {
		if f := typ.Field(i); !exported[f.Name] {
			t.Errorf("Stats.%s (%v) is not observed: add its row to metrics in metrics.go, with its comment in stats.go as description", f.Name, f.Type)
		}
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

func TestRegisterObservesACacheExactly(t *testing.T) {
	c := newCache(t)
	reader, provider := newMeter(t)
	if _, err := tieredotel.Register(provider.Meter("test"), "users", c); err != nil {
		t.Fatal(err)
	}
	want := exercise(t, c)

	got := collect(t, reader)
	typ := reflect.TypeFor[tiered.Stats]()
	if len(got) != typ.NumField() {
		t.Errorf("collected %d instruments, want one per Stats field (%d)", len(got), typ.NumField())
	}
	for i := range typ.NumField() {
		field := typ.Field(i).Name
		name := "tiered." + snake(field)
		v, ok := got[name].byCache["users"]
		if !ok {
			t.Errorf("no %s{cache=\"users\"}", name)
			continue
		}
		if w := int64(reflect.ValueOf(want).Field(i).Uint()); v != w {
			t.Errorf("%s = %d, want %d (Stats.%s)", name, v, w, field)
		}
	}
	if hits, loads := got["tiered.local_hits"].byCache["users"], got["tiered.loads"].byCache["users"]; hits < 2 || loads != 2 {
		t.Errorf("local hits %d, loads %d: want at least 2 and exactly 2", hits, loads)
	}
}

func TestUnregisterStopsObserving(t *testing.T) {
	reader, provider := newMeter(t)
	meter := provider.Meter("test")
	users, orders := distinctStats(100), distinctStats(200)
	regUsers, err := tieredotel.Register(meter, "users", fixed(users))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tieredotel.Register(meter, "orders", fixed(orders)); err != nil {
		t.Fatal(err)
	}
	hits := collect(t, reader)["tiered.local_hits"].byCache
	if len(hits) != 2 || hits["users"] != int64(users.LocalHits) || hits["orders"] != int64(orders.LocalHits) {
		t.Errorf("two caches: tiered.local_hits = %v, want users %d and orders %d", hits, users.LocalHits, orders.LocalHits)
	}

	if err := regUsers.Unregister(); err != nil {
		t.Fatal(err)
	}
	for name, o := range collect(t, reader) {
		if len(o.byCache) != 1 || o.byCache["orders"] == 0 {
			t.Errorf("after Unregister of users: %s = %v, want orders only", name, o.byCache)
		}
	}
	if err := regUsers.Unregister(); err != nil {
		t.Errorf("second Unregister: %v", err)
	}
}

func TestRegisterRejectsNil(t *testing.T) {
	_, provider := newMeter(t)
	if _, err := tieredotel.Register(nil, "c", fixed{}); err == nil {
		t.Error("Register with a nil meter: no error")
	}
	if _, err := tieredotel.Register(provider.Meter("test"), "c", nil); err == nil {
		t.Error("Register with a nil source: no error")
	}
}
