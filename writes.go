package tiered

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// Writes are group-committed. Every message a write publishes is delivered
// to every subscribed instance, so a fleet's Redis is bound by messages per
// second; writes that are in flight on one Cache at the same time are
// therefore sent as one script that runs them in order and publishes one
// message naming them all (batchScript, msgBatch), each under its own
// version.
//
// There is no timer. Writes queue per slot group (one queue per Cache on a
// single node, one per hash slot on a Cluster: a script touches one slot).
// A write to an idle queue is sent at once, alone, with the single-write
// scripts and message formats. While a queue's batch is on the wire, the
// writes that arrive wait in the queue; when its round trip returns, its
// sender hands everything waiting to one of the waiting writers (the
// first), which sends it as the next batch, and returns. So a lone writer
// pays nothing, and batches grow with the load: as many writes as arrived
// during one round trip.
//
// Each call returns when its own writes are answered, with their error (a
// batch that fails fails every write in it: each may or may not have been
// written, as for a single write). A caller whose ctx ends while its writes
// wait in the queue takes them out and returns ctx's error, nothing
// written. Once sent, a write is not taken back: a batch that holds other
// callers' writes runs detached from the sender's cancellation (one
// caller's deadline must not fail the others' writes, nor cut a pipeline in
// the middle), bounded by the client's own timeouts; a send of one caller's
// writes alone runs under its ctx, as before batches. A caller whose ctx
// ends while its sent writes are on the wire returns ctx's error at once;
// its writes' outcome is still applied to L1 when the batch returns (see
// writePart.finish), by the version Redis gave them, like any write's.

// writeQueue holds the writes of one slot group.
type writeQueue struct {
	mu       sync.Mutex
	inFlight bool         // a batch of this queue is on the wire
	pending  []*writePart // writes that arrived meanwhile, in order
}

// writeCall is one Set or Delete: its parts, and the batches it was chosen
// to send.
type writeCall struct {
	parts []*writePart
	left  atomic.Int32  // parts not finished
	done  chan struct{} // closed when every part finished

	mu    sync.Mutex
	turns [][]*writePart // batches this call sends next
	wake  chan struct{}  // a turn was added (capacity 1)
}

// writePart is a write of one queue: a Set of one key, or the keys of one
// slot a Delete sends in one script.
type writePart struct {
	call  *writeCall
	queue *writeQueue
	names []string // the keys, without prefix
	env   []byte   // a Set's envelope; nil for a Delete
	ttl   int64    // a Set's PX
	kind  byte     // a Set's message kind: msgValue (env is published) or msgKeys
	size  int      // what it adds to a batch's request (see maxBatchBytes)
	kb    int      // its keys' bytes

	queued bool // in queue.pending; guarded by queue.mu
	err    error

	// finish applies the write's outcome (its version, or its error) to
	// L1 and the counters. The sender calls it before the caller returns,
	// or after, if the caller's ctx ended while the write was on the wire.
	finish func(version uint64, err error)
}

// maxBatchBytes bounds a batch script's request (keys, envelopes, message
// tails), and so its message: batches are cut into scripts of at most this
// much (and of at most maxKeysPerScript keys and maxMessageKeyBytes of key
// bytes, as a Delete's parts are), so that a burst of batch
// messages stays far below the output-buffer limit at which Redis
// disconnects subscribers (32 MB, or 8 MB for 60 s), and a batch's round
// trip stays short. A single write is never cut.
const maxBatchBytes = 256 << 10

// addWrite adds to call the part of a Set of names[0], or of a Delete of
// names (env nil, all in one slot on a Cluster), whose outcome finish
// applies.
func (r *remote) addWrite(call *writeCall, names []string, env []byte, ttl int64, kind byte,
	finish func(uint64, error)) {
	p := &writePart{call: call, queue: r.queueFor(names[0]), names: names, env: env, ttl: ttl, kind: kind,
		finish: finish, size: len(env) + 16}
	for _, k := range names {
		p.size += len(r.prefix) + 2*len(k) + 4
		p.kb += len(k)
	}
	call.parts = append(call.parts, p)
}

// newCall returns an empty call.
func newCall() *writeCall {
	return &writeCall{done: make(chan struct{}), wake: make(chan struct{}, 1)}
}

// queueFor returns the queue of key.
func (r *remote) queueFor(key string) *writeQueue {
	if r.cluster() == nil {
		return &r.queue
	}
	slot := keySlot(r.key(key))
	if q, ok := r.queues.Load(slot); ok {
		return q.(*writeQueue)
	}
	q, _ := r.queues.LoadOrStore(slot, &writeQueue{})
	return q.(*writeQueue)
}

// submit sends call's parts (those whose queue is idle at once, the others
// with the next batch of their queue) and returns once they are all
// answered, with their errors joined, or once ctx ends.
func (r *remote) submit(ctx context.Context, call *writeCall) error {
	call.left.Store(int32(len(call.parts)))
	var now [][]*writePart
	for i := 0; i < len(call.parts); {
		q := call.parts[i].queue
		j := i + 1
		for j < len(call.parts) && call.parts[j].queue == q {
			j++
		}
		q.mu.Lock()
		if !q.inFlight {
			q.inFlight = true
			now = append(now, call.parts[i:j])
		} else {
			for _, p := range call.parts[i:j] {
				p.queued = true
				q.pending = append(q.pending, p)
			}
		}
		q.mu.Unlock()
		i = j
	}
	if len(now) > 0 {
		r.send(ctx, call, now)
	}
	for {
		select {
		case <-call.done:
			return call.err()
		case <-call.wake:
			r.sendTurns(ctx, call)
		case <-ctx.Done():
			r.abandon(ctx, call)
			select {
			case <-call.done:
				return call.err()
			default:
				return ctx.Err()
			}
		}
	}
}

// err returns the joined errors of call's parts, once they are all done.
func (call *writeCall) err() error {
	if len(call.parts) == 1 {
		return call.parts[0].err
	}
	var errs []error
	for _, p := range call.parts {
		errs = append(errs, p.err)
	}
	return errors.Join(errs...)
}

// sendTurns sends the batches call was handed.
func (r *remote) sendTurns(ctx context.Context, call *writeCall) {
	call.mu.Lock()
	turns := call.turns
	call.turns = nil
	call.mu.Unlock()
	if len(turns) > 0 {
		r.send(ctx, call, turns)
	}
}

// abandon takes call's queued parts out of their queues (they are never
// sent), then sends the batches call was handed, detached and without
// waiting: they may hold writes of others, and their queues wait for them.
// Turns are handed under the queue's lock, so once every queued part is
// out, no turn can come any more.
func (r *remote) abandon(ctx context.Context, call *writeCall) {
	for _, p := range call.parts {
		q := p.queue
		q.mu.Lock()
		if p.queued {
			p.queued = false
			for i, x := range q.pending {
				if x == p {
					q.pending = append(q.pending[:i:i], q.pending[i+1:]...)
					break
				}
			}
		}
		q.mu.Unlock()
	}
	go r.sendTurns(context.WithoutCancel(ctx), call)
}

// next hands what waits in q to the first waiting writer as q's next
// batch, or marks q idle.
func (q *writeQueue) next() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.pending) == 0 {
		q.inFlight = false
		return
	}
	batch := q.pending
	q.pending = nil
	for _, p := range batch {
		p.queued = false
	}
	lead := batch[0].call
	lead.mu.Lock()
	lead.turns = append(lead.turns, batch)
	lead.mu.Unlock()
	select {
	case lead.wake <- struct{}{}:
	default:
	}
}

// send sends batches (each of one queue; by sender, a writer with parts in
// them) in one round trip, hands each queue's next batch on, and finishes
// the parts sent: itself if they are all sender's, under its ctx, else in
// a goroutine of their own.
func (r *remote) send(ctx context.Context, sender *writeCall, batches [][]*writePart) {
	var calls []*scriptCall
	var parts [][]*writePart
	alone := true
	for _, b := range batches {
		for len(b) > 0 {
			n, keys, kb, size := 0, 0, 0, 0
			for n < len(b) && (n == 0 || keys+len(b[n].names) <= maxKeysPerScript &&
				kb+b[n].kb <= maxMessageKeyBytes && size+b[n].size <= maxBatchBytes) {
				keys += len(b[n].names)
				kb += b[n].kb
				size += b[n].size
				alone = alone && b[n].call == sender
				n++
			}
			calls = append(calls, r.writeCall(b[:n]))
			parts = append(parts, b[:n])
			b = b[n:]
		}
	}
	if !alone {
		// Others' writes: the sender's ctx must not cut them, nor may a
		// hung connection hold the sender past its ctx (it waits for its
		// own writes as the others do, in submit).
		go r.land(context.WithoutCancel(ctx), batches, calls, parts)
		return
	}
	r.land(ctx, batches, calls, parts)
}

// land runs the scripts calls of batches (parts: each script's writes),
// hands each queue's next batch on, and finishes the parts.
func (r *remote) land(ctx context.Context, batches [][]*writePart, calls []*scriptCall, parts [][]*writePart) {
	errs := r.runWrites(ctx, calls)
	// The next batches' writers wait: hand them on before finishing these.
	for _, b := range batches {
		b[0].queue.next()
	}
	for i, c := range calls {
		ps := parts[i]
		versions, err := make([]uint64, len(ps)), errs[i]
		if err == nil {
			err = parseVersions(c, versions)
		}
		if err == nil {
			r.stats.published.Add(1)
		}
		if len(ps) > 1 {
			r.stats.writeBatches.Add(1)
			r.stats.writesCoalesced.Add(uint64(len(ps)))
		}
		for j, p := range ps {
			p.err = err
			p.finish(versions[j], err)
			if p.call.left.Add(-1) == 0 {
				close(p.call.done)
			}
		}
	}
}

// writeCall returns the script call of the parts of one queue: a single
// write's own script (whose message instances without batches read), or
// batchScript.
func (r *remote) writeCall(ps []*writePart) *scriptCall {
	if len(ps) == 1 {
		p := ps[0]
		if p.env == nil {
			keys, args := r.logged(r.keys(p.names), []any{r.channel, messageHead(msgKeys, r.origin), encodeKeys(p.names...)})
			return &scriptCall{script: deleteScript, keys: keys, args: args, names: p.names}
		}
		with := "0"
		if p.kind == msgValue {
			with = "1"
		}
		keys, args := r.logged([]string{r.key(p.names[0])},
			[]any{p.env, p.ttl, r.channel, messageHead(p.kind, r.origin), encodeKeys(p.names[0]), with})
		return &scriptCall{script: writeScript, keys: keys, args: args}
	}
	c := &scriptCall{script: batchScript}
	c.args = append(make([]any, 0, 4+6*len(ps)), r.channel, messageHead(msgBatch, r.origin), len(ps))
	for _, p := range ps {
		c.names = append(c.names, p.names...)
		op, kind := "d", byte(msgKeys)
		switch {
		case p.env != nil && p.kind == msgValue:
			op, kind = "v", msgValue
		case p.env != nil:
			op = "s"
		}
		var logTail []byte
		if kind == msgValue {
			logTail = batchEntryTail(msgKeys, p.names, 0)
		}
		c.args = append(c.args, op, len(p.names), p.env, p.ttl, batchEntryTail(kind, p.names, len(p.env)), logTail)
	}
	c.keys, c.args = r.logged(r.keys(c.names), c.args)
	return c
}

// runWrites runs calls and returns each one's error: a single call
// without WaitReplicas directly, through its master's breaker, the others
// with runAll.
func (r *remote) runWrites(ctx context.Context, calls []*scriptCall) []error {
	if len(calls) > 1 || r.waitReplicas > 0 {
		return r.runAll(ctx, calls, r.waitReplicas > 0)
	}
	c := calls[0]
	br := r.breakerFor(ctx, c.keys[0])
	if err := r.allow(br); err != nil {
		return []error{err}
	}
	c.res = c.script.Run(ctx, r.client, c.keys, c.args...)
	return []error{r.check(ctx, br, c.res.Err())}
}

// parseVersions reads the versions a write's script returned into
// versions, one per write.
func parseVersions(c *scriptCall, versions []uint64) error {
	if c.script != batchScript {
		v, err := parseVersion(c.res)
		versions[0] = v
		return err
	}
	reply, err := c.res.Slice()
	if err == nil && len(reply) != len(versions) {
		err = fmt.Errorf("%d versions for %d writes", len(reply), len(versions))
	}
	for i := 0; err == nil && i < len(reply); i++ {
		s, _ := reply[i].(string)
		if len(s) != 8 {
			err = fmt.Errorf("version %q", s)
			break
		}
		versions[i] = beUint64(s)
	}
	if err != nil {
		return fmt.Errorf("%w: batch script returned %v", ErrRemoteUnavailable, err)
	}
	return nil
}

// beUint64 reads 8 big-endian bytes.
func beUint64(s string) uint64 {
	var v uint64
	for i := range 8 {
		v = v<<8 | uint64(s[i])
	}
	return v
}
