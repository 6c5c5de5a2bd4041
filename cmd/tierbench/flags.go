package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"
)

// config is what the flags ask for.
type config struct {
	instances  int
	goroutines int
	keys       int
	zipf       float64 // 0: uniform
	reads      int     // relative weight of reads
	batch      int     // keys per read; above 1, read with GetOrLoadMany
	writes     int     // relative weight of writes
	rate       int     // target operations per second, all goroutines together; 0: as fast as possible
	dbLatency  time.Duration
	localTTL   time.Duration
	remoteTTL  time.Duration
	// refreshAfter, if positive, runs the workload twice, without and with
	// Options.RefreshAfter, and compares the latency of hot-key reads.
	refreshAfter time.Duration
	duration     time.Duration
	redis        string   // "" means an embedded miniredis
	cluster      []string // seed addresses of a Redis Cluster; beats redis
	json         bool
	svg          string

	// fleet, if set, runs the fleet mode instead (see fleet.go): for each
	// instance count, writers concurrent Sets of valueBytes-byte values
	// on one instance, with publishValueMax as Options.PublishValueMaxBytes
	// (0: tiered's default).
	fleet           []int
	writers         int
	valueBytes      int
	publishValueMax int
}

// parseFlags parses args. On a bad flag it writes the problem and the
// usage to stderr and returns an error; for -h it returns flag.ErrHelp.
func parseFlags(args []string, stderr io.Writer, getenv func(string) string) (config, error) {
	var c config
	fs := flag.NewFlagSet("tierbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&c.instances, "instances", 3, "cache instances, each with its own Redis client (at least 2)")
	fs.IntVar(&c.goroutines, "goroutines", 32, "goroutines driving the workload, spread over the instances")
	fs.IntVar(&c.keys, "keys", 10000, "number of distinct keys")
	fs.Float64Var(&c.zipf, "zipf", 1.1, "Zipf skew s of key popularity (> 1; larger is more skewed), or 0 for uniform")
	fs.IntVar(&c.reads, "reads", 99, "relative weight of reads (GetOrLoad)")
	fs.IntVar(&c.batch, "batch", 1, "keys per read: above 1, each read asks for this many keys at once (GetOrLoadMany)")
	fs.IntVar(&c.writes, "writes", 1, "relative weight of writes (Set of a new version)")
	fs.IntVar(&c.rate, "rate", 20000, "target operations per second, all goroutines together; 0: as fast as they go\n"+
		"(then latencies include Go's delay in polling the network, up to 10 ms, of a process with every CPU busy)")
	fs.DurationVar(&c.dbLatency, "db-latency", time.Millisecond, "simulated database latency of a load")
	fs.DurationVar(&c.localTTL, "local-ttl", time.Second, "L1 TTL (Options.LocalTTL); short, so that a short run shows every tier")
	fs.DurationVar(&c.remoteTTL, "remote-ttl", 3*time.Second, "Redis TTL (Options.RemoteTTL); keys expire and are loaded again")
	fs.DurationVar(&c.refreshAfter, "refresh-after", 0, "if positive: run twice, without and with Options.RefreshAfter set to this,\n"+
		"and compare the p99 and max latency of reads of the hot keys across their expiry (try -writes 0: writes keep hot keys fresh)")
	fs.DurationVar(&c.duration, "duration", 5*time.Second, "how long to run (each run, with -refresh-after)")
	fs.StringVar(&c.redis, "redis", getenv("REDIS_ADDR"), "address of a real Redis (default $REDIS_ADDR; empty: embedded miniredis)")
	fs.Func("cluster", "seed addresses of a Redis Cluster, comma-separated (host:port,...); beats -redis", func(v string) error {
		c.cluster = strings.Split(v, ",")
		for _, a := range c.cluster {
			if _, _, err := net.SplitHostPort(a); err != nil {
				return fmt.Errorf("not host:port: %q", a)
			}
		}
		return nil
	})
	fs.Func("fleet", "fleet mode: for each of these instance counts (comma-separated, e.g. 10,50,200), run that many\n"+
		"instances with one connection each and -writers concurrent Sets on one of them for -duration, and report\n"+
		"writes/s, invalidations delivered/s and Redis CPU and bytes sent per write", func(v string) error {
		c.fleet = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				return fmt.Errorf("not a number: %q", f)
			}
			c.fleet = append(c.fleet, n)
		}
		return nil
	})
	fs.IntVar(&c.writers, "writers", 8, "fleet mode: concurrent writers on instance 0")
	fs.IntVar(&c.valueBytes, "value-bytes", 200, "fleet mode: size of each value written, in bytes")
	fs.IntVar(&c.publishValueMax, "publish-value-max", 0, "fleet mode: Options.PublishValueMaxBytes (0: tiered's default; -1: send no values)")
	fs.BoolVar(&c.json, "json", false, "write the results as JSON instead of a table")
	fs.StringVar(&c.svg, "svg", "", "also draw the latency per tier as an SVG chart in this file")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "usage: tierbench [flags]\n\n"+
			"Runs a read/write workload on several tiered cache instances sharing one Redis\n"+
			"and prints throughput, hit ratio and latency per tier, loader savings,\n"+
			"invalidation latency and stale reads.\n"+
			"With -fleet, measures instead what a fleet of instances costs Redis per write.\n\nflags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return c, err // the flag package has printed the problem and the usage
	}
	if err := c.validate(fs.Args()); err != nil {
		fmt.Fprintf(stderr, "tierbench: %v\n\n", err)
		fs.Usage()
		return c, err
	}
	return c, nil
}

func (c config) validate(rest []string) error {
	switch {
	case len(rest) > 0:
		return fmt.Errorf("unexpected argument %q (all settings are flags)", rest[0])
	case c.instances < 2:
		return errors.New("-instances must be at least 2: invalidation is measured between instances")
	case c.goroutines < 1:
		return errors.New("-goroutines must be at least 1")
	case c.keys < 1:
		return errors.New("-keys must be at least 1")
	case c.zipf != 0 && !(c.zipf > 1):
		return fmt.Errorf("-zipf must be greater than 1, or 0 for uniform; got %v", c.zipf)
	case c.batch < 1 || c.batch > c.keys:
		return fmt.Errorf("-batch must be between 1 and -keys (%d); got %d", c.keys, c.batch)
	case c.reads < 0 || c.writes < 0:
		return errors.New("-reads and -writes must not be negative")
	case c.reads+c.writes == 0:
		return errors.New("-reads and -writes cannot both be 0")
	case c.rate < 0:
		return errors.New("-rate must not be negative (0: as fast as possible)")
	case c.dbLatency < 0:
		return errors.New("-db-latency must not be negative")
	case c.localTTL <= 0 || c.remoteTTL <= 0:
		return errors.New("-local-ttl and -remote-ttl must be positive")
	case c.refreshAfter < 0 || c.refreshAfter >= c.remoteTTL:
		return errors.New("-refresh-after must be 0 (off) or below -remote-ttl")
	case c.duration <= 0:
		return errors.New("-duration must be positive")
	case slices.ContainsFunc(c.fleet, func(n int) bool { return n < 2 }):
		return errors.New("-fleet counts must be at least 2: invalidations go from one instance to the others")
	case c.writers < 1:
		return errors.New("-writers must be at least 1")
	case c.valueBytes < 0:
		return errors.New("-value-bytes must not be negative")
	case c.fleet != nil && (c.refreshAfter > 0 || c.svg != ""):
		return errors.New("-fleet cannot be combined with -refresh-after or -svg")
	}
	return nil
}
