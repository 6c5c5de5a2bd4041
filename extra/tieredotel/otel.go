// Package tieredotel exports the counters of tiered caches as OpenTelemetry
// metrics.
//
// Register observes one cache on a metric.Meter until its registration is
// unregistered:
//
//	meter := otel.Meter("myapp") // or provider.Meter(...)
//	reg, err := tieredotel.Register(meter, "users", users) // users is a *tiered.Cache[User]
//	if err != nil {
//		return err
//	}
//	defer reg.Unregister()
//
// Every field of [tiered.Stats] is an Int64ObservableCounter (cumulative,
// monotonic) named "tiered." plus the field in snake case, observed with the
// attribute cache=<name>: tiered.local_hits{cache="users"}. A Prometheus
// exporter shows it as tiered_local_hits_total, the name tieredprom uses.
//
// The subscription counters (tiered.subscription_gaps,
// tiered.heartbeat_misses, tiered.flushes) belong to the subscription the
// caches on one Redis client share, and read the same for all of them: do
// not sum them over caches.
package tieredotel

import (
	"context"
	"errors"
	"fmt"
	"math"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/tieredcache/tiered"
)

// StatsSource is what Register observes: any *tiered.Cache[V] is one.
type StatsSource interface {
	Stats() tiered.Stats
}

// Register creates the instruments for every field of tiered.Stats on meter
// (or gets them, if an earlier Register created them) and registers one
// callback that observes src's Stats with the attribute cache=name on each
// collection. Register every cache under its own name. Unregister the
// returned registration to stop observing src, e.g. before closing it.
func Register(meter metric.Meter, name string, src StatsSource) (metric.Registration, error) {
	if meter == nil || src == nil {
		return nil, errors.New("tieredotel: Register: nil meter or StatsSource")
	}
	counters := make([]metric.Int64ObservableCounter, len(metrics))
	observables := make([]metric.Observable, len(metrics))
	var errs []error
	for i, m := range metrics {
		c, err := meter.Int64ObservableCounter(m.name, metric.WithUnit(m.unit), metric.WithDescription(m.description))
		if err != nil {
			errs = append(errs, err)
		}
		counters[i], observables[i] = c, c
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("tieredotel: Register: %w", err)
	}

	attrs := metric.WithAttributeSet(attribute.NewSet(attribute.String("cache", name)))
	reg, err := meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		s := src.Stats()
		for i, m := range metrics {
			o.ObserveInt64(counters[i], int64(min(m.value(&s), math.MaxInt64)), attrs)
		}
		return nil
	}, observables...)
	if err != nil {
		return nil, fmt.Errorf("tieredotel: Register: %w", err)
	}
	return reg, nil
}
