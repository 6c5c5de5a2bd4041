package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// writeTable writes the results as a table for people.
func writeTable(out io.Writer, r *results) error {
	var b strings.Builder
	fmt.Fprintf(&b, "tierbench: %s\n", describe(r.cfg))
	fmt.Fprintf(&b, "redis: %s; machine: %s/%s, %d CPUs, %s\n", r.Redis, r.Machine.OS, r.Machine.Arch, r.Machine.CPUs, r.Machine.GoVersion)
	if r.Interrupted {
		fmt.Fprintf(&b, "INTERRUPTED after %.1fs: partial results\n", r.Seconds)
	}
	fmt.Fprintf(&b, "\nthroughput  %s ops/s  (%s ops in %.1fs: %s reads, %s writes; %s errors)\n\n",
		commas(uint64(r.OpsPerSec)), commas(r.Ops), r.Seconds, commas(r.Reads), commas(r.Tiers[writeOp].Count), commas(r.Errors))

	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\tcount\tshare\tp50\tp99\tp99.9\tmax\t")
	for k, t := range r.Tiers {
		if !r.shown(kind(k)) {
			continue
		}
		share := "-"
		if kind(k) != writeOp {
			share = fmt.Sprintf("%.1f%%", t.SharePct)
		}
		name := t.Name
		switch kind(k) {
		case readBatch:
			name = fmt.Sprintf("batch of %d", r.Batch.KeysPerRead)
		case writeOp:
		default:
			name += " hit"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", name, commas(t.Count), share,
			fmtUs(t.P50us), fmtUs(t.P99us), fmtUs(t.P999us), fmtUs(t.MaxUs))
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	l, inv, s := r.Loader, r.Invalidation, r.Stale
	if bt := r.Batch; bt != nil {
		pct := func(n uint64) float64 { return 100 * float64(n) / float64(max(bt.Keys, 1)) }
		fmt.Fprintf(&b, "\nbatch         %s keys in %s reads of %d: %.1f%% from L1, %.1f%% from Redis, %.1f%% loaded (instances' Stats)\n",
			commas(bt.Keys), commas(r.Tiers[readBatch].Count), bt.KeysPerRead, pct(bt.L1Hits), pct(bt.RemoteHits), pct(bt.Loaded))
	}
	answered := commas(l.Requests) + " reads answered by a load"
	if r.Batch != nil {
		answered = commas(r.Batch.Loaded) + " keys loaded"
	}
	fmt.Fprintf(&b, "\nloader        %s loader calls for %s; %s L1 misses shared a Redis read or load in flight\n",
		commas(l.Calls), answered, commas(l.SharedFlights))
	fmt.Fprintf(&b, "invalidation  p50 %s, p99 %s, max %s over %s samples (write start on one instance -> new value read on another); %d lost\n",
		fmtUs(inv.P50us), fmtUs(inv.P99us), fmtUs(inv.MaxUs), commas(inv.Samples), inv.Lost)
	fmt.Fprintf(&b, "stale reads   %d beyond the bound of %s (must be 0); %s within it (started after a write returned, before its invalidation arrived)\n",
		s.Beyond, fmtDur(time.Duration(s.BoundMs*float64(time.Millisecond))), commas(s.Within))

	fmt.Fprintf(&b, "\nhot keys      reads of the %d most popular keys, by any tier, across their expiries (from RemoteTTL/2 on: no cold start):\n", r.Hot.Keys)
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\treads\tp50\tp99\tp99.9\tmax\tloader calls\trefreshes\t")
	for _, h := range r.hotRows() {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", h.label(), commas(h.Count),
			fmtUs(h.P50us), fmtUs(h.P99us), fmtUs(h.P999us), fmtUs(h.MaxUs), commas(h.Loads), commas(h.Refreshes))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := io.WriteString(out, b.String())
	return err
}

// hotRows returns the hot-key results to show: the run without
// RefreshAfter first, if there was one.
func (r *results) hotRows() []hotResult {
	if r.HotWithout != nil {
		return []hotResult{*r.HotWithout, r.Hot}
	}
	return []hotResult{r.Hot}
}

func (h hotResult) label() string {
	if h.RefreshAfter > 0 {
		return "refresh after " + fmtDur(time.Duration(h.RefreshAfter*float64(time.Second)))
	}
	return "no refresh"
}

// fmtDur formats d with three significant digits: 183ns, 1.21µs, 61.2µs,
// 1.10ms, 2.10s.
func fmtDur(d time.Duration) string {
	switch {
	case d <= 0:
		return "-"
	case d < time.Microsecond:
		return strconv.FormatInt(int64(d), 10) + "ns"
	case d < time.Millisecond:
		return sig3(float64(d)/1e3) + "µs"
	case d < time.Second:
		return sig3(float64(d)/1e6) + "ms"
	}
	return sig3(float64(d)/1e9) + "s"
}

func fmtUs(us float64) string { return fmtDur(time.Duration(us * float64(time.Microsecond))) }

func sig3(x float64) string {
	switch {
	case x >= 100:
		return strconv.FormatFloat(x, 'f', 0, 64)
	case x >= 10:
		return strconv.FormatFloat(x, 'f', 1, 64)
	}
	return strconv.FormatFloat(x, 'f', 2, 64)
}

// commas formats n with thousands separators: 1,234,567.
func commas(n uint64) string {
	s := strconv.FormatUint(n, 10)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
