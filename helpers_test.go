package tiered

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// Shared test helpers. Tests that need a real Redis either use the shared
// server named by REDIS_ADDR (with a unique namespace, never FLUSH*), or
// start a private redis-server on a free loopback port when they kill
// connections, restart or stall Redis.

// uniqueNamespace returns a namespace no other test (or test process) uses.
func uniqueNamespace(t testing.TB) string {
	return fmt.Sprintf("t-%s-%08x", strings.ReplaceAll(t.Name(), "/", "-"), rand.Uint32())
}

// newMiniredis starts an embedded Redis and returns it with a client on it.
func newMiniredis(t testing.TB) (*miniredis.Miniredis, *redis.Client) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	return mr, rdb
}

// newTestCache creates a Cache on rdb with a fresh namespace unless opts
// names one, closes it at cleanup, and waits until its invalidation
// subscription is confirmed and healthy, so that L1 is in use.
func newTestCache[V any](t testing.TB, rdb redis.UniversalClient, opts Options) *Cache[V] {
	t.Helper()
	return newTestCacheClock[V](t, rdb, opts, newClock())
}

// newTestCacheClock is newTestCache with a given clock (e.g. a manual one).
func newTestCacheClock[V any](t testing.TB, rdb redis.UniversalClient, opts Options, clk *clock) *Cache[V] {
	t.Helper()
	opts.Redis = rdb
	if opts.Namespace == "" {
		opts.Namespace = uniqueNamespace(t)
	}
	c, err := newCache[V](opts, clk, clk.close)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	waitUntil(t, 10*time.Second, "subscription ready", func() bool {
		return c.ready.Load() && c.sub.healthy()
	})
	return c
}

// waitUntil polls cond until it holds, failing the test after timeout. It is
// for events the code under test exposes no signal for (a message arriving
// in another goroutine); the timeout is a failure bound, not a sleep.
func waitUntil(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for: %s", timeout, what)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// realRedis returns a client on the shared real Redis named by REDIS_ADDR,
// or skips the test. CI always sets REDIS_ADDR.
func realRedis(t testing.TB) *redis.Client {
	t.Helper()
	addr := os.Getenv("REDIS_ADDR")
	if addr == "" {
		skipOrFail(t, "REDIS_ADDR is not set: this test needs a real Redis (e.g. REDIS_ADDR=127.0.0.1:6379)")
	}
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	if err := rdb.Ping(context.Background()).Err(); err != nil {
		skipOrFail(t, fmt.Sprintf("no Redis answers at REDIS_ADDR=%s: %v", addr, err))
	}
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// skipOrFail skips, or fails under CI (CI=true), where every test must run.
func skipOrFail(t testing.TB, msg string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// redisServer is a private redis-server process on a free loopback port.
type redisServer struct {
	t    testing.TB
	Addr string
	port int
	bin  string
	dir  string
	args []string
	cmd  *exec.Cmd
}

// startRedisServer starts a private redis-server (extra arguments are
// passed on) and stops it at cleanup. It skips the test if redis-server is
// not installed (fails under CI).
func startRedisServer(t testing.TB, extra ...string) *redisServer {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		skipOrFail(t, "redis-server is not installed: this test needs a private Redis (apt-get install redis-server)")
	}
	s := &redisServer{t: t, bin: bin, port: freePort(t), dir: t.TempDir()}
	s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
	s.args = append([]string{
		"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.dir,
		"--logfile", filepath.Join(s.dir, "redis.log"),
	}, extra...)
	s.start()
	t.Cleanup(s.Stop)
	return s
}

func (s *redisServer) start() {
	s.t.Helper()
	s.cmd = exec.Command(s.bin, s.args...)
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("start redis-server: %v", err)
	}
	rdb := redis.NewClient(&redis.Options{Addr: s.Addr, MaxRetries: -1})
	defer rdb.Close()
	waitUntil(s.t, 10*time.Second, "redis-server on "+s.Addr+" to answer PING", func() bool {
		return rdb.Ping(context.Background()).Err() == nil
	})
}

// Stop kills the server. Calling it twice is fine.
func (s *redisServer) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}

// Restart kills the server and starts a new one on the same port (with an
// empty dataset: nothing is saved).
func (s *redisServer) Restart() {
	s.t.Helper()
	s.Stop()
	s.start()
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// processHook is a go-redis hook running process around every command.
type processHook struct {
	process func(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error
}

func (h processHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h processHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { return h.process(ctx, cmd, next) }
}

func (h processHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// envelopePayload returns the payload of the envelope b.
func envelopePayload[B ~string | ~[]byte](b B) ([]byte, error) {
	env, err := decodeEnvelope([]byte(b))
	return env.payload, err
}

// encodeInvalidation returns a message from origin naming keys, as the
// delete script would publish it for a write of version.
func encodeInvalidation(origin, version uint64, keys ...string) []byte {
	b := binary.BigEndian.AppendUint64(messageHead(msgKeys, origin), version)
	return append(b, encodeKeys(keys...)...)
}

// encodeValueMessage returns a message from origin carrying envelope as the
// new value of key, as the write script would publish it.
func encodeValueMessage(origin, version uint64, key string, envelope []byte) []byte {
	b := binary.BigEndian.AppendUint64(messageHead(msgValue, origin), version)
	return append(append(b, encodeKeys(key)...), envelope...)
}
