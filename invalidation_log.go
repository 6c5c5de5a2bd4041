package tiered

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// The invalidation log lets a subscription gap heal without a flush. Every
// script that publishes an invalidation also appends it (keys and version,
// never a value) to a Redis Stream of the namespace, "tiered:log:<ns>",
// trimmed to the last Options.InvalidationLog, and the message carries the
// entry's ID (see versionLua's publish). The subscriber remembers, per
// channel, the last entry it applied (its position); when a gap would heal,
// it reads each channel's log after its position and applies every entry
// through the members exactly as a message, and then, if every log still
// held its position, restores the epoch of before the gap: the entries L1
// filled before the gap are served again. Otherwise (no position, the log
// trimmed past it or replaced, another Redis server, a flush asked for
// during the gap, a Cluster) it heals by a flush, to an epoch never used
// before, as it always did.
//
// A position is only ever behind what was applied, never ahead: messages
// arrive in the order of their IDs, and extend it only within the healthy
// spell it was read in (gapCount); it is read, with the server's run_id,
// from the log's tail once the channel's subscription is confirmed and
// healthy, and after a flush heal, and becomes the position only once a
// ping sent after the read was answered (proveTails): the messages of the
// entries up to the tail may still be on their way, and a gap lose them.
//
// Why restoring the old epoch E is safe. L1 serves an entry only if its
// epoch is the current one and its generation is its key's current one, and
// every entry records the epoch and generation of when its fill began.
//
//  1. healthy under E; the subscriber applied the log up to P
//  2. the gap: the epoch becomes O, odd and never used before; lost:
//     the messages of the writes after P that had not arrived
//  3. the subscription is back: confirmed, and a ping sent after the gap
//     answered; every write from now on will be delivered
//  4. the replay reads the log from P to its tail T, checking that P is
//     there (so nothing after it was trimmed) on the same server (run_id):
//     every write between P and T bumps its key's generation, exactly as
//     its message would have; writes after T arrive as messages (3)
//  5. the epoch becomes E again
//
// After 5, an entry of epoch E began its fill under E, that is before 2
// (a fill that began during the gap carries O): it read Redis before the
// gap, so any write that could have changed what it read came after its
// ticket and moved its key's generation, live before 2, by the replay in
// 4, or by a message after 3. Only E's entries become servable again:
// no fill is stored under an odd epoch but outage fills (keep with
// outage, local.set), and odd epochs never repeat, so those of an earlier
// gap are not served in a later one; settle and handOne compare the epoch
// of now; wrote keeps an own write only if no newer version was heard,
// which the replay raises too. A flush asked for during the gap (Redis
// answered again after an outage: what was loaded meanwhile must go) makes
// the heal a flush. The rest only compares epochs for being equal or
// newer: a lease wait (awaitLease) whose message the gap lost was woken
// by the gap's broken channel, or by the replay, which wakes waiters like
// a message; a caller after 5 that joins a flight begun under O
// (singleflight: O > E) gets what it read during the gap, which the same
// generations fence.
type logPos struct {
	id       string // the entry's stream ID; "" if none is known: the next gap flushes
	ident    string // its origin and version (see logged): a replaced log's entry with that ID differs
	run      string // the run_id of the Redis server that held the log
	gap      uint64 // the subscriber's gapCount when the position was read
	unlogged bool   // a message without an ID came in spell gap: no position until a flush heal
}

// advance moves the position to the message's log entry, if the position
// was read in this healthy spell (gap). It is called before the members
// apply the message, by the receive loop, which also applies it before it
// handles anything else (a heal's ping answer included), so no replay reads
// the position in between. A message without an ID forgets the position:
// its write was not logged (an instance with the log disabled, or of an
// older version), and a gap could lose one like it, which no replay would
// find.
func (p *logPos) advance(payload string, gap uint64) {
	if p.gap != gap {
		return
	}
	id, identity, _ := logged(payload)
	switch {
	case id == "":
		*p = logPos{gap: gap, unlogged: true}
	case p.id != "" && streamIDLess(p.id, id):
		p.id, p.ident = id, identity
	}
}

// streamIDLess reports whether stream ID a ("ms-seq") is before b.
func streamIDLess(a, b string) bool {
	am, as := splitStreamID(a)
	bm, bs := splitStreamID(b)
	return am < bm || am == bm && as < bs
}

func splitStreamID(id string) (ms, seq uint64) {
	m, s, _ := strings.Cut(id, "-")
	ms, _ = strconv.ParseUint(m, 10, 64)
	seq, _ = strconv.ParseUint(s, 10, 64)
	return ms, seq
}

// replayPage is how many log entries a replay reads per round trip.
const replayPage = 1000

// replay heals the gap counted gap: by replaying every channel's log, or
// by a flush if it cannot.
func (s *subscriber) replay(gap uint64) {
	defer s.wg.Done()
	ctx, cancel := context.WithTimeout(s.ctx, 4*s.interval)
	defer cancel()
	type job struct {
		channel string
		cm      *channelMembers
		pos     logPos
	}
	var jobs []job
	s.mu.Lock()
	for ch, cm := range s.channels {
		jobs = append(jobs, job{ch, cm, cm.pos})
	}
	s.mu.Unlock()
	why, n := "", 0
	for i := range jobs {
		j := &jobs[i]
		if j.pos.id == "" {
			why = "no position in the invalidation log of " + j.channel
			break
		}
		end, k, err := s.replayChannel(ctx, j.channel, j.cm.log, j.pos)
		n += k
		if err != "" {
			why = err
			break
		}
		j.pos = end
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	s.replaying = false
	if s.gapCount.Load() != gap {
		s.closeGap() // another gap began meanwhile: start over if it healed
		return
	}
	switch {
	case !s.healedAny:
		why = "first heal"
	case s.mustFlush:
		why = "Redis answered again after failing during the gap"
	}
	if why != "" {
		s.healFlushed(why)
		return
	}
	for _, j := range jobs {
		if s.channels[j.channel] == j.cm {
			j.pos.gap = gap
			j.cm.pos = j.pos
		}
	}
	// Counted before the epoch turns even, so that a caller that sees the
	// subscription healthy also sees how it healed in Stats.
	s.replayed.Add(1)
	s.replayedN.Add(uint64(n))
	s.epoch.Store(s.lastEven)
	close(s.healed)
	s.broken = make(chan struct{})
	s.log.Info("tiered: invalidation subscription healthy; gap recovered from the log, L1 kept",
		"entries", n, "gap", time.Since(s.gapAt))
}

// replayChannel applies channel's log after pos to its members. It returns
// the last entry applied and how many were, or why the log cannot be
// trusted.
func (s *subscriber) replayChannel(ctx context.Context, channel, log string, pos logPos) (logPos, int, string) {
	n := 0
	for {
		run, entries, err := s.readLog(ctx, func(p redis.Pipeliner) *redis.XMessageSliceCmd {
			// From pos itself: a page that begins with it proves that
			// nothing after it was trimmed (trims take the oldest first).
			return p.XRangeN(ctx, log, pos.id, "+", replayPage+1)
		})
		switch {
		case err != nil:
			return pos, n, "reading the invalidation log failed: " + err.Error()
		case run != pos.run:
			return pos, n, "another Redis server (restarted, or a failover)"
		case len(entries) == 0:
			return pos, n, "the invalidation log is gone"
		case entries[0].ID != pos.id || entryIdent(entries[0]) != pos.ident:
			return pos, n, "the invalidation log no longer holds the position (trimmed past it, or replaced)"
		}
		s.mu.Lock()
		var members []member
		if cm := s.channels[channel]; cm != nil {
			members = cm.members
		}
		s.mu.Unlock()
		for _, e := range entries[1:] {
			msg, ok := e.Values["m"].(string)
			if !ok {
				continue // a marker
			}
			for _, x := range members {
				x.invalidated(msg)
			}
			n++
		}
		last := entries[len(entries)-1]
		pos = logPos{id: last.ID, ident: entryIdent(last), run: run}
		if len(entries) <= replayPage {
			return pos, n, ""
		}
	}
}

// A log that is empty (never written, or its key gone) holds no position
// to replay from, so the subscriber that finds it so appends a marker: an
// entry of field markerField, a random identity, that replays skip.
const markerField = "p"

// mark appends a marker to log and returns it as its only entry.
func (s *subscriber) mark(ctx context.Context, log string) ([]redis.XMessage, error) {
	ident := string(binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, rand.Uint64()), rand.Uint64()))
	id, err := s.client.XAdd(ctx, &redis.XAddArgs{Stream: log, Values: []any{markerField, ident}}).Result()
	if err != nil {
		return nil, err
	}
	return []redis.XMessage{{ID: id, Values: map[string]any{markerField: ident}}}, nil
}

// entryIdent returns a log entry's identity, as logged does for a message.
func entryIdent(e redis.XMessage) string {
	if m, ok := e.Values["m"].(string); ok {
		return ident(m)
	}
	m, _ := e.Values[markerField].(string)
	return m
}

// readLog runs read in one pipeline with INFO server, and returns the
// server's run_id ("" if INFO is not answered: then a restart is only seen
// by its log) and what read returned.
func (s *subscriber) readLog(ctx context.Context, read func(redis.Pipeliner) *redis.XMessageSliceCmd) (string, []redis.XMessage, error) {
	pipe := s.client.Pipeline()
	info := pipe.Info(ctx, "server")
	cmd := read(pipe)
	_, _ = pipe.Exec(ctx)
	entries, err := cmd.Result()
	if err == redis.Nil {
		err = nil
	}
	run := ""
	if text, err := info.Result(); err == nil {
		if _, rest, ok := strings.Cut(text, "run_id:"); ok {
			run, _, _ = strings.Cut(rest, "\r\n")
		}
	}
	return run, entries, err
}

// healFlushed ends the gap with an epoch never used before: every entry
// filled until now becomes a miss. Then it reads the logs' tails, the
// positions from which the next gap can be replayed. stateMu must be held.
func (s *subscriber) healFlushed(why string) {
	if s.healedAny {
		s.gapFlushes.Add(1) // before the epoch turns even, as in replay
	}
	s.setEpoch(0)
	close(s.healed)
	s.broken = make(chan struct{})
	if s.healedAny {
		s.log.Info("tiered: invalidation subscription healthy; L1 flushed", "reason", why)
	} else {
		s.log.Info("tiered: invalidation subscription healthy")
	}
	s.healedAny = true
	if _, cluster := s.client.(*redis.ClusterClient); !cluster {
		s.readTails(s.gapCount.Load(), "")
	}
}

// readTails reads, in the background, the tail of the log of channel (""
// for every confirmed channel that has a log), which becomes its position
// once proven (see proveTails), unless a gap other than gap began
// meanwhile.
func (s *subscriber) readTails(gap uint64, channel string) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		ctx, cancel := context.WithTimeout(s.ctx, 4*s.interval)
		defer cancel()
		logs := make(map[*channelMembers]string)
		s.mu.Lock()
		for ch, cm := range s.channels {
			if cm.confirmed && cm.log != "" && (channel == "" || ch == channel) {
				logs[cm] = cm.log
			}
		}
		s.mu.Unlock()
		for cm, log := range logs {
			run, entries, err := s.readLog(ctx, func(p redis.Pipeliner) *redis.XMessageSliceCmd {
				return p.XRevRangeN(ctx, log, "+", "-", 1)
			})
			if err == nil && len(entries) == 0 {
				// Nothing to stand on: mark the start (see marker).
				entries, err = s.mark(ctx, log)
			}
			if err != nil {
				continue // no position: the next gap flushes
			}
			s.mu.Lock()
			if s.gapCount.Load() == gap {
				cm.tail = logPos{id: entries[0].ID, ident: entryIdent(entries[0]), run: run, gap: gap}
				cm.tailSeq = s.pingSeq.Load()
			}
			s.mu.Unlock()
		}
		select { // a ping now, to prove the tails
		case s.kick <- struct{}{}:
		default:
		}
	}()
}

// proveTails is called with each ping answered on the subscription. A tail
// read is a position only once every message published before it was
// applied: Redis ran the read before it answered a ping sent after it (seq
// above tailSeq), and delivers a connection's messages and answers in
// order, so the messages of every entry up to the tail came before this
// answer. Until then, a gap could lose one of them and a replay from the
// tail would not find it.
func (s *subscriber) proveTails(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	gap := s.gapCount.Load()
	for _, cm := range s.channels {
		t := cm.tail
		if t.id == "" || seq <= cm.tailSeq {
			continue
		}
		cm.tail = logPos{}
		cur := cm.pos
		if t.gap == gap && (cur.gap != gap || !cur.unlogged && (cur.id == "" || streamIDLess(cur.id, t.id))) {
			cm.pos = t
		}
	}
}
