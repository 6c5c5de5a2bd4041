package tieredprom_test

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"
	"github.com/tieredcache/tiered"
	"github.com/tieredcache/tiered/extra/tieredprom"
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

	// One collector for all caches, each added under its own name.
	metrics := tieredprom.NewCollector(tieredprom.Options{Namespace: "myapp"})
	if err := metrics.Add("users", users); err != nil {
		panic(err)
	}
	defer metrics.Remove("users")
	reg := prometheus.NewRegistry() // or prometheus.MustRegister(metrics)
	reg.MustRegister(metrics)

	_, _ = users.GetOrLoad(context.Background(), "42", func(ctx context.Context, id string) (User, error) {
		return User{Name: "Ada"}, nil
	})

	// Scrape /metrics and show one counter.
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	for sc := bufio.NewScanner(rec.Body); sc.Scan(); {
		if strings.Contains(sc.Text(), "myapp_tiered_loads_total") {
			fmt.Println(sc.Text())
		}
	}
	// Output:
	// # HELP myapp_tiered_loads_total Loader calls (one per key however many callers waited).
	// # TYPE myapp_tiered_loads_total counter
	// myapp_tiered_loads_total{cache="users"} 1
}
