package main

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// serverSample is what the backend's servers report about themselves, summed
// over every master of a Cluster.
type serverSample struct {
	cpu    float64 // seconds: INFO cpu's used_cpu_user + used_cpu_sys
	netOut uint64  // bytes: INFO stats' total_net_output_bytes
}

// sample reads the servers' INFO. It reports false on the embedded
// miniredis, whose INFO has no CPU figures, or if a server did not answer.
func (b *backend) sample(ctx context.Context) (serverSample, bool) {
	if b.mini != nil {
		return serverSample{}, false
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var mu sync.Mutex
	var sum serverSample
	err := b.nodes(ctx, func(ctx context.Context, rdb *redis.Client) error {
		info, err := rdb.Info(ctx, "cpu", "stats").Result()
		if err != nil {
			return err
		}
		f := infoFields(info)
		user, err1 := strconv.ParseFloat(f["used_cpu_user"], 64)
		sys, err2 := strconv.ParseFloat(f["used_cpu_sys"], 64)
		out, err3 := strconv.ParseUint(f["total_net_output_bytes"], 10, 64)
		for _, err := range []error{err1, err2, err3} {
			if err != nil {
				return err
			}
		}
		mu.Lock()
		sum.cpu += user + sys
		sum.netOut += out
		mu.Unlock()
		return nil
	})
	return sum, err == nil
}

// infoFields parses the "name:value" lines of an INFO reply.
func infoFields(info string) map[string]string {
	f := make(map[string]string)
	for line := range strings.Lines(info) {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok {
			f[k] = v
		}
	}
	return f
}
