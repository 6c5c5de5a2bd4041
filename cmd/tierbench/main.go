// Command tierbench shows a tiered cache at work: it starts several cache
// instances in one process, each with its own Redis client, sharing one
// Redis (an embedded miniredis unless -redis or REDIS_ADDR names a real
// one), drives a read/write workload against them, and prints what
// happened: throughput, where reads were answered (L1, L2 or the loader)
// and how fast, how much the loader was spared, how fast a write reaches
// the other instances, and whether any read was stale beyond the stated
// bound. With -refresh-after it runs twice, without and with
// Options.RefreshAfter, and compares the latency of the hot keys' reads.
//
//	go run ./cmd/tierbench
//	go run ./cmd/tierbench -redis 127.0.0.1:6379 -duration 10s -svg latency.svg
//
// With -fleet it measures instead what invalidations cost Redis as a fleet
// grows: for each instance count, that many instances (one connection and
// one subscription each) and -writers concurrent Sets on one of them; it
// reports writes/s, invalidations delivered/s, and the Redis CPU and bytes
// sent per write (from the servers' INFO; on a Cluster, -cluster, summed
// over its masters):
//
//	go run ./cmd/tierbench -redis 127.0.0.1:6379 -fleet 10,50,200 -duration 5s
//
// Progress goes to stderr once a second; the results table (or, with
// -json, the same results as JSON) to stdout. A chart written with -svg is
// named on stderr ("tierbench: wrote latency chart to /abs/path.svg") once
// it is complete. Ctrl-C stops the run early and prints the results so far
// (exit status 130). Bad flags exit with status 2.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	go func() {
		// After the first Ctrl-C, a second one kills the process as usual.
		<-ctx.Done()
		stop()
	}()
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}

// run is the whole program; it returns the exit status. Cancelling ctx
// ends the run early, as Ctrl-C does.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	cfg, err := parseFlags(args, stderr, getenv)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return 2
	}
	if cfg.fleet != nil {
		return runFleetMode(ctx, cfg, stdout, stderr)
	}
	res, err := runCompared(ctx, cfg, stderr)
	if err != nil {
		return failed(ctx, err, stderr)
	}
	if cfg.json {
		err = writeJSON(stdout, res)
	} else {
		err = writeTable(stdout, res)
	}
	if err == nil && cfg.svg != "" {
		err = writeChart(cfg.svg, res, stderr)
	}
	if err != nil {
		fmt.Fprintf(stderr, "tierbench: %v\n", err)
		return 1
	}
	if res.Interrupted {
		return 130
	}
	return 0
}

// failed reports err, which ended a run before it had results, and
// returns the exit code: 130 if ctx ended (an interrupt), else 1.
func failed(ctx context.Context, err error, stderr io.Writer) int {
	if ctx.Err() != nil {
		fmt.Fprintln(stderr, "tierbench: interrupted before the workload started")
		return 130
	}
	fmt.Fprintf(stderr, "tierbench: %v\n", err)
	return 1
}

// runFleetMode is run for -fleet.
func runFleetMode(ctx context.Context, cfg config, stdout, stderr io.Writer) int {
	res, err := runFleet(ctx, cfg, stderr)
	if err != nil {
		return failed(ctx, err, stderr)
	}
	if cfg.json {
		err = writeFleetJSON(stdout, res)
	} else {
		err = writeFleetTable(stdout, res)
	}
	if err != nil {
		fmt.Fprintf(stderr, "tierbench: %v\n", err)
		return 1
	}
	if res.Interrupted {
		return 130
	}
	return 0
}

// writeChart writes the latency chart of r to path and says on stderr
// where it went (as an absolute path: the working directory of a go run
// is easy to lose track of).
func writeChart(path string, r *results, stderr io.Writer) error {
	if err := writeSVGFile(path, r); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "tierbench: wrote latency chart to %s\n", absPath(path))
	return nil
}

// absPath returns path made absolute, or path as given if that fails.
func absPath(path string) string {
	if abs, err := filepath.Abs(path); err == nil {
		return abs
	}
	return path
}
