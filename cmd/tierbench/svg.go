package main

import (
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"strings"
	"time"
)

// The chart: one group of bars per tier (and one for invalidation), one
// bar per percentile, on a logarithmic latency axis.
const (
	svgW, svgH                             = 820, 470 // svgW is the least width
	svgLeft, svgRight, svgTop, svgBottom   = 80, 30, 92, 78
	svgPlotH                               = svgH - svgTop - svgBottom
	svgFont                                = "font-family=\"Helvetica,Arial,sans-serif\""
	svgAxisColor, svgGridColor, svgInkDark = "#333", "#ddd", "#222"
)

var svgSeries = []struct{ name, color string }{
	{"p50", "#4c78a8"}, {"p99", "#f58518"}, {"p99.9", "#e45756"}, {"max", "#72b7b2"},
}

type svgGroup struct {
	label, note string
	values      []time.Duration // per series; 0 means no bar
}

func svgGroups(r *results) []svgGroup {
	d := func(us float64) time.Duration { return time.Duration(us * float64(time.Microsecond)) }
	var gs []svgGroup
	for k, t := range r.Tiers {
		if !r.shown(kind(k)) {
			continue
		}
		label, note := t.Name+" hit", fmt.Sprintf("%s reads (%.1f%%)", commas(t.Count), t.SharePct)
		switch kind(k) {
		case writeOp:
			label, note = "write (Set)", commas(t.Count)+" writes"
		case readBatch:
			label = fmt.Sprintf("batch of %d", r.Batch.KeysPerRead)
		}
		gs = append(gs, svgGroup{label, note, []time.Duration{d(t.P50us), d(t.P99us), d(t.P999us), d(t.MaxUs)}})
	}
	inv := r.Invalidation
	gs = append(gs, svgGroup{"invalidation", commas(inv.Samples) + " samples",
		[]time.Duration{d(inv.P50us), d(inv.P99us), 0, d(inv.MaxUs)}})
	if r.HotWithout != nil {
		// Refresh-ahead at work: the hot keys' reads without and with it.
		for _, h := range r.hotRows() {
			gs = append(gs, svgGroup{"hot keys", h.label(),
				[]time.Duration{d(h.P50us), d(h.P99us), d(h.P999us), d(h.MaxUs)}})
		}
	}
	return gs
}

// writeSVG draws the latency chart of r.
func writeSVG(w io.Writer, r *results) error {
	groups := svgGroups(r)
	// Wide enough for every group's label: more groups widen the chart.
	width := max(svgW, svgLeft+svgRight+len(groups)*160) // 4 bars and their labels a group
	plotW := width - svgLeft - svgRight
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, g := range groups {
		for _, v := range g.values {
			if v > 0 {
				lo, hi = math.Min(lo, float64(v)), math.Max(hi, float64(v))
			}
		}
	}
	if math.IsInf(lo, 1) {
		lo, hi = 1e3, 1e6
	}
	// The axis starts a decade below the shortest bar if that bar would
	// otherwise be hardly visible.
	loExp, hiExp := math.Floor(math.Log10(lo)-0.3), math.Ceil(math.Log10(hi))
	if hiExp <= loExp {
		hiExp = loExp + 1
	}
	y := func(ns float64) float64 {
		return svgTop + svgPlotH*(1-(math.Log10(ns)-loExp)/(hiExp-loExp))
	}

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" %s>`+"\n", width, svgH, width, svgH, svgFont)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, svgH)
	text := func(x, y float64, size int, anchor, fill, s string, extra string) {
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="%d" text-anchor="%s" fill="%s"%s>%s</text>`+"\n",
			x, y, size, anchor, fill, extra, html.EscapeString(s))
	}
	title := "tiered: read latency per tier, write and invalidation latency"
	if r.Interrupted {
		title += " (interrupted run)"
	}
	text(svgLeft, 28, 18, "start", svgInkDark, title, ` font-weight="bold"`)
	text(svgLeft, 48, 11, "start", "#555", describe(r.cfg), "")
	text(svgLeft, 64, 11, "start", "#555", fmt.Sprintf("%s; %s/%s, %d CPUs, %s; %s ops/s in %.1fs; log scale",
		r.Redis, r.Machine.OS, r.Machine.Arch, r.Machine.CPUs, r.Machine.GoVersion, commas(uint64(r.OpsPerSec)), r.Seconds), "")

	// Legend.
	for i, s := range svgSeries {
		x := float64(width - svgRight - 280 + i*70)
		fmt.Fprintf(&b, `<rect x="%.1f" y="72" width="12" height="12" fill="%s"/>`+"\n", x, s.color)
		text(x+17, 82, 12, "start", svgInkDark, s.name, "")
	}

	// Grid and latency axis: a line per decade.
	for e := loExp; e <= hiExp; e++ {
		yy := y(math.Pow(10, e))
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s"/>`+"\n", svgLeft, yy, width-svgRight, yy, svgGridColor)
		text(svgLeft-8, yy+4, 12, "end", svgAxisColor, decadeLabel(int(e)), "")
		if e < hiExp {
			for _, m := range []float64{2, 5} {
				ym := y(m * math.Pow(10, e))
				fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#f2f2f2"/>`+"\n", svgLeft, ym, width-svgRight, ym)
			}
		}
	}
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s"/>`+"\n", svgLeft, svgTop, svgLeft, svgTop+svgPlotH, svgAxisColor)
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s"/>`+"\n", svgLeft, svgTop+svgPlotH, width-svgRight, svgTop+svgPlotH, svgAxisColor)
	text(20, svgTop+svgPlotH/2, 12, "middle", svgAxisColor, "latency",
		fmt.Sprintf(` transform="rotate(-90 20 %d)"`, svgTop+svgPlotH/2))

	// Bars.
	groupW := float64(plotW) / float64(len(groups))
	barW := groupW * 0.72 / float64(len(svgSeries))
	base := float64(svgTop + svgPlotH)
	for gi, g := range groups {
		x0 := svgLeft + float64(gi)*groupW + groupW*0.14
		for si, v := range g.values {
			if v <= 0 {
				continue
			}
			x, top := x0+float64(si)*barW, y(float64(v))
			fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s %s: %s</title></rect>`+"\n",
				x+1, top, barW-2, base-top, svgSeries[si].color, html.EscapeString(g.label), svgSeries[si].name, fmtDur(v))
			text(x+barW/2, top-4, 9, "middle", svgInkDark, fmtDur(v), "")
		}
		cx := svgLeft + (float64(gi)+0.5)*groupW
		text(cx, base+20, 13, "middle", svgInkDark, g.label, ` font-weight="bold"`)
		text(cx, base+37, 11, "middle", "#555", g.note, "")
	}
	text(svgLeft, svgH-12, 11, "start", "#777",
		"invalidation: write start on one instance until another instance reads the new value", "")
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// decadeLabel names 10^e nanoseconds: 1ns, 10ns, ..., 1µs, ..., 10s.
func decadeLabel(e int) string {
	units := []string{"ns", "µs", "ms", "s"}
	u := min(max(e/3, 0), len(units)-1)
	return fmt.Sprintf("%g%s", math.Pow(10, float64(e-3*u)), units[u])
}

// writeSVGFile writes the chart to path, through a temporary file so that
// a failed run leaves no half-written chart.
func writeSVGFile(path string, r *results) error {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	err = writeSVG(f, r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("writing chart: %w", err)
	}
	return nil
}
