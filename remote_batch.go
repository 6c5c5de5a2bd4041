package tiered

import (
	"context"
	"time"

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
// master, in parallel). MGET reads a value of another Redis type as
// absent.
func (r *remote) getMany(ctx context.Context, keys []string) []remoteRead {
	reads := make([]remoteRead, len(keys))
	if err := r.breaker.allow(); err != nil {
		return failAll(reads, err)
	}
	var groups [][]int
	if _, ok := r.client.(*redis.ClusterClient); ok {
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
		cmd *redis.SliceCmd
	}
	var chunks []chunk
	pipe := r.client.Pipeline()
	for _, g := range groups {
		for len(g) > 0 {
			n := min(len(g), maxBatchKeys)
			names := make([]string, n)
			for i, j := range g[:n] {
				names[i] = r.key(keys[j])
			}
			chunks = append(chunks, chunk{g[:n], pipe.MGet(ctx, names...)})
			g = g[n:]
		}
	}
	if len(chunks) == 1 {
		_ = r.client.Process(ctx, chunks[0].cmd) // its error is in the command
	} else {
		_, _ = pipe.Exec(ctx)
	}
	var failed error
	for _, ch := range chunks {
		if err := ch.cmd.Err(); err != nil && failed == nil {
			failed = err
		}
	}
	failed = r.check(ctx, failed)
	for _, ch := range chunks {
		vals, err := ch.cmd.Result()
		for i, j := range ch.idx {
			switch {
			case err != nil:
				reads[j].err = failed
			case i < len(vals) && vals[i] != nil:
				s, _ := vals[i].(string)
				reads[j] = remoteRead{b: []byte(s), present: true}
			}
		}
	}
	return reads
}

// leasedMany is leased for many keys in one round trip: leaseScript for
// each key, pipelined, each offering the lease env.
func (r *remote) leasedMany(ctx context.Context, keys []string, env []byte, ttl time.Duration) []remoteRead {
	reads := make([]remoteRead, len(keys))
	if err := r.breaker.allow(); err != nil {
		return failAll(reads, err)
	}
	calls := make([]*scriptCall, len(keys))
	for i, k := range keys {
		calls[i] = &scriptCall{script: leaseScript, keys: []string{r.key(k)}, args: []any{env, ttl.Milliseconds()}}
	}
	failed := r.pipelined(ctx, calls)
	for i, c := range calls {
		reply, err := c.res.Slice()
		if err != nil {
			reads[i].err = failed
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
	if err := r.breaker.allow(); err != nil {
		for i := range replies {
			replies[i].err = err
		}
		return replies
	}
	calls := make([]*scriptCall, len(fills))
	for i, f := range fills {
		calls[i] = &scriptCall{script: fillScript, keys: []string{r.key(f.key)},
			args: r.fillArgs(f.env, f.ttl, f.mode, f.held, f.head, f.tail, f.withValue)}
	}
	failed := r.pipelined(ctx, calls)
	for i, c := range calls {
		reply, err := c.res.Slice()
		switch {
		case err == redis.Nil: // not stored
		case err != nil:
			replies[i].err = failed
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
	if r.breaker.allow() != nil {
		return published
	}
	calls := make([]*scriptCall, len(releases))
	for i, rc := range releases {
		calls[i] = &scriptCall{script: releaseScript, keys: []string{r.key(rc.key)}, args: r.releaseArgs(token, rc.head, rc.tail)}
	}
	_ = r.pipelined(ctx, calls) // a lease not released runs out
	for i, c := range calls {
		n, err := c.res.Int64()
		published[i] = err == nil && n == 2
	}
	return published
}

// failAll sets err on every read.
func failAll(reads []remoteRead, err error) []remoteRead {
	for i := range reads {
		reads[i].err = err
	}
	return reads
}
