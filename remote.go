package tiered

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// versionLua is the prelude of every script that writes a value or deletes
// one. next_version(key) returns the version of a write of key: Redis' clock
// in microseconds, or, if that is not above the version of the value key
// holds now, that version plus one. So the versions of one key's values only
// grow in the order Redis ran their writes, also within a microsecond and
// across a Delete (which takes a version too). be64 renders a version as 8
// big-endian bytes. publish(channel, msg) is the one way a script publishes
// an invalidation: whatever must accompany every message is added there.
// Lua numbers are doubles, exact to 2^53; versions stay
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
local function logged() return tonumber(ARGV[#ARGV]) >= -1 end
local function publish(channel, msg, entry)
  local window = tonumber(ARGV[#ARGV])
  if window == -1 then
    redis.call('DEL', KEYS[#KEYS])
  elseif window >= 0 then
    local r = redis.pcall('XADD', KEYS[#KEYS], 'MINID', '~', math.floor(clock / 1000) - window, '*', 'm', entry or msg)
    if type(r) == 'string' then
      local at = 17
      if string.byte(msg, 1) == 98 then at = 9 end
      msg = string.upper(string.sub(msg, 1, 1)) .. string.sub(msg, 2, at) .. string.char(#r) .. r .. string.sub(msg, at + 1)
    end
  end
  redis.call('PUBLISH', channel, msg)
end
`

// Every script that publishes an invalidation does it with publish(channel,
// msg, entry) of versionLua: msg is the message (see encodeInvalidation and
// msgBatch), entry what the log keeps of it, if that differs: msg without
// the envelopes it carries (the log holds keys and versions, never values).
// If the script's last ARGV, the log window in milliseconds, is not
// negative, the script's last KEYS is the namespace's invalidation log (see
// invalidation_log.go): publish appends the entry to it, trims the entries
// older than the window, and puts the entry's ID into the published
// message, after its header (kind, id and, but for msgBatch, version),
// with its kind byte made upper case so that a decoder that predates the
// log rejects the message (and flushes) rather than misreads it. If the log
// cannot be appended to (a Redis before 6.2, whose XADD has no MINID, or
// not a stream under its key), the message goes out without an ID, which
// makes every subscriber flush at its next gap rather than replay. A
// window of -1 (the log disabled) still names the log in KEYS: publish
// deletes it, so that a subscriber whose position was in it flushes at its
// next gap instead of replaying a log that lacks this write (its message
// may be the one the gap lost). -2 (a Cluster) names no log.
// remote.logged adds the two arguments to a call.

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
if ARGV[6] == '1' then
  publish(ARGV[3], msg .. env, 'k' .. string.sub(msg, 2))
else
  publish(ARGV[3], msg)
end
return v`)

// deleteScript deletes keys (all in one slot on a cluster) and publishes one
// invalidation naming them all, under a version above each key's, which it
// returns.
var deleteScript = redis.NewScript(versionLua + `
local n = #KEYS
if logged() then n = n - 1 end
local v = 0
for i = 1, n do v = math.max(v, next_version(KEYS[i])) end
redis.call('DEL', unpack(KEYS, 1, n))
v = be64(v)
publish(ARGV[1], ARGV[2] .. v .. ARGV[3])
return v`)

// batchScript runs the writes of a batch (see writes.go) in order and
// publishes one msgBatch message naming them all, each under its own
// version. ARGV[1] is the channel, ARGV[2] the message's head (kind and
// id), ARGV[3] the number of writes; then six ARGV per write: its op ("s":
// a Set, "v": a Set whose envelope the message carries, "d": a Delete), its
// number of keys (taken from KEYS in order; a Set has one), the envelope
// and PX of a Set, the entry's tail (see batchEntryTail), and, for "v", the
// tail of the entry as the log keeps it (msgKeys, no envelope). The keys are
// counted, never taken as #KEYS: KEYS and ARGV may hold more after them. A
// write's version is next_version's, or above the last version this batch
// gave one of its keys: a Set after a Delete of its key in one batch finds
// no value to be newer than, and must still be newer. It returns the
// versions, one per write. No write in it may fail (a PX is positive): Redis
// keeps what a script wrote before an error, and the message would be
// lost with the error, leaving the writes before it unpublished.
var batchScript = redis.NewScript(versionLua + `
local n = tonumber(ARGV[3])
local msg = {ARGV[2]}
local entry = {ARGV[2]}
local versions = {}
local last = {}
local ki = 1
for i = 0, n - 1 do
  local a = 4 + i * 6
  local op, nk = ARGV[a], tonumber(ARGV[a + 1])
  local v = 0
  for j = ki, ki + nk - 1 do
    local kv = next_version(KEYS[j])
    local l = last[KEYS[j]]
    if l and l >= kv then kv = l + 1 end
    v = math.max(v, kv)
  end
  for j = ki, ki + nk - 1 do last[KEYS[j]] = v end
  local bv = be64(v)
  if op == 'd' then
    redis.call('DEL', unpack(KEYS, ki, ki + nk - 1))
    msg[#msg + 1] = 'k' .. bv .. ARGV[a + 4]
    entry[#entry + 1] = msg[#msg]
  else
    local env = stamp(ARGV[a + 2], bv)
    redis.call('SET', KEYS[ki], env, 'PX', ARGV[a + 3])
    if op == 'v' then
      msg[#msg + 1] = 'v' .. bv .. ARGV[a + 4] .. env
      entry[#entry + 1] = 'k' .. bv .. ARGV[a + 5]
    else
      msg[#msg + 1] = 'k' .. bv .. ARGV[a + 4]
      entry[#entry + 1] = msg[#msg]
    end
  end
  versions[#versions + 1] = bv
  ki = ki + nk
end
publish(ARGV[1], table.concat(msg), table.concat(entry))
return versions`)

// fillScript stores a loaded value if the key still holds what the load
// found there (ARGV[3]): nothing ("absent"), the same corrupt string
// ("same", ARGV[4]), a value of another Redis type ("type", deleted
// first), the load's own lease ("lease", its token in ARGV[4]), or the
// value of version ARGV[4][1-8] ("version": a refresh, or the reload of a
// value past its expiry, of format 3 or an older instance's format 2),
// held under the refresh lease ARGV[4][9-16] if given. A Set or Delete
// while the load ran is newer than the loaded value and wins: it replaced
// or removed what the load found, lease included (only "absent", used with
// leases off, cannot tell a Delete from nothing). If another instance waits for the lease, or the load replaces
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
  if ARGV[8] == '1' then
    publish(ARGV[5], msg .. env, 'k' .. string.sub(msg, 2))
  else
    publish(ARGV[5], msg)
  end
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
  publish(ARGV[2], ARGV[3] .. v .. ARGV[4])
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
	breaker breaker  // the cache's (see breaker)
	masters sync.Map // on a Cluster: master address -> *breaker

	// onMasterRecover is the onRecover of the masters' breakers.
	onMasterRecover func(kept []string, all bool)

	waitReplicas int // Options.WaitReplicas
	waitTimeout  time.Duration

	origin uint64     // the Cache's id, in the messages of its writes
	stats  *counters  // the Cache's
	queue  writeQueue // the writes of a single node (see writes.go)
	queues sync.Map   // on a Cluster: hash slot -> *writeQueue

	logKey    string // the namespace's invalidation log (see invalidation_log.go)
	logWindow int64  // how long it keeps an entry, in ms; -1: disabled (writes delete it), -2: a Cluster (none)
}

// logged returns the KEYS and ARGV of a script that publishes with
// versionLua's publish: keys, then the log key unless on a Cluster; args,
// then the window.
func (r *remote) logged(keys []string, args []any) ([]string, []any) {
	if r.logWindow >= -1 {
		keys = append(keys[:len(keys):len(keys)], r.logKey)
	}
	return keys, append(args[:len(args):len(args)], r.logWindow)
}

func (r *remote) key(k string) string { return r.prefix + k }

// errWrongType means Redis holds a value of another type (a hash, a list)
// under the key: not ours, like a corrupt string.
var errWrongType = errors.New("tiered: redis holds a value of another type under the key")

// get returns the raw L2 value of key; found is false if Redis has none.
// A value of another Redis type is found, with errWrongType.
func (r *remote) get(ctx context.Context, key string) (b []byte, found bool, err error) {
	rkey := r.key(key)
	br := r.breakerFor(ctx, rkey)
	if err := r.allow(br); err != nil {
		return nil, false, err
	}
	b, err = r.client.Get(ctx, rkey).Bytes()
	switch {
	case err == redis.Nil:
		r.succeeded(br)
		return nil, false, nil
	case err != nil && redis.HasErrorPrefix(err, "WRONGTYPE"):
		r.succeeded(br) // Redis answered
		return nil, true, errWrongType
	}
	return b, err == nil, r.check(ctx, br, err)
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
// fillLease, the version and refresh lease, if any, for fillVersion). A
// value written by Set or a Delete while the load ran is newer than the
// loaded one and must win. It returns the version Redis gave
// the value, or stored false. No other instance serves the key from L1
// while Redis has no value for it (but values it loaded during an outage,
// which live no longer than its breaker stays open), so the invalidation,
// made of head and tail around the version (with env if withValue), is
// published only to wake instances that wait for the lease, or, with
// fillVersion, to replace the value other instances hold; published says
// whether it was.
func (r *remote) fill(ctx context.Context, key string, env []byte, ttl time.Duration, mode fillMode, held []byte,
	head, tail []byte, withValue bool) (version uint64, stored, published bool, err error) {
	rkey := r.key(key)
	br := r.breakerFor(ctx, rkey)
	if err := r.allow(br); err != nil {
		return 0, false, false, err
	}
	keys, args := r.logged([]string{rkey}, r.fillArgs(env, ttl, mode, held, head, tail, withValue))
	reply, err := fillScript.Run(ctx, r.client, keys, args...).Slice()
	if err == redis.Nil {
		r.succeeded(br)
		return 0, false, false, nil
	}
	if err := r.check(ctx, br, err); err != nil {
		return 0, false, false, err
	}
	version, published, err = parseFill(reply)
	return version, err == nil, published, err
}

// fillArgs returns the ARGV of fillScript.
func (r *remote) fillArgs(env []byte, ttl time.Duration, mode fillMode, held, head, tail []byte, withValue bool) []any {
	with := "0"
	if withValue {
		with = "1"
	}
	return []any{env, ttl.Milliseconds(), fillModes[mode], held, r.channel, head, tail, with}
}

// parseFill reads what fillScript returned when it stored the value.
func parseFill(reply []any) (version uint64, published bool, err error) {
	v, _ := reply[0].(string)
	if len(reply) != 2 || len(v) != 8 {
		return 0, false, fmt.Errorf("%w: fill script returned %v", ErrRemoteUnavailable, reply)
	}
	n, _ := reply[1].(int64)
	return binary.BigEndian.Uint64([]byte(v)), n == 1, nil
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
	rkey := r.key(key)
	br := r.breakerFor(ctx, rkey)
	if err := r.allow(br); err != nil {
		return nil, 0, 0, err
	}
	reply, err := leaseScript.Run(ctx, r.client, []string{rkey}, env, ttl.Milliseconds()).Slice()
	if err = r.check(ctx, br, err); err != nil {
		return nil, 0, 0, err
	}
	return parseLease(reply)
}

// parseLease reads what leaseScript returned.
func parseLease(reply []any) (b []byte, state leaseState, left time.Duration, err error) {
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
	rkey := r.key(key)
	br := r.breakerFor(ctx, rkey)
	if err := r.allow(br); err != nil {
		return nil, err
	}
	s, err := refreshLeaseScript.Run(ctx, r.client, []string{rkey}, be64(version), max(ttl.Milliseconds(), 1)).Text()
	if err == redis.Nil {
		r.succeeded(br)
		return nil, nil
	}
	if err := r.check(ctx, br, err); err != nil {
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
	rkey := r.key(key)
	br := r.breakerFor(ctx, rkey)
	if r.allow(br) != nil {
		return
	}
	_ = r.check(ctx, br, releaseRefreshScript.Run(ctx, r.client, []string{rkey}, be64(version), token).Err())
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
	rkey := r.key(key)
	br := r.breakerFor(ctx, rkey)
	if r.allow(br) != nil {
		return false
	}
	keys, args := r.logged([]string{rkey}, r.releaseArgs(token, head, tail))
	n, err := releaseScript.Run(ctx, r.client, keys, args...).Int64()
	return r.check(ctx, br, err) == nil && n == 2
}

// releaseArgs returns the ARGV of releaseScript.
func (r *remote) releaseArgs(token, head, tail []byte) []any {
	return []any{token, r.channel, head, tail}
}

// scriptCall is one script run: its keys share a slot.
type scriptCall struct {
	script *redis.Script
	keys   []string
	args   []any
	names  []string   // the keys without prefix, for errors; nil: keys[0] names it
	res    *redis.Cmd // set once it was sent
}

// errNotReplicated means WAIT returned fewer replicas than asked for.
var errNotReplicated = errors.New("write not acknowledged by enough replicas")

// callGroup is the script calls of one master, sent in one pipeline.
type callGroup struct {
	breaker *breaker
	node    *redis.Client // the master's client; nil: the cache's client
	calls   []*scriptCall
	err     error // the calls' master could not be found
}

// runAll runs calls, grouped by master, each master's group concurrently,
// and returns each call's error; for writes and deletes the error names
// what may not have happened. With waited each group ends with a WAIT for
// Options.WaitReplicas replicas on its master (see execWaited).
func (r *remote) runAll(ctx context.Context, calls []*scriptCall, waited bool) []error {
	var groups []*callGroup
	if cc := r.cluster(); cc == nil {
		groups = []*callGroup{{breaker: &r.breaker, calls: calls}}
	} else {
		byAddr := make(map[string]*callGroup)
		for _, c := range calls {
			node, err := cc.MasterForKey(ctx, c.keys[0])
			addr := ""
			if err == nil {
				addr = node.Options().Addr
			}
			g := byAddr[addr]
			if g == nil {
				g = &callGroup{breaker: &r.breaker, node: node, err: err}
				if err == nil {
					g.breaker = r.masterBreaker(addr)
				}
				byAddr[addr] = g
				groups = append(groups, g)
			}
			g.calls = append(g.calls, c)
		}
	}
	groupErrs := make([]error, len(groups))
	if len(groups) == 1 {
		groupErrs[0] = r.runGroup(ctx, groups[0], waited)
	} else {
		var wg sync.WaitGroup
		for i, g := range groups {
			wg.Add(1)
			go func() {
				defer wg.Done()
				groupErrs[i] = r.runGroup(ctx, g, waited)
			}()
		}
		wg.Wait()
	}
	errs := make([]error, len(calls))
	index := make(map[*scriptCall]int, len(calls))
	for i, c := range calls {
		index[c] = i
	}
	for gi, g := range groups {
		err := groupErrs[gi]
		if err == nil {
			continue
		}
		var names []string
		for _, c := range g.calls {
			if c.names != nil {
				names = append(names, c.names...)
			} else {
				names = append(names, strings.TrimPrefix(c.keys[0], r.prefix))
			}
		}
		done := ""
		switch g.calls[0].script {
		case writeScript, batchScript:
			done = "written"
		case deleteScript:
			done = "deleted"
		}
		if done != "" {
			what := "may not be " + done
			if errors.Is(err, errNotReplicated) {
				what = "were " + done + " on their master but may not be replicated"
			}
			err = fmt.Errorf("keys %s %s: %w", keyList(names), what, err)
		}
		for _, c := range g.calls {
			errs[index[c]] = err
		}
	}
	return errs
}

// keyList quotes up to 10 keys, and counts the rest.
func keyList(keys []string) string {
	if len(keys) <= 10 {
		return fmt.Sprintf("%q", keys)
	}
	return fmt.Sprintf("%q and %d more", keys[:10], len(keys)-10)
}

// tryAgainPauses are the pauses before each retry of calls Redis answered
// with TRYAGAIN: a multi-key script on a slot being migrated whose keys are
// partly moved. It is an answer, not an outage: the migration goes on, so
// the calls are retried after a short pause (and a fresh slot map), and
// never counted against the breaker.
var tryAgainPauses = []time.Duration{10 * time.Millisecond, 40 * time.Millisecond, 150 * time.Millisecond}

// runGroup runs the calls of one master, with a WAIT if waited, retrying
// those answered with TRYAGAIN, and returns their first error (a script's
// nil reply, such as a refused fill, is an answer, not an error).
func (r *remote) runGroup(ctx context.Context, g *callGroup, waited bool) error {
	if err := r.allow(g.breaker); err != nil {
		return err
	}
	if g.err != nil {
		return r.check(ctx, g.breaker, g.err)
	}
	calls := g.calls
	// With WaitReplicas: what every attempt's WAIT found not replicated. The
	// calls of an attempt that ran are not sent again, so a retry that
	// succeeds does not make up for them.
	var notReplicated []error
	for attempt := 0; ; attempt++ {
		var err error
		if waited {
			var short error
			err, short = r.execWaited(ctx, g.node, calls, false, 0)
			notReplicated = append(notReplicated, short)
		} else {
			err = r.exec(ctx, calls)
		}
		if err == nil || !redis.HasErrorPrefix(err, "TRYAGAIN") || attempt == len(tryAgainPauses) {
			if short := errors.Join(notReplicated...); err == nil && short != nil {
				r.succeeded(g.breaker) // Redis answered
				return fmt.Errorf("%w: %w", ErrRemoteUnavailable, short)
			}
			return r.check(ctx, g.breaker, err)
		}
		var again []*scriptCall
		for _, c := range calls {
			if redis.HasErrorPrefix(c.res.Err(), "TRYAGAIN") {
				again = append(again, c)
			}
		}
		calls = again
		if cc := r.cluster(); cc != nil {
			cc.ReloadState(ctx)
		}
		select {
		case <-time.After(tryAgainPauses[attempt]):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// exec runs calls on the cache's client: one script, or a pipeline (which
// a ClusterClient splits by node, following MOVED and ASK). Scripts go by
// hash; the calls a node did not have the script for are sent again by
// text, those alone: a script that ran must not run twice (a fill would
// find its own value and refuse it). It returns the first error, a nil
// reply aside; each call's own result, redis.Nil included, is in its res.
func (r *remote) exec(ctx context.Context, calls []*scriptCall) error {
	if len(calls) == 1 {
		c := calls[0]
		c.res = c.script.Run(ctx, r.client, c.keys, c.args...)
		return firstErr(calls)
	}
	run := func(calls []*scriptCall, byHash bool) {
		pipe := r.client.Pipeline()
		for _, c := range calls {
			if byHash {
				c.res = c.script.EvalSha(ctx, pipe, c.keys, c.args...)
			} else {
				c.res = c.script.Eval(ctx, pipe, c.keys, c.args...)
			}
		}
		_, _ = pipe.Exec(ctx) // every call's error is in its res
	}
	run(calls, true)
	var again []*scriptCall
	for _, c := range calls {
		if redis.HasErrorPrefix(c.res.Err(), "NOSCRIPT") {
			again = append(again, c)
		}
	}
	if len(again) > 0 {
		run(again, false)
	}
	return firstErr(calls)
}

// firstErr returns the first error of calls' replies, a nil reply aside.
func firstErr(calls []*scriptCall) error {
	for _, c := range calls {
		if err := c.res.Err(); err != nil && err != redis.Nil {
			return err
		}
	}
	return nil
}

// noScript reports whether a node lacked the script of one of calls, sent
// by hash: execWaited sends them all again in full, WAIT included (a
// write or delete that ran twice only takes one more version).
func noScript(calls []*scriptCall) bool {
	for _, c := range calls {
		if redis.HasErrorPrefix(c.res.Err(), "NOSCRIPT") {
			return true
		}
	}
	return false
}

// execWaited sends calls and a WAIT for r.waitReplicas replicas in one
// pipeline on node (nil: the cache's single-node client). WAIT counts the
// replication of the writes made on its own connection, hence one pipeline
// on one node's client (which uses one connection per pipeline). With
// asking, each script is preceded by ASKING. On a cluster, the calls
// redirected by MOVED (the slot moved: the slot map is reloaded) or ASK
// (the slot is being migrated and the key is on the target already) are
// sent again, with their own WAIT, to the node named, up to the client's
// MaxRedirects times. It returns the calls' failures and, apart, what ran
// but was not replicated (a WAIT short of replicas): the WAIT is checked
// whenever a call ran, whatever happened to the others.
func (r *remote) execWaited(ctx context.Context, node *redis.Client, calls []*scriptCall, asking bool, redirects int) (failed, notReplicated error) {
	if node == nil {
		node, _ = r.client.(*redis.Client) // Options.withDefaults rejects other clients
	}
	ms := max(r.waitTimeout.Milliseconds(), 1) // WAIT 0 would wait forever
	run := func(byHash bool) (*redis.Cmd, error) {
		pipe := node.Pipeline()
		for _, c := range calls {
			if asking {
				pipe.Do(ctx, "asking")
			}
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
	if err != nil && noScript(calls) {
		wait, err = run(false)
	}
	cc := r.cluster()
	type target struct {
		addr string
		ask  bool
	}
	redirected := make(map[target][]*scriptCall)
	var first error
	ran := false
	for _, c := range calls {
		cerr := c.res.Err()
		if cerr == nil {
			ran = true
			continue
		}
		if cc != nil && redirects < cc.Options().MaxRedirects {
			if f := strings.Fields(cerr.Error()); len(f) == 3 && (f[0] == "MOVED" || f[0] == "ASK") {
				tg := target{f[2], f[0] == "ASK"}
				redirected[tg] = append(redirected[tg], c)
				continue
			}
		}
		if first == nil {
			first = cerr
		}
	}
	if first == nil && len(redirected) == 0 && err != nil {
		first = err // the WAIT, or the connection
	}
	shorts := make([]error, 1, 1+len(redirected))
	if ran {
		n, werr := wait.Int64()
		switch {
		case werr != nil && first == nil:
			first = werr
		case werr == nil && n < int64(r.waitReplicas):
			shorts[0] = fmt.Errorf("%w: %d of %d within %v", errNotReplicated, n, r.waitReplicas, r.waitTimeout)
		}
	}
	errs := []error{first}
	for tg, cs := range redirected {
		to, err := r.masterAt(ctx, cc, tg.addr)
		var short error
		if err == nil {
			err, short = r.execWaited(ctx, to, cs, tg.ask, redirects+1)
		}
		errs, shorts = append(errs, err), append(shorts, short)
	}
	return errors.Join(errs...), errors.Join(shorts...)
}

// masterAt returns the client of the master at addr, reloading cc's slot
// map first (a MOVED says it is stale).
func (r *remote) masterAt(ctx context.Context, cc *redis.ClusterClient, addr string) (*redis.Client, error) {
	var mu sync.Mutex
	var found *redis.Client
	err := cc.ForEachMaster(ctx, func(_ context.Context, m *redis.Client) error {
		if m.Options().Addr == addr {
			mu.Lock()
			found = m
			mu.Unlock()
		}
		return nil
	})
	if err == nil && found == nil {
		err = fmt.Errorf("redirected to %s, which is not a master of the slot map", addr)
	}
	return found, err
}

func (r *remote) keys(keys []string) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = r.key(k)
	}
	return out
}

// succeeded records that Redis answered a call guarded by b.
func (r *remote) succeeded(b *breaker) {
	b.record(nil)
	if b != &r.breaker {
		r.breaker.record(nil) // the cluster is up
	}
}

// check classifies the result of a Redis call guarded by b. The caller's
// own cancellation is returned as it is, so it is never mistaken for an
// outage; other failures are wrapped in ErrRemoteUnavailable. Failures to
// reach Redis at all open b, and so does CLUSTERDOWN for a slot not served;
// a cluster that is down opens the cache's breaker; other answers (TRYAGAIN
// included: a migration, not an outage) open none.
func (r *remote) check(ctx context.Context, b *breaker, err error) error {
	if err == nil {
		r.succeeded(b)
		return nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return ctxErr
	}
	var reply redis.Error
	answered := errors.As(err, &reply)
	switch {
	case answered && redis.HasErrorPrefix(reply, "CLUSTERDOWN Hash slot not served"):
		b.record(err) // one master's slots, with cluster-require-full-coverage off
	case answered && redis.HasErrorPrefix(reply, "CLUSTERDOWN"):
		r.breaker.record(err)
	case !answered:
		b.record(err)
	}
	if cc := r.cluster(); cc != nil && (!answered || isClusterRedirectFailure(reply)) {
		// A dead master refuses connections and sends no MOVED, so
		// go-redis would keep dialing it until its periodic reload
		// (60 s by default). Ask for a reload now; it is coalesced.
		cc.ReloadState(ctx)
	}
	return fmt.Errorf("%w: %w", ErrRemoteUnavailable, err)
}

// isClusterRedirectFailure reports replies that mean the slot map is wrong
// or the cluster is reconfiguring: they call for a reload like a refused
// connection does.
func isClusterRedirectFailure(err redis.Error) bool {
	return redis.HasErrorPrefix(err, "CLUSTERDOWN") || redis.HasErrorPrefix(err, "TRYAGAIN")
}
