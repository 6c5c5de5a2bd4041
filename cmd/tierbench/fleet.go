package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tieredcache/tiered"
)

// The fleet mode measures what invalidations cost Redis as a fleet grows.
// For each instance count N it starts N caches on one namespace, each with
// its own Redis client and so its own subscription, as N processes would
// have (with tiny pools and L1s, so that hundreds fit in one process),
// lets -writers goroutines Set -value-bytes values on instance 0 for
// -duration, and reads off the servers' INFO what the writes cost: every
// message a write publishes is delivered to all N subscriptions.

// fleetKeys is how many distinct keys the writers write.
const fleetKeys = 10000

// fleetLocalMaxBytes is each instance's L1 budget: small, because an L1's
// fixed cost grows with it, and nothing is read.
const fleetLocalMaxBytes = 1 << 20

// fleetIdle is how long the servers' idle CPU (heartbeats) is measured
// before the writes start.
const fleetIdle = time.Second

// fleetDrain bounds the wait, after the writes, for the invalidations still
// on their way to the other instances.
const fleetDrain = 5 * time.Second

// runFleet runs the fleet mode for every count in cfg.fleet, in order, on
// one namespace.
func runFleet(ctx context.Context, cfg config, progressOut io.Writer) (*fleetResults, error) {
	be, ns, cleanup, err := startRun(ctx, cfg, progressOut)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	res := newFleetResults(cfg, be.name)
	fmt.Fprintf(progressOut, "tierbench: fleet: %s; %s\n", describeFleet(cfg), be.name)
	for _, n := range cfg.fleet {
		r, err := runFleetOf(ctx, be, ns, n, cfg, progressOut)
		if err != nil {
			return nil, err
		}
		res.Sizes = append(res.Sizes, *r)
		if r.Interrupted {
			res.Interrupted = true
			break
		}
	}
	return res, nil
}

// fleet is N caches with their clients; instance 0 is the writer.
type fleet struct {
	caches  []*tiered.Cache[[]byte]
	clients []redis.UniversalClient
}

// startFleet starts n instances. Instance 0's pool has room for the
// writers; the others need one connection (on a Cluster, one per master)
// besides their subscription, for heartbeats.
func startFleet(be *backend, n int, ns string, cfg config) (*fleet, error) {
	f := &fleet{}
	for i := range n {
		pool := 1
		if i == 0 {
			pool = cfg.writers + 2
		}
		rdb := be.client(pool)
		f.clients = append(f.clients, rdb)
		c, err := tiered.New[[]byte](tiered.Options{
			Redis:                rdb,
			Namespace:            ns,
			LocalMaxBytes:        fleetLocalMaxBytes,
			PublishValueMaxBytes: cfg.publishValueMax,
		})
		if err != nil {
			f.close()
			return nil, err
		}
		f.caches = append(f.caches, c)
	}
	return f, nil
}

func (f *fleet) close() {
	for _, c := range f.caches {
		_ = c.Close()
	}
	for _, rdb := range f.clients {
		_ = rdb.Close()
	}
}

// delivered sums, over every instance but the writer, the invalidation
// messages received and the keys they named.
func (f *fleet) delivered() (messages, keys uint64) {
	for _, c := range f.caches[1:] {
		s := c.Stats()
		messages += s.InvalidationsReceived
		keys += s.KeysInvalidated
	}
	return messages, keys
}

// fleetWriter Sets values on one instance until stopped.
type fleetWriter struct {
	writes, errors atomic.Uint64
	hist           histogram // Set latency; read once stopped
}

func (w *fleetWriter) run(c *tiered.Cache[[]byte], value []byte, seed uint64, stop <-chan struct{}) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 0x666c656574))
	for {
		select {
		case <-stop:
			return
		default:
		}
		key := "k" + strconv.Itoa(rng.IntN(fleetKeys))
		start := time.Now()
		if err := c.Set(ctx, key, value); err != nil {
			w.errors.Add(1)
			continue
		}
		w.hist.record(time.Since(start))
		w.writes.Add(1)
	}
}

// runFleetOf measures a fleet of n instances.
func runFleetOf(ctx context.Context, be *backend, ns string, n int, cfg config, progressOut io.Writer) (*fleetResult, error) {
	fmt.Fprintf(progressOut, "tierbench: fleet of %d: starting the instances\n", n)
	f, err := startFleet(be, n, ns, cfg)
	if err != nil {
		return nil, err
	}
	defer f.close()
	readyCtx, cancel := context.WithTimeout(ctx, 15*time.Second+time.Duration(n)*50*time.Millisecond)
	defer cancel()
	for i, c := range f.caches {
		if err := c.WaitReady(readyCtx); err != nil {
			return nil, fmt.Errorf("fleet of %d: instance %d does not serve from L1: its invalidation subscription never became healthy: %w", n, i, err)
		}
	}

	// The servers' CPU at rest (heartbeats), then during the writes.
	idle0, measured := be.sample(ctx)
	if !sleepCtx(ctx, fleetIdle) {
		return &fleetResult{Instances: n, Interrupted: true}, nil
	}
	idle1, _ := be.sample(ctx)

	writer := f.caches[0]
	pub0 := writer.Stats().InvalidationsPublished
	msgs0, keys0 := f.delivered()
	value := make([]byte, cfg.valueBytes)
	for i := range value {
		value[i] = 'a' + byte(i%26)
	}
	writers := make([]*fleetWriter, cfg.writers)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	start := time.Now()
	for i := range writers {
		w := &fleetWriter{}
		writers[i] = w
		wg.Go(func() { w.run(writer, value, uint64(i), stop) })
	}
	var lastWrites uint64
	var lastAt time.Duration
	interrupted := waitFor(ctx, cfg.duration, func(elapsed time.Duration) {
		var writes uint64
		for _, w := range writers {
			writes += w.writes.Load()
		}
		m, _ := f.delivered()
		fmt.Fprintf(progressOut, "[%3.0fs] fleet of %d: %s writes/s, %s invalidations delivered so far\n",
			elapsed.Seconds(), n, commas(uint64(float64(writes-lastWrites)/(elapsed-lastAt).Seconds())), commas(m-msgs0))
		lastWrites, lastAt = writes, elapsed
	})
	close(stop)
	wg.Wait()
	elapsed := time.Since(start)
	busy, _ := be.sample(ctx)
	published := writer.Stats().InvalidationsPublished - pub0

	// Let what is on its way arrive, so that delivered counts what Redis
	// sent (a lagging instance shows as fewer than published × (n-1)).
	want := published * uint64(n-1)
	for deadline := time.Now().Add(fleetDrain); ; {
		if m, _ := f.delivered(); m-msgs0 >= want || time.Now().After(deadline) || !sleepCtx(ctx, 10*time.Millisecond) {
			break
		}
	}
	msgs, keys := f.delivered()

	r := &fleetResult{Instances: n, Seconds: elapsed.Seconds(), Interrupted: interrupted, Published: published,
		MessagesDelivered: msgs - msgs0, KeysInvalidated: keys - keys0, CPUMeasured: measured}
	var hist histogram
	for _, w := range writers {
		r.Writes += w.writes.Load()
		r.Errors += w.errors.Load()
		hist.merge(&w.hist)
	}
	secs := max(elapsed.Seconds(), 1e-9)
	r.WritesPerSec = float64(r.Writes) / secs
	r.KeysPerSec = float64(r.KeysInvalidated) / secs
	r.SetP50us, r.SetP99us = us(hist.quantile(0.5)), us(hist.quantile(0.99))
	if measured {
		idleRate := (idle1.cpu - idle0.cpu) / fleetIdle.Seconds()
		cpu := busy.cpu - idle1.cpu
		r.IdleCPUPct = 100 * idleRate
		r.CPUPct = 100 * cpu / secs
		if r.Writes > 0 {
			r.CPUusPerWrite = cpu * 1e6 / float64(r.Writes)
			r.NetCPUusPerWrite = max(cpu-idleRate*secs, 0) * 1e6 / float64(r.Writes)
			r.BytesOutPerWrite = float64(busy.netOut-idle1.netOut) / float64(r.Writes)
		}
	}
	return r, nil
}

// sleepCtx sleeps for d; it reports false if ctx was done first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func describeFleet(cfg config) string {
	values := "values sent with invalidations up to tiered's default size"
	switch {
	case cfg.publishValueMax < 0:
		values = "no values sent with invalidations"
	case cfg.publishValueMax > 0:
		values = fmt.Sprintf("values sent with invalidations up to %d bytes", cfg.publishValueMax)
	}
	return fmt.Sprintf("%d writers on instance 0, %d-byte values, %s, %v per fleet size", cfg.writers, cfg.valueBytes, values, cfg.duration)
}
