package tiered

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// BenchmarkSet measures Set of a ~200-byte value (it travels with its
// invalidation) with one writer and with 8 per GOMAXPROCS, on REDIS_ADDR if set (else
// miniredis). msgs/op is the invalidation messages published per Set:
// below 1 when concurrent Sets are group-committed.
//
//	REDIS_ADDR=127.0.0.1:6379 go test -run '^$' -bench BenchmarkSet -benchtime 20000x .
func BenchmarkSet(b *testing.B) {
	env := newBenchEnv(b)
	ctx := context.Background()
	for _, writers := range []int{1, 8} {
		b.Run(fmt.Sprintf("writers=%d", writers)+map[bool]string{true: "xGOMAXPROCS"}[writers > 1], func(b *testing.B) {
			c := newTestCache[*benchValue](b, env.rdb, Options{RemoteTTL: time.Minute})
			before := c.Stats().InvalidationsPublished
			b.ReportAllocs()
			if writers == 1 {
				i := 0
				for b.Loop() {
					if err := c.Set(ctx, env.keys[i&(benchKeys-1)], env.values[i&(benchKeys-1)]); err != nil {
						b.Fatal(err)
					}
					i++
				}
			} else {
				b.SetParallelism(writers) // per GOMAXPROCS
				b.RunParallel(func(pb *testing.PB) {
					i := 0
					for pb.Next() {
						if err := c.Set(ctx, env.keys[i&(benchKeys-1)], env.values[i&(benchKeys-1)]); err != nil {
							b.Error(err)
							return
						}
						i++
					}
				})
			}
			b.ReportMetric(float64(c.Stats().InvalidationsPublished-before)/float64(b.N), "msgs/op")
		})
	}
}
