package tiered

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// versionLua is the prelude of every script that writes a value or deletes
// one. next_version(key) returns the version of a write of key: Redis' clock
// in microseconds, or, if that is not above the version of the value key
// holds now, that version plus one. So the versions of one key's values only
// grow in the order Redis ran their writes, also within a microsecond and
// across a Delete (which takes a version too). be64 renders a version as 8
// big-endian bytes. Lua numbers are doubles, exact to 2^53; versions stay
// far below (2^52 microseconds is the year 2112), and a foreign value that
// looks like a larger version is ignored so that versions keep growing.
const versionLua = `
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function next_version(key)
  local v = clock
  if redis.call('TYPE', key).ok == 'string' then
    local h = redis.call('GETRANGE', key, 0, 9)
    local f = string.byte(h, 1)
    if #h == 10 and (f == 2 or f == 3) then
      local old = 0
      for i = 3, 10 do old = old * 256 + string.byte(h, i) end
      if old < 4503599627370496 and old >= v then v = old + 1 end
    end
  end
  return v
end
local function be64(v)
  local b = {}
  for i = 8, 1, -1 do
    b[i] = string.char(v % 256)
    v = math.floor(v / 256)
  end
  return table.concat(b)
end
local function stamp(env, v) return string.sub(env, 1, 2) .. v .. string.sub(env, 11) end
`

// writeScript stores a value and publishes its invalidation in one round
// trip, atomically: no instance can see the new value in Redis while its
// invalidation is still unsent, and a write cannot land without one. The
// message is ARGV[4], the version, ARGV[5] (see encodeInvalidation) and, if
// ARGV[6] is "1", the stamped envelope, so that the value crosses the
// network once on its way in. It returns the version.
var writeScript = redis.NewScript(versionLua + `
local v = be64(next_version(KEYS[1]))
local env = stamp(ARGV[1], v)
redis.call('SET', KEYS[1], env, 'PX', ARGV[2])
local msg = ARGV[4] .. v .. ARGV[5]
if ARGV[6] == '1' then msg = msg .. env end
redis.call('PUBLISH', ARGV[3], msg)
return v`)

// deleteScript deletes keys (all in one slot on a cluster) and publishes one
// invalidation naming them all, under a version above each key's, which it
// returns.
var deleteScript = redis.NewScript(versionLua + `
local v = 0
for _, k in ipairs(KEYS) do v = math.max(v, next_version(k)) end
redis.call('DEL', unpack(KEYS))
v = be64(v)
redis.call('PUBLISH', ARGV[1], ARGV[2] .. v .. ARGV[3])
return v`)

// fillScript stores a loaded value if the key still holds what the load
// found there (ARGV[3]): nothing ("absent"), the same corrupt string
// ("same", ARGV[4]), a value of another Redis type ("type", deleted
// first), the load's own lease ("lease", its token in ARGV[4]), or the
// value of version ARGV[4][1-8] ("version": a refresh, or the reload of a
// value past its expiry, of format 3 or an older instance's format 2),
// held under the refresh lease ARGV[4][9-16] if given. A Set or Delete while the load ran is newer than the loaded
// value and wins: it replaced or removed what the load found, lease
// included (only "absent", used with leases off, cannot tell a Delete from
// nothing). If another instance waits for the lease, or the load replaces
// a value ("version": other instances may hold it in L1), the script
// publishes the value's invalidation, made like writeScript's from
// ARGV[5-8]. It returns {version, 1 if it published}, or nil if it stored
// nothing.
var fillScript = redis.NewScript(versionLua + `
local cur = redis.pcall('GET', KEYS[1])
local waited = false
if type(cur) == 'table' then
  if ARGV[3] ~= 'type' then return false end
  redis.call('DEL', KEYS[1])
elseif cur then
  if ARGV[3] == 'lease' then
    local k = string.byte(cur, 2)
    if not (string.byte(cur, 1) == 2 and (k == 2 or k == 3) and string.sub(cur, 19) == ARGV[4]) then return false end
    waited = k == 3
  elseif ARGV[3] == 'version' then
    -- A value (not a lease) of either format; a refresh lease, given
    -- only for format 3, must be the one in its bytes 19-26.
    local f, k = string.byte(cur, 1), string.byte(cur, 2)
    if not ((f == 3 and #cur >= 26 or f == 2 and #cur >= 18 and #ARGV[4] == 8) and (k == 0 or k == 1)
      and string.sub(cur, 3, 10) == string.sub(ARGV[4], 1, 8)
      and (#ARGV[4] == 8 or string.sub(cur, 19, 26) == string.sub(ARGV[4], 9, 16))) then return false end
    waited = true
  elseif not (ARGV[3] == 'same' and cur == ARGV[4]) then
    return false
  end
elseif ARGV[3] ~= 'absent' then
  return false
end
local v = be64(next_version(KEYS[1]))
local env = stamp(ARGV[1], v)
redis.call('SET', KEYS[1], env, 'PX', ARGV[2])
if waited then
  local msg = ARGV[6] .. v .. ARGV[7]
  if ARGV[8] == '1' then msg = msg .. env end
  redis.call('PUBLISH', ARGV[5], msg)
  return {v, 1}
end
return {v, 0}`)

// leaseScript is GetOrLoad's read: it returns {0, value} if the key holds
// one of ours, {0, lease, pttl} if another load holds a lease on it
// (marked waited, so that the holder's write-back wakes this instance),
// {2} if the key holds another Redis type, or else takes the lease in
// ARGV[1] for ARGV[2] ms and returns {1}; also if the key holds that lease
// already (go-redis retried the script after losing its reply).
var leaseScript = redis.NewScript(versionLua + `
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'table' then return {2} end
if not cur then
  redis.call('SET', KEYS[1], stamp(ARGV[1], be64(next_version(KEYS[1]))), 'PX', ARGV[2])
  return {1}
end
local k = string.byte(cur, 2)
if string.byte(cur, 1) == 2 and (k == 2 or k == 3) then
  local pttl = redis.call('PTTL', KEYS[1])
  if string.sub(cur, 19) == string.sub(ARGV[1], 19) then return {1} end
  if pttl < 0 then
    -- Our leases always expire: this one is not ours. Take it.
    redis.call('SET', KEYS[1], stamp(ARGV[1], be64(next_version(KEYS[1]))), 'PX', ARGV[2])
    return {1}
  end
  if k == 2 then
    cur = string.sub(cur, 1, 1) .. '\3' .. string.sub(cur, 3)
    redis.call('SET', KEYS[1], cur, 'KEEPTTL')
  end
  return {0, cur, pttl}
end
return {0, cur}`)

// releaseScript gives up the lease with token ARGV[1] (its load failed),
// and, if another instance waits for it, publishes ARGV[3] with the version
// and ARGV[4], so that a waiter takes the lease over at once. It returns 2
// if it published, 1 if it released the lease unwaited, 0 if it was gone.
var releaseScript = redis.NewScript(versionLua + `
local cur = redis.pcall('GET', KEYS[1])
if type(cur) ~= 'string' or string.byte(cur, 1) ~= 2 or string.sub(cur, 19) ~= ARGV[1] then return 0 end
local k = string.byte(cur, 2)
if k ~= 2 and k ~= 3 then return 0 end
local v = be64(next_version(KEYS[1]))
redis.call('DEL', KEYS[1])
if k == 3 then
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. v .. ARGV[4])
  return 2
end
return 1`)

// refreshLeaseScript takes the refresh lease of the value of version
// ARGV[1] for ARGV[2] ms, without changing the value (SETRANGE keeps it and
// its TTL; see refresh.go): it returns the lease, the 8 bytes of its end in
// Redis' Unix milliseconds, which are the lease's token, or nil if the key
// holds another version (a Set, Delete or refresh came first) or another
// refresh holds the lease. Ends only grow (a lease is taken only once the
// last one ended), so no two leases of a value share a token.
var refreshLeaseScript = redis.NewScript(versionLua + `
local cur = redis.pcall('GET', KEYS[1])
if type(cur) ~= 'string' or string.byte(cur, 1) ~= 3 or #cur < 26 or string.sub(cur, 3, 10) ~= ARGV[1] then return false end
local now = math.floor(clock / 1000)
local held = 0
for i = 19, 26 do held = held * 256 + string.byte(cur, i) end
if held > now then return false end
local lease = be64(now + tonumber(ARGV[2]))
redis.call('SETRANGE', KEYS[1], 18, lease)
return lease`)

// releaseRefreshScript gives up the refresh lease ARGV[2] of the value of
// version ARGV[1] (the refresh failed), so that another instance may
// refresh it at once. It returns 1 if it released it.
var releaseRefreshScript = redis.NewScript(`
local cur = redis.pcall('GET', KEYS[1])
if type(cur) ~= 'string' or string.byte(cur, 1) ~= 3 or #cur < 26 or string.sub(cur, 3, 10) ~= ARGV[1]
  or string.sub(cur, 19, 26) ~= ARGV[2] then return 0 end
redis.call('SETRANGE', KEYS[1], 18, string.rep('\0', 8))
return 1`)

// A Delete's keys are sent in scripts of at most maxKeysPerScript keys
// (unpack(KEYS) must stay well below Lua's stack limit) and at most
// maxMessageKeyBytes of key bytes, so that no invalidation message comes
// near the output-buffer limit at which Redis disconnects a subscriber
// (32 MB by default, 8 MB for 60 s).
const (
	maxKeysPerScript   = 1000
	maxMessageKeyBytes = 64 << 10
)

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

// errWrongType means Redis holds a value of another type (a hash, a list)
// under the key: not ours, like a corrupt string.
var errWrongType = errors.New("tiered: redis holds a value of another type under the key")

// get returns the raw L2 value of key; found is false if Redis has none.
// A value of another Redis type is found, with errWrongType.
func (r *remote) get(ctx context.Context, key string) (b []byte, found bool, err error) {
	if err := r.breaker.allow(); err != nil {
		return nil, false, err
	}
	b, err = r.client.Get(ctx, r.key(key)).Bytes()
	switch {
	case err == redis.Nil:
		r.breaker.record(nil)
		return nil, false, nil
	case err != nil && redis.HasErrorPrefix(err, "WRONGTYPE"):
		r.breaker.record(nil) // Redis answered
		return nil, true, errWrongType
	}
	return b, err == nil, r.check(ctx, err)
}

// write stores env under key for ttl and publishes its invalidation, made
// of head and tail around the version (see encodeInvalidation); with
// withValue, the stamped envelope follows. It returns the version Redis
// gave the value.
func (r *remote) write(ctx context.Context, key string, env []byte, ttl time.Duration, head, tail []byte, withValue bool) (uint64, error) {
	if err := r.breaker.allow(); err != nil {
		return 0, err
	}
	args := []any{env, ttl.Milliseconds(), r.channel, head, tail, "0"}
	if withValue {
		args[5] = "1"
	}
	call := &scriptCall{script: writeScript, keys: []string{r.key(key)}, args: args}
	if r.waitReplicas > 0 {
		if err := r.waited(ctx, []*scriptCall{call}); err != nil {
			return 0, err
		}
	} else {
		call.res = writeScript.Run(ctx, r.client, call.keys, args...)
		if err := r.check(ctx, call.res.Err()); err != nil {
			return 0, err
		}
	}
	return parseVersion(call.res)
}

// parseVersion reads the version a script returned.
func parseVersion(cmd *redis.Cmd) (uint64, error) {
	s, err := cmd.Text()
	if err != nil || len(s) != 8 {
		return 0, fmt.Errorf("%w: script returned %q, %v; want a version", ErrRemoteUnavailable, s, err)
	}
	return binary.BigEndian.Uint64([]byte(s)), nil
}

// fillMode says what a load found in Redis, which its write-back may
// replace: nothing, a corrupt string, a value of another type, its own
// lease, or a value of a given version.
type fillMode int

const (
	fillAbsent fillMode = iota
	fillSame
	fillWrongType
	fillLease
	fillVersion
)

var fillModes = [...]string{fillAbsent: "absent", fillSame: "same", fillWrongType: "type", fillLease: "lease", fillVersion: "version"}

// fill stores a loaded value under key if Redis still holds what the load
// found (mode; held is the corrupt value for fillSame, the lease token for
// fillLease, the version and refresh lease, if any, for fillVersion). A value written by Set or a Delete while the load ran is
// newer than the loaded one and must win. It returns the version Redis gave
// the value, or stored false. No other instance serves the key from L1
// while Redis has no value for it (but values it loaded during an outage,
// which live no longer than its breaker stays open), so the invalidation,
// made of head and tail around the version (with env if withValue), is
// published only to wake instances that wait for the lease, or, with
// fillVersion, to replace the value other instances hold; published says
// whether it was.
func (r *remote) fill(ctx context.Context, key string, env []byte, ttl time.Duration, mode fillMode, held []byte,
	head, tail []byte, withValue bool) (version uint64, stored, published bool, err error) {
	if err := r.breaker.allow(); err != nil {
		return 0, false, false, err
	}
	with := "0"
	if withValue {
		with = "1"
	}
	reply, err := fillScript.Run(ctx, r.client, []string{r.key(key)}, env, ttl.Milliseconds(), fillModes[mode], held,
		r.channel, head, tail, with).Slice()
	if err == redis.Nil {
		r.breaker.record(nil)
		return 0, false, false, nil
	}
	if err := r.check(ctx, err); err != nil {
		return 0, false, false, err
	}
	v, _ := reply[0].(string)
	if len(reply) != 2 || len(v) != 8 {
		return 0, false, false, fmt.Errorf("%w: fill script returned %v", ErrRemoteUnavailable, reply)
	}
	n, _ := reply[1].(int64)
	return binary.BigEndian.Uint64([]byte(v)), true, n == 1, nil
}

// leaseState is what leased found.
type leaseState int

const (
	leaseFound     leaseState = iota // a value (or another's lease) is returned
	leaseGranted                     // the key was empty; the caller holds the lease
	leaseWrongType                   // the key holds another Redis type
)

// leased reads key for a GetOrLoad: its value, or another load's lease
// (with the time it has left), or, if the key is empty, a lease for the
// caller, env, held for ttl.
func (r *remote) leased(ctx context.Context, key string, env []byte, ttl time.Duration) (b []byte, state leaseState, left time.Duration, err error) {
	if err := r.breaker.allow(); err != nil {
		return nil, 0, 0, err
	}
	reply, err := leaseScript.Run(ctx, r.client, []string{r.key(key)}, env, ttl.Milliseconds()).Slice()
	if err = r.check(ctx, err); err != nil {
		return nil, 0, 0, err
	}
	if len(reply) == 0 {
		return nil, 0, 0, fmt.Errorf("%w: lease script returned nothing", ErrRemoteUnavailable)
	}
	code, _ := reply[0].(int64)
	if code != 0 || len(reply) < 2 {
		return nil, leaseState(code), 0, nil
	}
	v, _ := reply[1].(string)
	if len(reply) > 2 {
		ms, _ := reply[2].(int64)
		left = time.Duration(max(ms, 0)) * time.Millisecond
	}
	return []byte(v), leaseFound, left, nil
}

// refreshLease takes the refresh lease of key's value of version for ttl:
// it returns the lease's token, or nil if the key holds another version or
// another refresh holds it.
func (r *remote) refreshLease(ctx context.Context, key string, version uint64, ttl time.Duration) ([]byte, error) {
	if err := r.breaker.allow(); err != nil {
		return nil, err
	}
	s, err := refreshLeaseScript.Run(ctx, r.client, []string{r.key(key)}, be64(version), max(ttl.Milliseconds(), 1)).Text()
	if err == redis.Nil {
		r.breaker.record(nil)
		return nil, nil
	}
	if err := r.check(ctx, err); err != nil {
		return nil, err
	}
	if len(s) != 8 {
		return nil, fmt.Errorf("%w: refresh lease script returned %q", ErrRemoteUnavailable, s)
	}
	return []byte(s), nil
}

// releaseRefresh gives up the refresh lease token of key's value of
// version. Like release, it runs detached from ctx's cancellation, for a
// second at most.
func (r *remote) releaseRefresh(ctx context.Context, key string, version uint64, token []byte) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	if r.breaker.allow() != nil {
		return
	}
	_ = r.check(ctx, releaseRefreshScript.Run(ctx, r.client, []string{r.key(key)}, be64(version), token).Err())
}

// be64 renders a version as versionLua's be64 does.
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// release gives up the lease with token on key, publishing head, the
// version and tail if another instance waits for it; it reports whether it
// published. It runs detached from ctx's cancellation (a load that timed
// out releases too), for a second at most.
func (r *remote) release(ctx context.Context, key string, token, head, tail []byte) bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	if r.breaker.allow() != nil {
		return false
	}
	n, err := releaseScript.Run(ctx, r.client, []string{r.key(key)}, token, r.channel, head, tail).Int64()
	return r.check(ctx, err) == nil && n == 2
}

// del deletes keys and publishes, per script call, an invalidation made of
// head, the version and the keys of that call; it returns the number of
// calls, and on success calls deleted with each call's keys and version.
// On a cluster the keys are grouped by slot (a script may only touch one
// slot) and the groups pipelined.
func (r *remote) del(ctx context.Context, keys []string, head []byte, deleted func(keys []string, version uint64)) (int, error) {
	if err := r.breaker.allow(); err != nil {
		return 0, err
	}
	var names [][]string // the keys of each call, without prefix
	var groups [][]string
	if _, ok := r.client.(*redis.ClusterClient); ok {
		groups = groupBySlot(r.prefix, keys)
	} else {
		groups = [][]string{keys}
	}
	var calls []*scriptCall
	for _, g := range groups {
		for len(g) > 0 {
			n, size := 0, 0
			for n < len(g) && n < maxKeysPerScript && (n == 0 || size+len(g[n]) <= maxMessageKeyBytes) {
				size += len(g[n])
				n++
			}
			calls = append(calls, &scriptCall{deleteScript, r.keys(g[:n]), []any{r.channel, head, encodeKeys(g[:n]...)}, nil})
			names = append(names, g[:n])
			g = g[n:]
		}
	}
	var err error
	switch {
	case r.waitReplicas > 0:
		err = r.waited(ctx, calls)
	case len(calls) == 1:
		calls[0].res = deleteScript.Run(ctx, r.client, calls[0].keys, calls[0].args...)
		err = r.check(ctx, calls[0].res.Err())
	default:
		run := func(eval func(pipe redis.Pipeliner, keys []string, args ...any) *redis.Cmd) error {
			pipe := r.client.Pipeline()
			for _, c := range calls {
				c.res = eval(pipe, c.keys, c.args...)
			}
			_, err := pipe.Exec(ctx)
			return err
		}
		err = run(func(p redis.Pipeliner, k []string, a ...any) *redis.Cmd { return deleteScript.EvalSha(ctx, p, k, a...) })
		if err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
			err = run(func(p redis.Pipeliner, k []string, a ...any) *redis.Cmd { return deleteScript.Eval(ctx, p, k, a...) })
		}
		err = r.check(ctx, err)
	}
	if err != nil {
		return len(calls), err
	}
	for i, c := range calls {
		v, err := parseVersion(c.res)
		if err != nil {
			return len(calls), err
		}
		deleted(names[i], v)
	}
	return len(calls), nil
}

// scriptCall is one script run: its keys share a slot.
type scriptCall struct {
	script *redis.Script
	keys   []string
	args   []any
	res    *redis.Cmd // set once it was sent
}

// errNotReplicated means WAIT returned fewer replicas than asked for.
var errNotReplicated = errors.New("write not acknowledged by enough replicas")

// waited runs calls followed by a WAIT for r.waitReplicas replicas. WAIT
// counts the replication of the writes made on its own connection, so on a
// cluster the calls are grouped by the master of their slot and sent with
// the WAIT in one pipeline to that master's client (which uses one
// connection per pipeline).
func (r *remote) waited(ctx context.Context, calls []*scriptCall) error {
	type group struct {
		node  *redis.Client
		calls []*scriptCall
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
	case *redis.Client: // Options.withDefaults rejects other clients
		groups = []*group{{c, calls}}
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
func (r *remote) execWaited(ctx context.Context, node *redis.Client, calls []*scriptCall) error {
	ms := max(r.waitTimeout.Milliseconds(), 1) // WAIT 0 would wait forever
	run := func(byHash bool) (*redis.Cmd, error) {
		pipe := node.Pipeline()
		for _, c := range calls {
			if byHash {
				c.res = c.script.EvalSha(ctx, pipe, c.keys, c.args...)
			} else {
				c.res = c.script.Eval(ctx, pipe, c.keys, c.args...)
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
