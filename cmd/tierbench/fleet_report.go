package main

import (
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"strings"
	"text/tabwriter"
)

// fleetResults is what the fleet mode measured, one fleetResult per
// instance count. The table and the JSON show the same.
type fleetResults struct {
	cfg         config
	Config      fleetConfig   `json:"config"`
	Redis       string        `json:"redis"`
	Machine     machine       `json:"machine"`
	Interrupted bool          `json:"interrupted"`
	Sizes       []fleetResult `json:"fleet_sizes"`
}

type fleetConfig struct {
	Writers    int `json:"writers"`
	ValueBytes int `json:"value_bytes"`
	// PublishValueMaxBytes is Options.PublishValueMaxBytes (0: tiered's
	// default).
	PublishValueMaxBytes int     `json:"publish_value_max_bytes"`
	DurationSec          float64 `json:"duration_seconds"`
}

type fleetResult struct {
	Instances   int     `json:"instances"`
	Seconds     float64 `json:"elapsed_seconds"`
	Interrupted bool    `json:"interrupted"`

	Writes       uint64  `json:"writes"` // Sets that returned nil
	Errors       uint64  `json:"errors"`
	WritesPerSec float64 `json:"writes_per_second"`
	SetP50us     float64 `json:"set_p50_us"`
	SetP99us     float64 `json:"set_p99_us"`

	// Published is the writer's Stats.InvalidationsPublished: messages.
	Published uint64 `json:"messages_published"`
	// MessagesDelivered and KeysInvalidated sum the other instances'
	// Stats.InvalidationsReceived and KeysInvalidated.
	MessagesDelivered uint64  `json:"messages_delivered"`
	KeysInvalidated   uint64  `json:"keys_invalidated"`
	KeysPerSec        float64 `json:"invalidations_delivered_per_second"`

	// The servers' INFO (summed over a Cluster's masters); not on the
	// embedded miniredis.
	CPUMeasured   bool    `json:"redis_cpu_measured"`
	CPUusPerWrite float64 `json:"redis_cpu_us_per_write"`
	// NetCPUusPerWrite is CPUusPerWrite less the idle CPU's share: what
	// the writes themselves cost.
	NetCPUusPerWrite float64 `json:"redis_cpu_us_per_write_net_of_idle"`
	CPUPct           float64 `json:"redis_cpu_pct"`      // of one core, during the writes
	IdleCPUPct       float64 `json:"redis_idle_cpu_pct"` // before them: heartbeats
	BytesOutPerWrite float64 `json:"redis_bytes_out_per_write"`
}

func newFleetResults(cfg config, redisName string) *fleetResults {
	return &fleetResults{
		cfg: cfg,
		Config: fleetConfig{Writers: cfg.writers, ValueBytes: cfg.valueBytes, PublishValueMaxBytes: cfg.publishValueMax,
			DurationSec: cfg.duration.Seconds()},
		Redis:   redisName,
		Machine: machine{OS: runtime.GOOS, Arch: runtime.GOARCH, CPUs: runtime.NumCPU(), GoVersion: runtime.Version()},
	}
}

// writeFleetTable writes the fleet results as a table for people.
func writeFleetTable(out io.Writer, r *fleetResults) error {
	var b strings.Builder
	fmt.Fprintf(&b, "tierbench fleet: %s\n", describeFleet(r.cfg))
	fmt.Fprintf(&b, "redis: %s; machine: %s/%s, %d CPUs, %s\n", r.Redis, r.Machine.OS, r.Machine.Arch, r.Machine.CPUs, r.Machine.GoVersion)
	if r.Interrupted {
		b.WriteString("INTERRUPTED: partial results\n")
	}
	b.WriteString("\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "instances\twrites/s\tSet p50\tSet p99\tmessages\tdelivered/s\tRedis CPU/write\tnet of idle\tRedis CPU\tidle CPU\tbytes out/write\terrors\t")
	measured := true
	for _, s := range r.Sizes {
		cpu, net, pct, idle, bytes := "-", "-", "-", "-", "-"
		if s.CPUMeasured {
			cpu, net = fmtUs(s.CPUusPerWrite), fmtUs(s.NetCPUusPerWrite)
			pct, idle = fmt.Sprintf("%.0f%%", s.CPUPct), fmt.Sprintf("%.0f%%", s.IdleCPUPct)
			bytes = commas(uint64(s.BytesOutPerWrite))
		} else {
			measured = false
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", s.Instances, commas(uint64(s.WritesPerSec)),
			fmtUs(s.SetP50us), fmtUs(s.SetP99us), commas(s.Published), commas(uint64(s.KeysPerSec)),
			cpu, net, pct, idle, bytes, commas(s.Errors))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	b.WriteString("\nmessages: invalidation messages the writer published; delivered/s: keys invalidated per second on the\n" +
		"other instances; Redis CPU: INFO cpu (user+sys) during the writes, per write and as a share of one core;\n" +
		"net of idle: less the idle CPU over the same time; idle CPU: the same before the writes (heartbeats, and on a\n" +
		"Cluster slot-map reloads); bytes out: INFO stats total_net_output_bytes.\n")
	if !measured {
		b.WriteString("Redis CPU is not measured on the embedded miniredis: name a real Redis with -redis or REDIS_ADDR, or a Cluster with -cluster.\n")
	}
	_, err := io.WriteString(out, b.String())
	return err
}

func writeFleetJSON(w io.Writer, r *fleetResults) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}
