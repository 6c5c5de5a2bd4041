package tiered_test

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"

	"github.com/tieredcache/tiered"
)

// TestAdversarialAFullChurningL1ServesNoOverwrittenValue: two instances
// with an L1 so small that every fill evicts, churned by loads of other
// keys on both. Writers on alternate instances Set and Delete their keys;
// after each write, the writer's instance serves it at once
// (read-your-writes) and the other soon serves it too: eviction, a Del racing a buffered Set, the fill buffer and
// re-admission of an evicted key never bring an overwritten value back.
func TestAdversarialAFullChurningL1ServesNoOverwrittenValue(t *testing.T) {
	ctx := context.Background()
	mr := miniredis.RunT(t)
	rdb := newAdvNet(mr.Addr()).client(t)
	ns := advNamespace(t)
	o := tiered.Options{HeartbeatInterval: 5 * time.Second, LocalMaxBytes: 16 << 10}
	insts := []*tiered.Cache[string]{advCache(t, rdb, ns, o), advCache(t, rdb, ns, o)}

	stop := make(chan struct{})
	var churn sync.WaitGroup
	var churned atomic.Int64
	for g := range 4 {
		churn.Add(1)
		go func() {
			defer churn.Done()
			c := insts[g%2]
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				k := "churn-" + strconv.Itoa((i*7+g)%500)
				_, _ = c.GetOrLoad(ctx, k, func(context.Context, string) (string, error) { return k, nil })
				churned.Add(1)
			}
		}()
	}

	var writers sync.WaitGroup
	var failed atomic.Bool
	for g := range 4 {
		writers.Add(1)
		go func() {
			defer writers.Done()
			key := "w-" + strconv.Itoa(g)
			want, wantErr := "", tiered.ErrNotFound
			check := func(who string, c *tiered.Cache[string], step int) {
				v, err := c.Get(ctx, key)
				if v != want || !errors.Is(err, wantErr) && (err != nil || wantErr != nil) {
					if failed.CompareAndSwap(false, true) {
						t.Errorf("step %d: %s Get(%s) = %s; want %s", step, who, key, describe(v, err), describe(want, wantErr))
					}
				}
			}
			for step := range 300 {
				w := (g + step) % 2
				if step%5 == 4 {
					if err := insts[w].Delete(ctx, key); err != nil {
						t.Errorf("Delete: %v", err)
						return
					}
					want, wantErr = "", tiered.ErrNotFound
				} else {
					want, wantErr = key+"-"+strconv.Itoa(step), nil
					if err := insts[w].Set(ctx, key, want); err != nil {
						t.Errorf("Set: %v", err)
						return
					}
				}
				check("the writer", insts[w], step)
				// The other instance serves it once the write's message
				// reached it; an overwritten value brought back would be
				// served until the L1 TTL.
				deadline := time.Now().Add(10 * time.Second)
				for {
					v, err := insts[1-w].Get(ctx, key)
					if v == want && (errors.Is(err, wantErr) || err == nil && wantErr == nil) {
						break
					}
					if time.Now().After(deadline) {
						t.Errorf("step %d: 10 s after the write, the other instance's Get(%s) = %s; want %s",
							step, key, describe(v, err), describe(want, wantErr))
						return
					}
					time.Sleep(200 * time.Microsecond)
				}
				check("the writer", insts[w], step)
			}
		}()
	}
	writers.Wait()
	close(stop)
	churn.Wait()
	if churned.Load() < 1000 {
		t.Errorf("only %d churning loads ran", churned.Load())
	}
}
