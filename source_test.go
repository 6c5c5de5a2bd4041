package tiered

import (
	"context"
	"testing"
)

// GetFrom and GetOrLoadFrom say which tier answered, at no cost to an L1 hit.
func TestReadsSayWhichTierAnswered(t *testing.T) {
	ctx := context.Background()
	mr, rdb := newMiniredis(t)
	a := newTestCache[string](t, rdb, Options{})
	b := newTestCache[string](t, coreOtherClient(t, mr), Options{Namespace: a.opts.Namespace})
	load := func(context.Context, string) (string, error) { return "loaded", nil }
	check := func(what string, got, want Source, err error) {
		t.Helper()
		if err != nil || got != want {
			t.Errorf("%s: source %v, %v; want %v", what, got, err, want)
		}
	}
	_, src, err := a.GetOrLoadFrom(ctx, "k", load)
	check("first GetOrLoadFrom", src, SourceLoader, err)
	_, src, err = b.GetOrLoadFrom(ctx, "k", load)
	check("another instance's GetOrLoadFrom", src, SourceRemote, err)
	waitUntil(t, invWait, "L1 to hold k", func() bool {
		_, src, _ := a.GetFrom(ctx, "k")
		return src == SourceLocal
	})
	if _, src, err := a.GetFrom(ctx, "absent"); src != SourceRemote || err == nil {
		t.Errorf("GetFrom of an absent key: %v, %v; want SourceRemote and ErrNotFound", src, err)
	}
	if n := testing.AllocsPerRun(100, func() { _, _, _ = a.GetFrom(ctx, "k") }); n != 0 {
		t.Errorf("an L1 hit through GetFrom allocates %v times", n)
	}
	if SourceLoader.String() != "loader" {
		t.Errorf("SourceLoader.String() = %q", SourceLoader.String())
	}
}
