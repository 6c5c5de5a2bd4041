package tiered_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/tieredcache/tiered"
)

// The examples run on an embedded miniredis so that they need no server;
// in a service, Options.Redis is your own client.

type User struct {
	ID   string
	Name string
}

// exampleRedis starts an embedded Redis and returns a client on it and a
// function that stops both.
func exampleRedis() (*redis.Client, func()) {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	return rdb, func() {
		_ = rdb.Close()
		mr.Close()
	}
}

func ExampleNew() {
	rdb, stop := exampleRedis()
	defer stop()

	users, err := tiered.New[User](tiered.Options{
		Redis:     rdb,        // required; never closed by the cache
		Namespace: "users:v1", // required; Redis keys are "users:v1:<key>"
		LocalTTL:  30 * time.Second,
		RemoteTTL: time.Hour,
	})
	if err != nil {
		panic(err)
	}
	defer users.Close()

	ctx := context.Background()
	if err := users.Set(ctx, "42", User{ID: "42", Name: "Ada"}); err != nil {
		panic(err)
	}
	u, err := users.Get(ctx, "42")
	fmt.Println(u.Name, err)

	// Unusable options are reported by New.
	_, err = tiered.New[User](tiered.Options{Namespace: "users:v1"})
	fmt.Println(errors.Is(err, tiered.ErrInvalidOption))
	// Output:
	// Ada <nil>
	// true
}

func ExampleCache_GetOrLoad() {
	rdb, stop := exampleRedis()
	defer stop()
	users, err := tiered.New[User](tiered.Options{
		Redis:       rdb,
		Namespace:   "users:v1",
		NegativeTTL: time.Minute, // remember "not found" for a minute
	})
	if err != nil {
		panic(err)
	}
	defer users.Close()

	loads := 0
	loadUser := func(ctx context.Context, id string) (User, error) {
		loads++ // e.g. SELECT ... WHERE id = $1
		if id != "42" {
			return User{}, fmt.Errorf("user %s: %w", id, tiered.ErrNotFound)
		}
		return User{ID: id, Name: "Ada"}, nil
	}

	ctx := context.Background()
	for range 3 {
		u, err := users.GetOrLoad(ctx, "42", loadUser) // L1, else Redis, else loadUser
		fmt.Println(u.Name, err)
	}
	for range 2 {
		_, err := users.GetOrLoad(ctx, "7", loadUser)
		fmt.Println(errors.Is(err, tiered.ErrNotFound))
	}
	fmt.Println("loads:", loads)
	// Output:
	// Ada <nil>
	// Ada <nil>
	// Ada <nil>
	// true
	// true
	// loads: 2
}

func ExampleCache_Set() {
	rdb, stop := exampleRedis()
	defer stop()
	users, err := tiered.New[User](tiered.Options{Redis: rdb, Namespace: "users:v1"})
	if err != nil {
		panic(err)
	}
	defer users.Close()
	ctx := context.Background()

	// After the row changes: write through. Every other instance drops its
	// L1 copy; this one serves the new value at once.
	if err := users.Set(ctx, "42", User{ID: "42", Name: "Grace"}); err != nil {
		// Redis failed (errors.Is(err, tiered.ErrRemoteUnavailable)):
		// this instance's L1 no longer holds the key either.
		panic(err)
	}
	u, err := users.Get(ctx, "42")
	fmt.Println(u.Name, err)

	// After the row is deleted: Delete, everywhere.
	if err := users.Delete(ctx, "42"); err != nil {
		panic(err)
	}
	_, err = users.Get(ctx, "42")
	fmt.Println(errors.Is(err, tiered.ErrNotFound))
	// Output:
	// Grace <nil>
	// true
}

// Per-key L1 TTLs: Options.LocalTTLFunc picks the L1 TTL by key (here by
// prefix), WithLocalTTL overrides it for one call, and Options.LocalTTL
// applies to everything else. An L1 entry never outlives its Redis entry.
func ExampleWithLocalTTL() {
	rdb, stop := exampleRedis()
	defer stop()
	cache, err := tiered.New[string](tiered.Options{
		Redis:     rdb,
		Namespace: "config:v1",
		LocalTTL:  time.Minute,
		LocalTTLFunc: func(key string) time.Duration {
			if strings.HasPrefix(key, "flag:") {
				return 5 * time.Second // feature flags: short-lived in L1
			}
			return 0 // 0: use LocalTTL
		},
	})
	if err != nil {
		panic(err)
	}
	defer cache.Close()
	ctx := context.Background()

	_ = cache.Set(ctx, "flag:dark-mode", "on")                                        // L1 TTL 5s (LocalTTLFunc)
	_ = cache.Set(ctx, "flag:beta", "off", tiered.WithLocalTTL(time.Second))          // L1 TTL 1s (per call)
	_ = cache.Set(ctx, "motd", "hello", tiered.WithRemoteTTL(24*time.Hour))           // L1 TTL 1m (LocalTTL), Redis TTL ~24h
	_, _ = cache.GetOrLoad(ctx, "region", loadRegion, tiered.WithLocalTTL(time.Hour)) // L1 TTL 1h

	for _, key := range []string{"flag:dark-mode", "flag:beta", "motd", "region"} {
		v, err := cache.Get(ctx, key)
		fmt.Println(key, v, err)
	}
	// Output:
	// flag:dark-mode on <nil>
	// flag:beta off <nil>
	// motd hello <nil>
	// region eu-west <nil>
}

func loadRegion(ctx context.Context, key string) (string, error) { return "eu-west", nil }
