package main

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// A short run on the embedded miniredis, as a user would start it, with
// the chart's path given relative to the working directory.
func TestRunPrintsTableAndChart(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	svg := filepath.Join(dir, "latency.svg")
	var stdout, stderr bytes.Buffer
	args := []string{"-duration", "2s", "-keys", "200", "-goroutines", "4", "-writes", "5", "-svg", "latency.svg"}
	if code := run(context.Background(), args, &stdout, &stderr, noEnv); code != 0 {
		t.Fatalf("exit %d\nstderr:\n%s", code, stderr.String())
	}
	out := stdout.String()
	for _, want := range []string{"throughput", "L1 hit", "L2 hit", "loader hit", "writes", "p99.9",
		"invalidation", "stale reads   0 beyond the bound"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(stderr.String(), "[  1s]") {
		t.Errorf("no progress line on stderr:\n%s", stderr.String())
	}
	if want := "tierbench: wrote latency chart to " + svg + "\n"; !strings.Contains(stderr.String(), want) {
		t.Errorf("stderr does not say %q:\n%s", want, stderr.String())
	}
	f, err := os.Open(svg)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := xml.NewDecoder(f)
	var rects int
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("chart is not well-formed XML: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "rect" {
			rects++
		}
	}
	if rects < 10 {
		t.Errorf("chart has %d rects, want a background, a legend and bars", rects)
	}
}

// The chart's path is reported only once the chart is complete, as given
// if it is absolute; a chart that cannot be written is reported as an error
// and not as written.
func TestWriteChartSaysWhere(t *testing.T) {
	r := &results{Tiers: []tierResult{{Name: "L1", Count: 3, P50us: 1, P99us: 2, P999us: 3}}}
	svg := filepath.Join(t.TempDir(), "chart.svg")
	var stderr bytes.Buffer
	if err := writeChart(svg, r, &stderr); err != nil {
		t.Fatal(err)
	}
	if got, want := stderr.String(), "tierbench: wrote latency chart to "+svg+"\n"; got != want {
		t.Errorf("stderr %q, want %q", got, want)
	}
	if _, err := os.Stat(svg); err != nil {
		t.Error(err)
	}

	stderr.Reset()
	missing := filepath.Join(t.TempDir(), "no such dir", "chart.svg")
	if err := writeChart(missing, r, &stderr); err == nil {
		t.Error("writing into a missing directory succeeded")
	}
	if stderr.Len() != 0 {
		t.Errorf("a failed chart was reported: %q", stderr.String())
	}
}

func TestRunJSON(t *testing.T) {
	var stdout, stderr bytes.Buffer
	args := []string{"-duration", "1500ms", "-keys", "100", "-goroutines", "3", "-writes", "5", "-json"}
	if code := run(context.Background(), args, &stdout, &stderr, noEnv); code != 0 {
		t.Fatalf("exit %d\nstderr:\n%s", code, stderr.String())
	}
	var r results
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("stdout is not JSON: %v\n%s", err, stdout.String())
	}
	checkSane(t, &r)
	if r.Interrupted {
		t.Error("interrupted")
	}
}

// Cancelling the context (what Ctrl-C does) ends the run early with the
// results so far, and exit status 130.
func TestInterruptPrintsPartialResults(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var stdout bytes.Buffer
	var stderr lockedBuffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"-duration", "1m", "-keys", "100", "-goroutines", "2", "-json"}, &stdout, &stderr, noEnv)
	}()
	// Interrupt once the workload has run for a second.
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(stderr.String(), "[  1s]"); {
		if time.Now().After(deadline) {
			t.Fatalf("no progress line after 30s:\n%s", stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	var code int
	select {
	case code = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("run did not stop after cancellation")
	}
	if code != 130 {
		t.Fatalf("exit %d, want 130\nstderr:\n%s", code, stderr.String())
	}
	var r results
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("stdout is not JSON: %v\n%s", err, stdout.String())
	}
	if !r.Interrupted || r.Seconds > 30 {
		t.Errorf("interrupted %v after %.1fs", r.Interrupted, r.Seconds)
	}
	checkSane(t, &r)
	if !strings.Contains(stderr.String(), "interrupted after") {
		t.Errorf("stderr does not say it was interrupted:\n%s", stderr.String())
	}
}

// With REDIS_ADDR set (as in CI), a short run against the real Redis.
func TestRunRealRedis(t *testing.T) {
	addr := os.Getenv("REDIS_ADDR")
	if addr == "" {
		t.Skip("REDIS_ADDR is not set")
	}
	var stdout, stderr bytes.Buffer
	args := []string{"-redis", addr, "-duration", "1500ms", "-keys", "100", "-goroutines", "3", "-writes", "5", "-json"}
	if code := run(context.Background(), args, &stdout, &stderr, noEnv); code != 0 {
		t.Fatalf("exit %d\nstderr:\n%s", code, stderr.String())
	}
	var r results
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	checkSane(t, &r)
}

func checkSane(t *testing.T, r *results) {
	t.Helper()
	if len(r.Tiers) != int(kinds) {
		t.Fatalf("%d tiers, want %d", len(r.Tiers), kinds)
	}
	if r.Reads == 0 || r.Tiers[readL1].Count == 0 || r.Tiers[writeOp].Count == 0 {
		t.Errorf("reads %d, L1 hits %d, writes %d: want some of each", r.Reads, r.Tiers[readL1].Count, r.Tiers[writeOp].Count)
	}
	if r.Loader.Calls == 0 {
		t.Error("no loader calls, though every key starts cold")
	}
	if r.Errors != 0 {
		t.Errorf("%d errors", r.Errors)
	}
	if r.Stale.Beyond != 0 {
		t.Errorf("%d reads stale beyond the bound", r.Stale.Beyond)
	}
	if r.Invalidation.Samples == 0 || r.Invalidation.Lost != 0 {
		t.Errorf("invalidation: %d samples, %d lost", r.Invalidation.Samples, r.Invalidation.Lost)
	}
}

// lockedBuffer is a bytes.Buffer safe for one writer and concurrent readers.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// With -batch, reads go through GetOrLoadMany, and the table shows them as
// one row with where their keys came from.
func TestRunWithBatchReads(t *testing.T) {
	var stdout, stderr bytes.Buffer
	args := []string{"-duration", "1500ms", "-keys", "500", "-goroutines", "3", "-writes", "5", "-batch", "10", "-json"}
	if code := run(context.Background(), args, &stdout, &stderr, noEnv); code != 0 {
		t.Fatalf("exit %d\nstderr:\n%s", code, stderr.String())
	}
	var r results
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	if r.Batch == nil || r.Batch.KeysPerRead != 10 || r.Tiers[readBatch].Count == 0 || r.Tiers[readL1].Count != 0 {
		t.Fatalf("batch %+v, batch reads %d, single reads %d; want only batch reads of 10 keys",
			r.Batch, r.Tiers[readBatch].Count, r.Tiers[readL1].Count)
	}
	if r.Batch.L1Hits == 0 || r.Batch.Loaded == 0 || r.Errors != 0 || r.Stale.Beyond != 0 {
		t.Errorf("batch %+v, %d errors, %d stale beyond the bound; want L1 hits and loads, no errors", r.Batch, r.Errors, r.Stale.Beyond)
	}
	r.cfg.batch = 10
	var table bytes.Buffer
	if err := writeTable(&table, &r); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"batch of 10", "keys in", "from L1", "keys loaded"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
	if strings.Contains(table.String(), "L1 hit") {
		t.Errorf("table shows single-key tiers in a batch run:\n%s", table.String())
	}
}

// With -refresh-after, tierbench runs twice and compares the hot keys'
// reads without and with refresh-ahead, in the table and the chart.
func TestRefreshAfterComparesHotKeyReads(t *testing.T) {
	svg := filepath.Join(t.TempDir(), "latency.svg")
	var stdout, stderr bytes.Buffer
	args := []string{"-duration", "1500ms", "-keys", "100", "-goroutines", "4", "-writes", "0",
		"-local-ttl", "200ms", "-remote-ttl", "500ms", "-refresh-after", "250ms", "-svg", svg}
	if code := run(context.Background(), args, &stdout, &stderr, noEnv); code != 0 {
		t.Fatalf("exit %d\nstderr:\n%s", code, stderr.String())
	}
	out := stdout.String()
	for _, want := range []string{"hot keys", "no refresh", "refresh after 250ms", "refreshes", "refresh after 250ms, 1.5s"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	b, err := os.ReadFile(svg)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"hot keys", "no refresh", "refresh after 250ms", ">max<"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("chart lacks %q", want)
		}
	}
	var stdoutJSON bytes.Buffer
	if code := run(context.Background(), append(args[:len(args)-2], "-json"), &stdoutJSON, &stderr, noEnv); code != 0 {
		t.Fatalf("-json: exit %d", code)
	}
	var r struct {
		Hot struct {
			Refreshes uint64 `json:"refreshes_started"`
		} `json:"hot_keys"`
		HotWithout *struct {
			Reads uint64 `json:"reads"`
		} `json:"hot_keys_without_refresh"`
	}
	if err := json.Unmarshal(stdoutJSON.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	if r.HotWithout == nil || r.Hot.Refreshes == 0 {
		t.Errorf("JSON: %+v; want both runs, and refreshes in the second", r)
	}
}

// The fleet mode runs each fleet size in turn and reports, per size, the
// writes done and the invalidations they delivered to the other instances.
// On the embedded miniredis it says that Redis CPU is not measured.
func TestFleetReportsEverySize(t *testing.T) {
	var stdout, stderr bytes.Buffer
	args := []string{"-fleet", "2,4", "-duration", "300ms", "-writers", "2", "-value-bytes", "50", "-json"}
	if code := run(context.Background(), args, &stdout, &stderr, noEnv); code != 0 {
		t.Fatalf("exit %d\nstderr:\n%s", code, stderr.String())
	}
	var r fleetResults
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("stdout is not JSON: %v\n%s", err, stdout.String())
	}
	if len(r.Sizes) != 2 || r.Sizes[0].Instances != 2 || r.Sizes[1].Instances != 4 {
		t.Fatalf("sizes %+v, want 2 then 4 instances", r.Sizes)
	}
	for _, s := range r.Sizes {
		if s.Writes == 0 || s.WritesPerSec <= 0 || s.Errors != 0 {
			t.Errorf("%d instances: %d writes (%.0f/s), %d errors; want writes and no errors", s.Instances, s.Writes, s.WritesPerSec, s.Errors)
		}
		if s.Published < s.Writes {
			t.Errorf("%d instances: %d messages published for %d writes", s.Instances, s.Published, s.Writes)
		}
		// Every message reaches every other instance (none is lost on a
		// healthy miniredis), and each names at least one key.
		if want := s.Published * uint64(s.Instances-1); s.MessagesDelivered != want || s.KeysInvalidated < want {
			t.Errorf("%d instances: %d messages delivered naming %d keys, want %d", s.Instances, s.MessagesDelivered, s.KeysInvalidated, want)
		}
		if s.CPUMeasured {
			t.Errorf("%d instances: Redis CPU measured on miniredis", s.Instances)
		}
	}
	r.cfg = config{writers: 2, valueBytes: 50, duration: 300 * time.Millisecond}
	var table bytes.Buffer
	if err := writeFleetTable(&table, &r); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"instances", "writes/s", "delivered/s", "Redis CPU/write", "bytes out/write",
		"Redis CPU is not measured on the embedded miniredis"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
}

// With REDIS_ADDR set, the fleet mode measures the server's CPU and bytes
// sent per write.
func TestFleetRealRedisMeasuresCPU(t *testing.T) {
	addr := os.Getenv("REDIS_ADDR")
	if addr == "" {
		t.Skip("REDIS_ADDR is not set")
	}
	var stdout, stderr bytes.Buffer
	args := []string{"-redis", addr, "-fleet", "3", "-duration", "500ms", "-writers", "2", "-json"}
	if code := run(context.Background(), args, &stdout, &stderr, noEnv); code != 0 {
		t.Fatalf("exit %d\nstderr:\n%s", code, stderr.String())
	}
	var r fleetResults
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	if len(r.Sizes) != 1 {
		t.Fatalf("sizes %+v", r.Sizes)
	}
	// The server's CPU clock ticks in ms-ish steps: a few thousand writes
	// cost some of it, and each write sends at least its reply.
	if s := r.Sizes[0]; !s.CPUMeasured || s.Writes == 0 || s.CPUusPerWrite <= 0 || s.BytesOutPerWrite <= 0 {
		t.Errorf("%+v: want writes, and Redis CPU and bytes out per write measured", s)
	}
}
