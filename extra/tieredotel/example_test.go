package tieredotel_test

import (
	"context"
	"fmt"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/tieredcache/tiered"
	"github.com/tieredcache/tiered/extra/tieredotel"
)

type User struct{ Name string }

func Example() {
	mr, err := miniredis.Run() // an embedded Redis; in a service, your own client
	if err != nil {
		panic(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	users, err := tiered.New[User](tiered.Options{Redis: rdb, Namespace: "users:v1"})
	if err != nil {
		panic(err)
	}
	defer users.Close()

	// In a service: the global provider (otel.Meter) with a periodic reader
	// and an exporter. Here a manual reader shows what is exported.
	reader := sdkmetric.NewManualReader()
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer provider.Shutdown(context.Background())

	reg, err := tieredotel.Register(provider.Meter("myapp"), "users", users)
	if err != nil {
		panic(err)
	}
	defer reg.Unregister() // before users.Close

	_, _ = users.GetOrLoad(context.Background(), "42", func(ctx context.Context, id string) (User, error) {
		return User{Name: "Ada"}, nil
	})

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		panic(err)
	}
	for _, m := range rm.ScopeMetrics[0].Metrics {
		if m.Name == "tiered.loads" {
			for _, p := range m.Data.(metricdata.Sum[int64]).DataPoints {
				cache, _ := p.Attributes.Value("cache")
				fmt.Printf("%s %s cache=%s %d\n", m.Name, m.Unit, cache.AsString(), p.Value)
			}
		}
	}
	// Output:
	// tiered.loads {call} cache=users 1
}
