package tiered

import (
	"context"
	"strings"
	"time"
	"unsafe"

	"github.com/redis/go-redis/v9"
)

// maxBatchKeys bounds one command of a batch: an MGET names at most this
// many keys (a 10,000-key GetMany sends 20 MGETs, in one pipeline). The
// scripts of a batch (leases, write-backs, releases) touch one key each and
// are pipelined too.
const maxBatchKeys = 500

// remoteRead is what a batch read found under one key, as fetched takes it.
type remoteRead struct {
	b       []byte
	present bool          // b holds a value, or another load's lease
	left    time.Duration // how long that lease has left (leasedMany)
	err     error         // the read failed, or errWrongType (leasedMany)
}

// getMany reads keys with MGET, in one round trip: at most maxBatchKeys
// per command, grouped by slot on a cluster, all in one pipeline (one per
// master, in parallel). Each slot's keys go through their master's
// breaker. MGET reads a value of another Redis type as absent.
func (r *remote) getMany(ctx context.Context, keys []string) []remoteRead {
	reads := make([]remoteRead, len(keys))
	var groups [][]int
	if r.cluster() != nil {
		groups = slotIndexes(r.prefix, keys)
	} else {
		all := make([]int, len(keys))
		for i := range all {
			all[i] = i
		}
		groups = [][]int{all}
	}
	type chunk struct {
		idx []int
		br  *breaker
		cmd *redis.SliceCmd
	}
	var chunks []chunk
	for _, g := range groups {
		br := r.breakerFor(ctx, r.key(keys[g[0]]))
		if err := r.allow(br); err != nil {
			for _, j := range g {
				reads[j].err = err
			}
			continue
		}
		for len(g) > 0 {
			n := min(len(g), maxBatchKeys)
			chunks = append(chunks, chunk{g[:n], br, r.mget(ctx, keys, g[:n])})
			g = g[n:]
		}
	}
	switch len(chunks) {
	case 0:
		return reads
	case 1:
		_ = r.client.Process(ctx, chunks[0].cmd) // its error is in the command
	default:
		pipe := r.client.Pipeline()
		for _, ch := range chunks {
			_ = pipe.Process(ctx, ch.cmd)
		}
		_, _ = pipe.Exec(ctx)
	}
	for _, ch := range chunks {
		vals, err := ch.cmd.Result()
		err = r.check(ctx, ch.br, err)
		for i, j := range ch.idx {
			switch {
			case err != nil:
				reads[j].err = err
			case i < len(vals) && vals[i] != nil:
				// go-redis reads each bulk string into a buffer of its own
				// and hands it over as a string: its bytes are taken as
				// they are, not copied (b is only read: decode may not keep
				// or change it).
				s, _ := vals[i].(string)
				reads[j] = remoteRead{b: unsafe.Slice(unsafe.StringData(s), len(s)), present: true}
			}
		}
	}
	return reads
}

// mget returns the MGET of keys[j] for j in idx, prefixed. The names are
// written into one string and passed to go-redis as *string arguments
// (which it sends, and routes on a cluster, as strings), so that a key
// costs no allocation of its own: a string argument would be boxed.
func (r *remote) mget(ctx context.Context, keys []string, idx []int) *redis.SliceCmd {
	size := 0
	for _, j := range idx {
		size += len(r.prefix) + len(keys[j])
	}
	var sb strings.Builder
	sb.Grow(size)
	for _, j := range idx {
		sb.WriteString(r.prefix)
		sb.WriteString(keys[j])
	}
	all := sb.String()
	names := make([]string, len(idx))
	args := make([]any, 1+len(idx))
	args[0] = "mget"
	at := 0
	for i, j := range idx {
		end := at + len(r.prefix) + len(keys[j])
		names[i] = all[at:end]
		args[1+i] = &names[i]
		at = end
	}
	return redis.NewSliceCmd(ctx, args...)
}

// runBatch runs the single-key script calls of a batch, grouped by master
// as runAll does (each master's breaker, one pipeline per master, in
// parallel), and returns each call's reply, or its error if it has none.
func (r *remote) runBatch(ctx context.Context, calls []*scriptCall) []*redis.Cmd {
	errs := r.runAll(ctx, calls, false)
	res := make([]*redis.Cmd, len(calls))
	for i, c := range calls {
		if c.res != nil && (c.res.Err() == nil || c.res.Err() == redis.Nil) {
			res[i] = c.res // answered, even if another call of its master failed
			continue
		}
		res[i] = redis.NewCmd(ctx)
		res[i].SetErr(errs[i])
	}
	return res
}

// leasedMany is leased for many keys in one round trip: leaseScript for
// each key, pipelined, each offering the lease env.
func (r *remote) leasedMany(ctx context.Context, keys []string, env []byte, ttl time.Duration) []remoteRead {
	reads := make([]remoteRead, len(keys))
	calls := make([]*scriptCall, len(keys))
	for i, k := range keys {
		calls[i] = &scriptCall{script: leaseScript, keys: []string{r.key(k)}, args: []any{env, ttl.Milliseconds()}}
	}
	for i, res := range r.runBatch(ctx, calls) {
		reply, err := res.Slice()
		if err != nil {
			reads[i].err = err
			continue
		}
		var state leaseState
		rd := &reads[i]
		rd.b, state, rd.left, rd.err = parseLease(reply)
		rd.present, rd.err = leaseRead(state, rd.err)
	}
	return reads
}

// fillCall is one write-back of a batch: fill's arguments.
type fillCall struct {
	key        string
	env        []byte
	ttl        time.Duration
	mode       fillMode
	held       []byte
	head, tail []byte
	withValue  bool
}

// fillMany is fill for many keys in one round trip: fillScript for each,
// pipelined.
func (r *remote) fillMany(ctx context.Context, fills []fillCall) []fillReply {
	replies := make([]fillReply, len(fills))
	calls := make([]*scriptCall, len(fills))
	for i, f := range fills {
		keys, args := r.logged([]string{r.key(f.key)}, r.fillArgs(f.env, f.ttl, f.mode, f.held, f.head, f.tail, f.withValue))
		calls[i] = &scriptCall{script: fillScript, keys: keys, args: args}
	}
	for i, res := range r.runBatch(ctx, calls) {
		reply, err := res.Slice()
		switch {
		case err == redis.Nil: // not stored
		case err != nil:
			replies[i].err = err
		default:
			replies[i].version, replies[i].published, replies[i].err = parseFill(reply)
			replies[i].stored = replies[i].err == nil
		}
	}
	return replies
}

// releaseCall is one lease release of a batch: release's arguments.
type releaseCall struct {
	key        string
	head, tail []byte
}

// releaseMany is release for many keys, all leased under token, in one
// round trip. It reports per key whether it published.
func (r *remote) releaseMany(ctx context.Context, token []byte, releases []releaseCall) []bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	published := make([]bool, len(releases))
	calls := make([]*scriptCall, len(releases))
	for i, rc := range releases {
		keys, args := r.logged([]string{r.key(rc.key)}, r.releaseArgs(token, rc.head, rc.tail))
		calls[i] = &scriptCall{script: releaseScript, keys: keys, args: args}
	}
	for i, res := range r.runBatch(ctx, calls) { // a lease not released runs out
		n, err := res.Int64()
		published[i] = err == nil && n == 2
	}
	return published
}
