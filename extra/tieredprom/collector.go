// Package tieredprom exports the counters of tiered caches to Prometheus.
//
// A Collector reads the Stats of the caches added to it whenever it is
// scraped:
//
//	c := tieredprom.NewCollector(tieredprom.Options{Namespace: "myapp"})
//	if err := c.Add("users", users); err != nil { // users is a *tiered.Cache[User]
//		return err
//	}
//	prometheus.MustRegister(c)
//
// Every field of [tiered.Stats] becomes a counter named after the field in
// snake case, with the suffix _total, the prefix <Namespace>_tiered_ (or
// tiered_ without a namespace) and the cache's name as the label "cache":
//
//	myapp_tiered_local_hits_total{cache="users"} 1234
//
// The help text of each counter is the comment of its field in Stats. The
// subscription counters (subscription_gaps_total, heartbeat_misses_total,
// flushes_total) belong to the subscription the caches on one Redis client
// share, and read the same for all of them: do not sum them over caches.
package tieredprom

import (
	"errors"
	"fmt"
	"sync"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/tieredcache/tiered"
)

// StatsSource is what a Collector reads: any *tiered.Cache[V] is one.
type StatsSource interface {
	Stats() tiered.Stats
}

// Options configures a Collector. The zero value is usable.
type Options struct {
	// Namespace, if not empty, is prepended to every metric name:
	// "myapp" gives myapp_tiered_local_hits_total.
	Namespace string
	// ConstLabels are added to every metric, e.g. the service or the Redis
	// the caches use. They must not include "cache".
	ConstLabels prometheus.Labels
}

// Collector is a prometheus.Collector over the Stats of named caches. Caches
// can be added and removed while it is registered. It is safe for concurrent
// use.
type Collector struct {
	descs []*prometheus.Desc // descs[i] describes metrics[i]

	mu      sync.Mutex
	sources map[string]StatsSource
}

// NewCollector returns a Collector with no caches. Register it once, with
// prometheus.Register or Registry.Register, which also reports ConstLabels
// that clash with the "cache" label or are invalid.
func NewCollector(opts Options) *Collector {
	c := &Collector{
		descs:   make([]*prometheus.Desc, len(metrics)),
		sources: make(map[string]StatsSource),
	}
	for i, m := range metrics {
		c.descs[i] = prometheus.NewDesc(prometheus.BuildFQName(opts.Namespace, "tiered", m.name),
			m.help, []string{"cache"}, opts.ConstLabels)
	}
	return c
}

// Add starts exporting src's counters with the label cache=name. It returns
// an error if name is already in use in c, is not valid UTF-8, or src is nil.
func (c *Collector) Add(name string, src StatsSource) error {
	if src == nil {
		return errors.New("tieredprom: Add: nil StatsSource")
	}
	if !utf8.ValidString(name) {
		return fmt.Errorf("tieredprom: Add: cache name %q is not valid UTF-8", name)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.sources[name]; ok {
		return fmt.Errorf("tieredprom: Add: a cache named %q was already added", name)
	}
	c.sources[name] = src
	return nil
}

// Remove stops exporting the cache added as name, e.g. before closing it,
// and reports whether there was one.
func (c *Collector) Remove(name string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.sources[name]
	delete(c.sources, name)
	return ok
}

// Describe sends the descriptors of every counter, as prometheus.Collector
// requires. They are the same whatever caches c holds.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

// Collect sends the current counters of every cache in c, as
// prometheus.Collector requires.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	type named struct {
		name string
		src  StatsSource
	}
	c.mu.Lock()
	srcs := make([]named, 0, len(c.sources))
	for name, src := range c.sources {
		srcs = append(srcs, named{name, src})
	}
	c.mu.Unlock()

	for _, n := range srcs {
		s := n.src.Stats()
		for i, m := range metrics {
			ch <- prometheus.MustNewConstMetric(c.descs[i], prometheus.CounterValue, float64(m.value(&s)), n.name)
		}
	}
}
