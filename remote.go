package tiered

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// writeScript stores a value and publishes its invalidation in one round
// trip, atomically: no instance can see the new value in Redis while its
// invalidation is still unsent, and a write cannot land without one. If
// ARGV[5] is "1", the value is appended to the message (see msgValue), so
// that it crosses the network once on its way in.
var writeScript = redis.NewScript(`
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local msg = ARGV[4]
if ARGV[5] == '1' then msg = msg .. ARGV[1] end
redis.call('PUBLISH', ARGV[3], msg)
return 1`)

// deleteScript deletes keys (all in one slot on a cluster) and publishes one
// invalidation naming them all.
var deleteScript = redis.NewScript(`
redis.call('DEL', unpack(KEYS))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1`)

// replaceScript stores a value unless the key holds something other than
// ARGV[3]: a compare-and-set that replaces a corrupt value but not a value
// written since it was read.
var replaceScript = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1`)

// maxKeysPerScript bounds unpack(KEYS) well below Lua's stack limit.
const maxKeysPerScript = 1000

// remote is L2: Redis, under the "<namespace>:" key prefix.
type remote struct {
	client  redis.UniversalClient
	prefix  string
	channel string
	breaker breaker

	waitReplicas int // Options.WaitReplicas
	waitTimeout  time.Duration
}

func (r *remote) key(k string) string { return r.prefix + k }

// get returns the raw L2 value of key; found is false if Redis has none.
func (r *remote) get(ctx context.Context, key string) (b []byte, found bool, err error) {
	if err := r.breaker.allow(); err != nil {
		return nil, false, err
	}
	b, err = r.client.Get(ctx, r.key(key)).Bytes()
	if err == redis.Nil {
		r.breaker.record(nil)
		return nil, false, nil
	}
	return b, err == nil, r.check(ctx, err)
}

// write stores val under key for ttl and publishes msg on the invalidation
// channel, atomically; with appendVal, msg followed by val.
func (r *remote) write(ctx context.Context, key string, val []byte, ttl time.Duration, msg []byte, appendVal bool) error {
	if err := r.breaker.allow(); err != nil {
		return err
	}
	args := []any{val, ttl.Milliseconds(), r.channel, msg, "0"}
	if appendVal {
		args[4] = "1"
	}
	if r.waitReplicas > 0 {
		return r.waited(ctx, []scriptCall{{writeScript, []string{r.key(key)}, args}})
	}
	err := writeScript.Run(ctx, r.client, []string{r.key(key)}, args...).Err()
	return r.check(ctx, err)
}

// fill stores a loaded value under key if Redis has no value for it (SET
// NX), or, if held is not nil, if Redis still holds held (a corrupt value
// the load replaces). A value written by Set while the load ran is newer
// than the loaded one and must win. stored reports whether Redis took the
// value. Nobody can hold the key in L1 while Redis has no value for it, or
// a corrupt one, so no invalidation is published.
func (r *remote) fill(ctx context.Context, key string, val []byte, ttl time.Duration, held []byte) (stored bool, err error) {
	if err := r.breaker.allow(); err != nil {
		return false, err
	}
	if held != nil {
		stored, err = replaceScript.Run(ctx, r.client, []string{r.key(key)}, val, ttl.Milliseconds(), held).Bool()
		return stored, r.check(ctx, err)
	}
	stored, err = r.client.SetNX(ctx, r.key(key), val, ttl).Result()
	return stored, r.check(ctx, err)
}

// del deletes keys and publishes, per script call, the invalidation that
// msg builds for the keys of that call; it returns the number of calls. On
// a cluster the keys are grouped by slot (a script may only touch one slot)
// and the groups pipelined.
func (r *remote) del(ctx context.Context, keys []string, msg func(keys []string) []byte) (int, error) {
	if err := r.breaker.allow(); err != nil {
		return 0, err
	}
	var groups [][]string
	if _, ok := r.client.(*redis.ClusterClient); ok {
		groups = groupBySlot(r.prefix, keys)
	} else {
		groups = [][]string{keys}
	}
	var batches [][]string
	for _, g := range groups {
		for len(g) > maxKeysPerScript {
			batches = append(batches, g[:maxKeysPerScript])
			g = g[maxKeysPerScript:]
		}
		batches = append(batches, g)
	}
	if r.waitReplicas > 0 {
		calls := make([]scriptCall, len(batches))
		for i, b := range batches {
			calls[i] = scriptCall{deleteScript, r.keys(b), []any{r.channel, msg(b)}}
		}
		return len(batches), r.waited(ctx, calls)
	}
	if len(batches) == 1 {
		err := deleteScript.Run(ctx, r.client, r.keys(batches[0]), r.channel, msg(batches[0])).Err()
		return 1, r.check(ctx, err)
	}
	run := func(eval func(pipe redis.Pipeliner, keys []string, args ...any) *redis.Cmd) error {
		pipe := r.client.Pipeline()
		for _, b := range batches {
			eval(pipe, r.keys(b), r.channel, msg(b))
		}
		_, err := pipe.Exec(ctx)
		return err
	}
	err := run(func(p redis.Pipeliner, k []string, a ...any) *redis.Cmd { return deleteScript.EvalSha(ctx, p, k, a...) })
	if err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
		err = run(func(p redis.Pipeliner, k []string, a ...any) *redis.Cmd { return deleteScript.Eval(ctx, p, k, a...) })
	}
	return len(batches), r.check(ctx, err)
}

// scriptCall is one script run: its keys share a slot.
type scriptCall struct {
	script *redis.Script
	keys   []string
	args   []any
}

// errNotReplicated means WAIT returned fewer replicas than asked for.
var errNotReplicated = errors.New("write not acknowledged by enough replicas")

// waited runs calls followed by a WAIT for r.waitReplicas replicas. WAIT
// counts the replication of the writes made on its own connection, so on a
// cluster the calls are grouped by the master of their slot and sent with
// the WAIT in one pipeline to that master's client (which uses one
// connection per pipeline).
func (r *remote) waited(ctx context.Context, calls []scriptCall) error {
	type group struct {
		node  *redis.Client
		calls []scriptCall
	}
	var groups []*group
	switch c := r.client.(type) {
	case *redis.ClusterClient:
		byNode := make(map[*redis.Client]*group)
		for _, call := range calls {
			node, err := c.MasterForKey(ctx, call.keys[0])
			if err != nil {
				return r.check(ctx, err)
			}
			g := byNode[node]
			if g == nil {
				g = &group{node: node}
				byNode[node] = g
				groups = append(groups, g)
			}
			g.calls = append(g.calls, call)
		}
	case *redis.Client:
		groups = []*group{{c, calls}}
	default: // Options.withDefaults rejects other clients
		return fmt.Errorf("%w: WaitReplicas with a %T", ErrInvalidOption, r.client)
	}
	for _, g := range groups {
		err := r.execWaited(ctx, g.node, g.calls)
		if cc, ok := r.client.(*redis.ClusterClient); ok && err != nil && redis.HasErrorPrefix(err, "MOVED") {
			// Our slot map is stale: the slot moved. go-redis follows MOVED
			// by itself, but not on a node's own client.
			cc.ReloadState(ctx)
		}
		if errors.Is(err, errNotReplicated) {
			r.breaker.record(nil) // Redis answered
			return fmt.Errorf("%w: %w", ErrRemoteUnavailable, err)
		}
		if err != nil {
			return r.check(ctx, err)
		}
	}
	r.breaker.record(nil)
	return nil
}

// execWaited sends calls and a WAIT in one pipeline on node.
func (r *remote) execWaited(ctx context.Context, node *redis.Client, calls []scriptCall) error {
	ms := max(r.waitTimeout.Milliseconds(), 1) // WAIT 0 would wait forever
	run := func(byHash bool) (*redis.Cmd, error) {
		pipe := node.Pipeline()
		for _, c := range calls {
			if byHash {
				c.script.EvalSha(ctx, pipe, c.keys, c.args...)
			} else {
				c.script.Eval(ctx, pipe, c.keys, c.args...)
			}
		}
		wait := pipe.Do(ctx, "wait", r.waitReplicas, ms)
		_, err := pipe.Exec(ctx)
		return wait, err
	}
	wait, err := run(true)
	if err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
		wait, err = run(false)
	}
	if err != nil {
		return err
	}
	n, err := wait.Int64()
	if err == nil && n < int64(r.waitReplicas) {
		err = fmt.Errorf("%w: %d of %d within %v", errNotReplicated, n, r.waitReplicas, r.waitTimeout)
	}
	return err
}

func (r *remote) keys(keys []string) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = r.key(k)
	}
	return out
}

// check classifies the result of a Redis call. The caller's own
// cancellation is returned as it is, so it is never mistaken for an outage;
// other failures are wrapped in ErrRemoteUnavailable, and failures to reach
// Redis at all open the breaker.
func (r *remote) check(ctx context.Context, err error) error {
	if err == nil {
		r.breaker.record(nil)
		return nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return ctxErr
	}
	var reply redis.Error
	if !errors.As(err, &reply) || isClusterRedirectFailure(reply) {
		r.breaker.record(err)
		if cc, ok := r.client.(*redis.ClusterClient); ok {
			// A dead master refuses connections and sends no MOVED, so
			// go-redis would keep dialing it until its periodic reload
			// (60 s by default). Ask for a reload now; it is coalesced.
			cc.ReloadState(ctx)
		}
	}
	return fmt.Errorf("%w: %w", ErrRemoteUnavailable, err)
}

// isClusterRedirectFailure reports replies that mean the slot map is wrong
// or the cluster is reconfiguring: they call for a reload like a refused
// connection does.
func isClusterRedirectFailure(err redis.Error) bool {
	return redis.HasErrorPrefix(err, "CLUSTERDOWN") || redis.HasErrorPrefix(err, "TRYAGAIN")
}

// breaker makes calls fail fast while Redis is unreachable, so that an
// outage costs callers a branch instead of a connect timeout each. The
// first failure opens it for 100 ms, doubling with each consecutive failure
// up to 5 s; the first call after the pause tries Redis again, and a success
// closes it.
type breaker struct {
	failures  atomic.Int64
	openUntil atomic.Int64 // UnixNano
	cause     atomic.Pointer[error]

	// onRecover, if set, is called when a call succeeds after failures
	// (at least once after every failure, sometimes more).
	onRecover func()
}

const (
	breakerMinPause = 100 * time.Millisecond
	breakerMaxPause = 5 * time.Second
)

func (b *breaker) allow() error {
	until := b.openUntil.Load()
	if until == 0 || time.Now().UnixNano() >= until {
		return nil
	}
	cause := errors.New("no answer yet")
	if p := b.cause.Load(); p != nil {
		cause = *p
	}
	return fmt.Errorf("%w: breaker open after: %w", ErrRemoteUnavailable, cause)
}

func (b *breaker) record(err error) {
	if err == nil {
		if b.failures.Load() == 0 && b.openUntil.Load() == 0 {
			return
		}
		// Swap both: a failure recorded concurrently leaves one of them set,
		// so the next success recovers again.
		f, u := b.failures.Swap(0), b.openUntil.Swap(0)
		if (f != 0 || u != 0) && b.onRecover != nil {
			b.onRecover()
		}
		return
	}
	n := b.failures.Add(1)
	pause := breakerMaxPause
	if n < 8 {
		pause = min(breakerMinPause<<(n-1), breakerMaxPause)
	}
	b.cause.Store(&err)
	b.openUntil.Store(time.Now().Add(pause).UnixNano())
}
