package tiered

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"testing"
	"time"
)

// Batch sub-benchmarks of BenchmarkTiers (issue 13). An op is one batch of
// benchBatch keys (a window of the benchmark's keys):
//
//	pair-GetMany-L1          GetMany of 100 keys L1 holds, and 100 L1-Gets
//	                         into a map like GetMany's result, alternately
//	                         (target: x-100-L1-Get+map ≤ 1)
//	pair-GetMany-L2          GetMany of 100 keys in Redis only (the L2-Get
//	                         Cache), and one raw MGET of 100 keys + 100
//	                         json.Unmarshal into a *benchValue (as the
//	                         Cache decodes), alternately (target:
//	                         x-redis-MGET+decode ≤ 1.3)
//	GetOrLoadMany-cold       GetOrLoadMany of 100 keys no tier has: one MGET
//	                         round trip (leases), one batch load (one
//	                         database call: dbLatency), one write-back round
//	                         trip
//	GetOrLoad-cold-x100      the same 100 keys by 100 sequential GetOrLoads
//	                         (100 database calls)
const benchBatch = 100

// batchWindows returns windows of benchBatch keys of keys, each starting
// benchBatch after the one before, wrapping around: a key is read again
// only after about len(keys) others.
func batchWindows(keys []string) [][]string {
	var ws [][]string
	for start := 0; start < 16*len(keys); start += benchBatch {
		w := make([]string, benchBatch)
		for j := range w {
			w[j] = keys[(start+j)%len(keys)]
		}
		ws = append(ws, w)
	}
	return ws
}

// loadMany is the simulated database's batch query: one call of dbLatency
// for all keys.
func (env *benchEnv) loadMany(_ context.Context, keys []string) (map[string]*benchValue, error) {
	if env.dbLatency > 0 {
		time.Sleep(env.dbLatency)
	}
	m := make(map[string]*benchValue, len(keys))
	for _, k := range keys {
		m[k] = env.values[len(k)%benchKeys]
	}
	return m, nil
}

func (env *benchEnv) batchBenchmarks() []tierBenchmark {
	windows, rawWindows := batchWindows(env.readKeys), batchWindows(env.rawKeys)
	n := uint64(len(windows))
	getMany := func(c *Cache[*benchValue]) benchOp {
		return func(ctx context.Context, i uint64) error {
			m, err := c.GetMany(ctx, windows[i%n])
			if err != nil {
				return err
			}
			if len(m) != benchBatch {
				return fmt.Errorf("GetMany found %d of %d keys", len(m), benchBatch)
			}
			return touchValue(m[windows[i%n][0]])
		}
	}
	l1Gets := func(ctx context.Context, i uint64) error {
		m := make(map[string]*benchValue, benchBatch)
		for _, k := range windows[i%n] {
			v, err := env.cache.Get(ctx, k)
			if err != nil {
				return err
			}
			m[k] = v
		}
		return touchValue(m[windows[i%n][0]])
	}
	mgetDecode := func(ctx context.Context, i uint64) error {
		vals, err := env.rdb.MGet(ctx, rawWindows[i%n]...).Result()
		if err != nil {
			return err
		}
		for _, js := range vals {
			s, _ := js.(string)
			var v *benchValue // the type the Cache holds: decoding it costs more than a benchValue
			if err := json.Unmarshal([]byte(s), &v); err != nil {
				return err
			}
			if err := touchValue(v); err != nil {
				return err
			}
		}
		return nil
	}
	cold := func(ctx context.Context) []string {
		seq := strconv.FormatUint(env.loadSeq.Add(1), 10)
		keys := make([]string, benchBatch)
		for j := range keys {
			keys[j] = "batch-" + seq + "-" + strconv.Itoa(j)
		}
		return keys
	}
	load, loadMany := env.load, env.loadMany // method values, made once
	return []tierBenchmark{
		{name: "pair-GetMany-L1", pair: func(b *testing.B, mode string) {
			warmL1(b, env, env.cache)
			runBenchPair(b, mode, benchPair{tier: getMany(env.cache), tierName: "GetMany-L1", tierBlock: 16,
				floor: l1Gets, floorName: "100-L1-Get+map", floorBlock: 16, unit: "x-100-L1-Get+map"})
		}},
		{name: "pair-GetMany-L2", pair: func(b *testing.B, mode string) {
			runBenchPair(b, mode, benchPair{tier: getMany(env.l2), tierName: "GetMany-L2", tierBlock: 4,
				floor: mgetDecode, floorName: "redis-MGET+decode", floorBlock: 4, unit: "x-redis-MGET+decode"})
		}},
		{name: "GetOrLoadMany-cold", op: func(ctx context.Context, _ uint64) error {
			keys := cold(ctx)
			m, err := env.loader.GetOrLoadMany(ctx, keys, loadMany)
			if err != nil {
				return err
			}
			if len(m) != benchBatch {
				return fmt.Errorf("GetOrLoadMany returned %d of %d keys", len(m), benchBatch)
			}
			return nil
		}},
		{name: "GetOrLoad-cold-x100", op: func(ctx context.Context, _ uint64) error {
			for _, k := range cold(ctx) {
				v, err := env.loader.GetOrLoad(ctx, k, load)
				if err != nil {
					return err
				}
				if err := touchValue(v); err != nil {
					return err
				}
			}
			return nil
		}},
	}
}
