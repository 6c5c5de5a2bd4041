package main

import (
	"bytes"
	"context"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func noEnv(string) string { return "" }

func TestBadFlagsExit2WithMessageAndUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-instances", "1"}, "-instances must be at least 2"},
		{[]string{"-goroutines", "0"}, "-goroutines must be at least 1"},
		{[]string{"-keys", "0"}, "-keys must be at least 1"},
		{[]string{"-zipf", "1"}, "-zipf must be greater than 1, or 0"},
		{[]string{"-zipf", "0.5"}, "-zipf must be greater than 1, or 0"},
		{[]string{"-zipf", "NaN"}, "-zipf must be greater than 1, or 0"},
		{[]string{"-reads", "-1"}, "must not be negative"},
		{[]string{"-batch", "0"}, "-batch must be between 1 and -keys"},
		{[]string{"-batch", "11", "-keys", "10"}, "-batch must be between 1 and -keys (10)"},
		{[]string{"-reads", "0", "-writes", "0"}, "cannot both be 0"},
		{[]string{"-db-latency", "-1ms"}, "-db-latency must not be negative"},
		{[]string{"-rate", "-5"}, "-rate must not be negative"},
		{[]string{"-local-ttl", "0s"}, "must be positive"},
		{[]string{"-duration", "0s"}, "-duration must be positive"},
		{[]string{"-refresh-after", "3s"}, "-refresh-after must be 0 (off) or below -remote-ttl"},
		{[]string{"-refresh-after", "-1s"}, "-refresh-after must be 0 (off) or below -remote-ttl"},
		{[]string{"extra"}, `unexpected argument "extra"`},
		{[]string{"-fleet", "10,1"}, "-fleet counts must be at least 2"},
		{[]string{"-fleet", "10,x"}, `invalid value "10,x" for flag -fleet: not a number`},
		{[]string{"-fleet", "10", "-writers", "0"}, "-writers must be at least 1"},
		{[]string{"-fleet", "10", "-value-bytes", "-1"}, "-value-bytes must not be negative"},
		{[]string{"-fleet", "10", "-svg", "x.svg"}, "-fleet cannot be combined"},
		{[]string{"-cluster", "127.0.0.1"}, "not host:port"},
		{[]string{"-keys", "many"}, `invalid value "many" for flag -keys`},
		{[]string{"-no-such-flag"}, "flag provided but not defined: -no-such-flag"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), tc.args, &stdout, &stderr, noEnv)
		if code != 2 {
			t.Errorf("%v: exit %d, want 2", tc.args, code)
		}
		if !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%v: stderr does not say %q:\n%s", tc.args, tc.want, stderr.String())
		}
		if !strings.Contains(stderr.String(), "usage: tierbench") {
			t.Errorf("%v: stderr has no usage:\n%s", tc.args, stderr.String())
		}
		if stdout.Len() != 0 {
			t.Errorf("%v: wrote to stdout: %q", tc.args, stdout.String())
		}
	}
}

func TestHelpExits0(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"-h"}, &stdout, &stderr, noEnv); code != 0 {
		t.Errorf("exit %d, want 0", code)
	}
	if !strings.Contains(stderr.String(), "-db-latency") {
		t.Errorf("usage does not list the flags:\n%s", stderr.String())
	}
}

func TestFlagDefaults(t *testing.T) {
	var stderr bytes.Buffer
	cfg, err := parseFlags(nil, &stderr, func(k string) string {
		if k == "REDIS_ADDR" {
			return "10.0.0.1:6379"
		}
		return ""
	})
	if err != nil {
		t.Fatal(err)
	}
	want := config{instances: 3, goroutines: 32, keys: 10000, zipf: 1.1, reads: 99, batch: 1, writes: 1, rate: 20000,
		dbLatency: time.Millisecond, localTTL: time.Second, remoteTTL: 3 * time.Second,
		duration: 5 * time.Second, redis: "10.0.0.1:6379", writers: 8, valueBytes: 200}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("defaults:\n got %+v\nwant %+v", cfg, want)
	}
	cfg, err = parseFlags([]string{"-redis", "", "-zipf", "0", "-json", "-svg", "x.svg"}, &stderr, noEnv)
	if err != nil || cfg.redis != "" || cfg.zipf != 0 || !cfg.json || cfg.svg != "x.svg" {
		t.Errorf("got %+v, %v", cfg, err)
	}
	cfg, err = parseFlags([]string{"-fleet", "10, 50,200", "-cluster", "127.0.0.1:7000,127.0.0.1:7001", "-publish-value-max", "-1"}, &stderr, noEnv)
	if err != nil || !slices.Equal(cfg.fleet, []int{10, 50, 200}) || !slices.Equal(cfg.cluster, []string{"127.0.0.1:7000", "127.0.0.1:7001"}) ||
		cfg.publishValueMax != -1 {
		t.Errorf("got %+v, %v", cfg, err)
	}
}
