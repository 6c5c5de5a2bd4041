package tiered

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Invalidation works like this. Set and Delete publish, in the same script
// that writes Redis, a message naming the keys on "tiered:inv:<namespace>".
// Every process holds one subscription per Redis client (the subscriber),
// shared by all its Caches on that client; it hands every message to the
// Caches of that namespace, the sender included, which apply it to L1 by
// the write's version (local.heard).
//
// A subscription can lose messages without saying so: go-redis reconnects
// and resubscribes by itself, a stalled TCP connection delivers nothing
// without erroring, and Redis drops subscribers whose output buffer fills.
// So the subscriber never trusts it blindly. It keeps an epoch, odd while
// the subscription is not known to be healthy; every L1 entry records the
// epoch its fill began in and is served only while the epoch is unchanged.
//
//   - Any receive error is a gap: the epoch becomes odd, so everything in L1
//     becomes a miss at once.
//   - To catch silent stalls, the subscriber sends a PING every interval on
//     the subscription's own connection. If one stays unanswered for three
//     intervals, that is a gap too, and the subscription is rebuilt. The
//     PING uses no connection of the command pool, so a pool that is busy
//     (say, with blocking commands) cannot make a healthy subscription look
//     dead.
//   - The epoch becomes even again only when the answer to a PING sent
//     after the gap was noticed comes back. Redis answers the commands of a
//     connection in order, and go-redis sends the (re)SUBSCRIBE of every
//     channel on a new connection before anything else, so that answer
//     proves the subscription was in place. Fills that began before the
//     heal carry the odd epoch (or an older even one) and are never served
//     after it, so a value read while messages could have been lost is
//     never trusted.
//   - On a Redis Cluster the PING proves only the subscription's own
//     connection: every master's path to it is proven by heartbeats
//     published through that master (see masterPaths). A path down is a
//     gap too, and the epoch becomes even only once both the subscription
//     and every path are healthy.
type subscriber struct {
	client    redis.UniversalClient
	hbChannel string
	interval  time.Duration
	log       *slog.Logger

	epoch    atomic.Uint64 // odd while unhealthy; read by every L1 hit
	stateMu  sync.Mutex    // serializes gap and heal
	gapSeq   uint64        // pings up to this one were sent before the last call of gap
	gapAt    time.Time     // when the last gap was noticed, or the subscription last rebuilt
	resubbed bool          // the private channel's subscription was confirmed since the last gap
	subDown  bool          // the subscription itself is not known to be healthy
	paths    masterPaths   // on a cluster: the path from each master
	healed   chan struct{} // closed while healthy; a new one at every gap
	broken   chan struct{} // closed at the gap that ends a healthy spell; a new one at every heal
	pingSeq  atomic.Uint64 // last ping sequence number sent
	pingSent atomic.Int64  // UnixNano of the oldest unanswered ping; 0 if none
	lastPong atomic.Int64  // UnixNano of the last answer
	pinging  atomic.Bool   // a ping is being sent

	// The epoch's values, and what a heal needs to know of the gap it
	// ends; guarded by stateMu (see invalidation_log.go).
	epochMax  uint64        // the largest epoch so far: every new one is larger
	lastEven  uint64        // the epoch before the gap, which a replay restores
	mustFlush bool          // something since the gap's start calls for a flush (see flush)
	replaying bool          // a replay or the decision to flush is under way
	healedAny bool          // the subscription was healthy once
	gapCount  atomic.Uint64 // calls of gap; messages extend a log position only within one

	gaps       atomic.Uint64
	hbMisses   atomic.Uint64
	flushes    atomic.Uint64
	replayed   atomic.Uint64 // gaps healed by replaying the log
	replayedN  atomic.Uint64 // log entries applied by replays
	gapFlushes atomic.Uint64 // gaps healed by a flush

	mu       sync.Mutex // guards ps, psAddr, channels, refs
	ps       *redis.PubSub
	psAddr   string // on a cluster: the node ps is on, "" if the ClusterClient picked it
	channels map[string]*channelMembers
	refs     int

	kick   chan struct{} // asks for a heartbeat now
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// member is what a subscriber delivers to: a Cache of some value type.
type member interface {
	// subscribed is called once, when the member's channel is confirmed.
	subscribed()
	// invalidated is called for every message on the member's channel.
	invalidated(payload string)
}

// clusterMember is a member that wants to know when the masters of a Redis
// Cluster changed.
type clusterMember interface {
	clusterChanged()
}

type channelMembers struct {
	members   []member // replaced, never modified, so readers may keep it
	confirmed bool
	log       string // the namespace's invalidation log (see invalidation_log.go)
	pos       logPos // the last entry of log applied (guarded by mu)
	tail      logPos // a tail of log read, not yet proven a position (see proveTails)
	tailSeq   uint64 // the last ping sent before tail was read
}

// subscribers holds the subscriber of each Redis client in this process.
// It is the only state this package shares between Caches: the subscription
// per client is shared so that a process with many Caches still holds one
// pub/sub connection per client.
var subscribers = struct {
	sync.Mutex
	m map[redis.UniversalClient]*subscriber
}{m: make(map[redis.UniversalClient]*subscriber)}

// retryPause paces the receive loop's reads after errors (go-redis redials
// on a read after a failed one). A failure reads again at once: go-redis
// redialled and resubscribed within the failed read, so the new
// subscription's confirmations are already on their way, and L1 is back in
// use within a round trip of a CLIENT KILL. A failure within retryPause of
// the one before waits retryPause: a connection that keeps dying (Redis
// down, a subscriber over its output-buffer limit in a busy namespace) must
// not be redialled in a loop.
const retryPause = 100 * time.Millisecond

// acquireSubscriber returns the subscriber of client, starting it if needed.
// Every call must be matched by a release.
func acquireSubscriber(client redis.UniversalClient, interval time.Duration, log *slog.Logger) *subscriber {
	subscribers.Lock()
	defer subscribers.Unlock()
	s := subscribers.m[client]
	if s == nil {
		s = startSubscriber(client, interval, log)
		subscribers.m[client] = s
	}
	s.mu.Lock()
	s.refs++
	s.mu.Unlock()
	return s
}

func (s *subscriber) release() {
	subscribers.Lock()
	defer subscribers.Unlock()
	s.mu.Lock()
	s.refs--
	last := s.refs == 0
	s.mu.Unlock()
	if last {
		delete(subscribers.m, s.client)
		s.stop()
	}
}

func startSubscriber(client redis.UniversalClient, interval time.Duration, log *slog.Logger) *subscriber {
	s := &subscriber{
		client:    client,
		hbChannel: fmt.Sprintf("tiered:hb:%016x", rand.Uint64()),
		interval:  interval,
		log:       log,
		channels:  make(map[string]*channelMembers),
		kick:      make(chan struct{}, 1),
		subDown:   true,
	}
	_, s.paths.unknown = client.(*redis.ClusterClient)
	s.epoch.Store(1) // unhealthy until the first ping is answered
	s.epochMax = 1
	s.lastPong.Store(time.Now().UnixNano())
	s.gapAt = time.Now()
	s.healed = make(chan struct{})
	s.broken = make(chan struct{})
	close(s.broken)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	// Subscribe dials now; if Redis is down the loop keeps redialing.
	s.mu.Lock()
	s.ps = s.subscribe(s.hbChannel)
	s.mu.Unlock()
	s.wg.Add(2)
	go s.receive()
	go s.heartbeat()
	if cc, ok := client.(*redis.ClusterClient); ok {
		s.wg.Add(1)
		go s.watchCluster(cc)
	}
	return s
}

func (s *subscriber) stop() {
	s.cancel()
	s.mu.Lock()
	_ = s.ps.Close() // unblocks the receive loop
	s.mu.Unlock()
	s.wg.Wait()
}

// add subscribes m to channel, whose invalidation log is log.
func (s *subscriber) add(channel, log string, m member) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cm := s.channels[channel]
	if cm == nil {
		cm = &channelMembers{log: log}
		s.channels[channel] = cm
		if err := s.ps.Subscribe(s.ctx, channel); err != nil {
			// go-redis may have replaced the connection underneath.
			s.gap("subscribe failed", err)
		}
	}
	cm.members = append(cm.members[:len(cm.members):len(cm.members)], m)
	if cm.confirmed {
		m.subscribed()
	}
}

// remove unsubscribes m from channel.
func (s *subscriber) remove(channel string, m member) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cm := s.channels[channel]
	if cm == nil {
		return
	}
	kept := make([]member, 0, len(cm.members))
	for _, x := range cm.members {
		if x != m {
			kept = append(kept, x)
		}
	}
	cm.members = kept
	if len(kept) == 0 {
		delete(s.channels, channel)
		if err := s.ps.Unsubscribe(s.ctx, channel); err != nil && s.ctx.Err() == nil {
			s.gap("unsubscribe failed", err)
		}
	}
}

func (s *subscriber) healthy() bool { return s.epoch.Load()&1 == 0 }

// brokenChan returns a channel that is closed at the next gap, and whether
// the subscription is healthy now (if not, the channel is closed already).
func (s *subscriber) brokenChan() (<-chan struct{}, bool) {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	return s.broken, s.epoch.Load()&1 == 0
}

// healedChan returns a channel that is closed while the subscription is
// healthy.
func (s *subscriber) healedChan() <-chan struct{} {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	return s.healed
}

// gap records that messages may have been lost. It reports whether the
// subscription was healthy until now.
func (s *subscriber) gap(reason string, err error) bool {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	s.gapCount.Add(1)
	s.gapSeq = s.pingSeq.Load()
	s.resubbed = false
	s.subDown = true
	return s.open(reason, err)
}

// open makes the epoch odd, unless it is already; it reports whether it
// was healthy until now. stateMu must be held.
func (s *subscriber) open(reason string, err error, attrs ...any) bool {
	if s.epoch.Load()&1 == 1 {
		return false
	}
	s.gapAt = time.Now()
	s.healed = make(chan struct{})
	close(s.broken)
	s.lastEven = s.epoch.Load()
	s.mustFlush = false
	s.setEpoch(1)
	s.gaps.Add(1)
	s.log.Warn("tiered: invalidation subscription lost; L1 bypassed until it is back",
		append([]any{"reason", reason, "err", err}, attrs...)...)
	return true
}

// setEpoch makes the epoch the next value above every one so far of
// parity odd (1) or even (0). Values never repeat but for a replay's
// restore of the epoch before its gap (see invalidation_log.go). stateMu
// must be held.
func (s *subscriber) setEpoch(odd uint64) {
	e := s.epochMax + 1
	if e&1 != odd {
		e++
	}
	s.epochMax = e
	s.epoch.Store(e)
}

// closeGap ends the gap once the subscription and every master path (on a
// cluster, once its masters are known) are healthy: by a replay of the
// invalidation log where it can, else by a flush (see
// invalidation_log.go). stateMu must be held.
func (s *subscriber) closeGap() {
	if s.epoch.Load()&1 == 0 || s.subDown || s.paths.down != 0 || s.paths.unknown || s.replaying {
		return
	}
	if _, cluster := s.client.(*redis.ClusterClient); cluster {
		s.healFlushed("the log is not kept on a Redis Cluster")
		return
	}
	s.replaying = true
	s.wg.Add(1)
	go s.replay(s.gapCount.Load())
}

// flush makes every L1 entry filled before it a miss without declaring a
// gap (no invalidation was lost, but values read before may differ from
// what Redis now holds). While a gap is open it makes the gap's heal a
// flush: a replay would restore the epoch of before.
func (s *subscriber) flush(reason string) {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	if s.epoch.Load()&1 == 0 {
		s.setEpoch(0)
	} else {
		s.mustFlush = true
	}
	s.flushes.Add(1)
	// Debug, not Warn: a flush is an expected part of recovering (from a
	// gap, or from an outage of Redis or of a master that kept too many
	// values to drop them one by one), and may come in bursts.
	s.log.Debug("tiered: L1 flushed", "reason", reason)
}

// heal records that ping seq was answered. It heals a gap only once the
// private channel's subscription was confirmed after it: go-redis
// subscribes every channel in one command on a new connection, so the
// answer to a later ping proves them all in place. (A connection can be
// replaced on which go-redis subscribed nothing, when the SUBSCRIBE of a
// rebuild fails; its pings are answered all the same.)
func (s *subscriber) heal(seq uint64) {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	if s.subDown && seq > s.gapSeq && s.resubbed {
		s.subDown = false
		s.closeGap()
	}
}

func (s *subscriber) receive() {
	defer s.wg.Done()
	var failedAt time.Time // when a read last failed
	for s.ctx.Err() == nil {
		s.mu.Lock()
		ps := s.ps
		s.mu.Unlock()
		// A read that fails redials before it returns, and only its return
		// declares the gap: while Redis refuses or stalls the redial (a
		// restart), L1 stays in use, for as long as the heartbeat allows (4
		// intervals, README bound 2).
		msg, err := ps.ReceiveTimeout(s.ctx, s.interval)
		var ne net.Error
		switch {
		case err == nil:
			s.handle(msg)
		case errors.As(err, &ne) && ne.Timeout():
			// Nothing to read this interval; the connection is kept.
		case s.ctx.Err() != nil:
			return
		default:
			s.gap("receive failed", err)
			if cc, ok := s.client.(*redis.ClusterClient); ok {
				cc.ReloadState(s.ctx)
			}
			last := failedAt
			failedAt = time.Now()
			if failedAt.Sub(last) >= retryPause {
				continue
			}
			select {
			case <-time.After(retryPause):
			case <-s.ctx.Done():
				return
			}
		}
	}
}

// rebuild replaces the subscription with a new one on a new connection. The
// old one may be stalled in a way go-redis cannot see (its health check
// never waits for a reply).
func (s *subscriber) rebuild() {
	s.mu.Lock()
	if s.ctx.Err() != nil {
		// Stopped (reloadMasters, which stop does not wait for, may get
		// here after stop): stop closes s.ps once it holds s.mu.
		s.mu.Unlock()
		return
	}
	old := s.ps
	chans := []string{s.hbChannel}
	for ch := range s.channels {
		chans = append(chans, ch)
	}
	s.ps = s.subscribe(chans...)
	s.pingSent.Store(0)
	s.lastPong.Store(time.Now().UnixNano())
	s.stateMu.Lock()
	s.gapAt = time.Now()
	s.stateMu.Unlock()
	// Added under s.mu, which stop takes after cancelling s.ctx and before
	// it waits: never after its Wait began.
	s.wg.Add(1)
	s.mu.Unlock()
	// Close takes the old PubSub's lock, which a ping stuck in a write
	// on the stalled connection may hold until its WriteTimeout.
	go func() {
		defer s.wg.Done()
		_ = old.Close()
	}()
}

// subscribe opens a subscription to chans, the private channel first. s.mu
// must be held.
//
// On a Redis Cluster every node delivers every PUBLISH (it is forwarded
// over the cluster bus), so a subscription may be on any node, and the
// fleet's subscriptions should spread evenly over the masters: each costs
// its node a copy of every message. A ClusterClient's PubSub does not keep
// them spread: it connects to the master of its first channel's slot, and
// when it reconnects by itself it lists its channels from a map, so that
// the namespace's channel, which every instance shares, comes first half of
// the time: after a few reconnects most of a fleet is on one master. So
// the subscription is opened on the master of the private channel's slot
// (a random slot per subscriber) through that master's own client, which
// always reconnects to the same node. reloadMasters moves it when that node
// stops being a master. If the slot map cannot be had now, the
// ClusterClient picks the node (its first channel is the private one), and
// the next reloadMasters moves it.
func (s *subscriber) subscribe(chans ...string) *redis.PubSub {
	s.psAddr = ""
	cc, ok := s.client.(*redis.ClusterClient)
	if !ok {
		return s.client.Subscribe(s.ctx, chans...)
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.interval)
	node, err := cc.MasterForKey(ctx, s.hbChannel)
	cancel()
	if err != nil {
		return cc.Subscribe(s.ctx, chans...)
	}
	s.psAddr = node.Options().Addr
	return node.Subscribe(s.ctx, chans...)
}

// subscribedOn returns the node the subscription is on ("" if the
// ClusterClient picked it).
func (s *subscriber) subscribedOn() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.psAddr
}

func (s *subscriber) handle(msg any) {
	switch m := msg.(type) {
	case *redis.Pong:
		if seq, err := strconv.ParseUint(m.Payload, 10, 64); err == nil {
			s.lastPong.Store(time.Now().UnixNano())
			s.pingSent.Store(0)
			s.proveTails(seq)
			s.heal(seq)
		}
	case *redis.Message:
		if m.Channel == s.hbChannel {
			s.echoed(m.Payload)
			return
		}
		s.mu.Lock()
		var members []member
		if cm := s.channels[m.Channel]; cm != nil {
			members = cm.members
			cm.pos.advance(m.Payload, s.gapCount.Load())
		}
		s.mu.Unlock()
		for _, x := range members {
			x.invalidated(m.Payload)
		}
	case *redis.Subscription:
		if m.Kind != "subscribe" {
			return
		}
		if m.Channel == s.hbChannel {
			// A (re)subscription. go-redis may have replaced the connection
			// without returning an error (e.g. a maintenance handoff), losing
			// what the old one had not delivered: count it as a gap (a no-op
			// if one was already noticed). Then ask for a ping now rather
			// than at the next tick, so L1 is back in use within a round trip.
			s.gap("resubscribed", nil)
			s.stateMu.Lock()
			s.resubbed = true
			s.stateMu.Unlock()
			select {
			case s.kick <- struct{}{}:
			default:
			}
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if cm := s.channels[m.Channel]; cm != nil && !cm.confirmed {
			cm.confirmed = true
			for _, x := range cm.members {
				x.subscribed()
			}
			if s.healthy() {
				s.readTails(s.gapCount.Load(), m.Channel)
			}
		}
	}
}

// unconfirmedFor returns how long the subscription has been unhealthy
// without its resubscription confirmed; zero if it is healthy or confirmed.
func (s *subscriber) unconfirmedFor() time.Duration {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	if s.epoch.Load()&1 == 0 || s.resubbed {
		return 0
	}
	return time.Since(s.gapAt)
}

// heartbeat pings the subscription's connection every interval, and
// declares it dead when a ping is unanswered and none was answered for 3
// intervals. Pings are
// sent on a goroutine of their own, one at a time: a write stuck on a
// stalled connection must not delay the check.
func (s *subscriber) heartbeat() {
	defer s.wg.Done()
	deadAfter := int64(3 * s.interval)
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-s.kick:
		case <-s.ctx.Done():
			return
		}
		// Dead: a ping is unanswered, and nothing was answered for 3
		// intervals. Counted from the last answer, not the ping, so that a
		// connection that dies just after an answer is declared dead within
		// 4 intervals of its death (the ticks come every interval).
		if s.pingSent.Load() != 0 && time.Now().UnixNano()-s.lastPong.Load() > deadAfter {
			if s.gap("ping unanswered", nil) {
				s.hbMisses.Add(1)
			}
			s.rebuild()
		} else if s.unconfirmedFor() > time.Duration(deadAfter) {
			// Answered, but never subscribed since the gap.
			s.rebuild()
		}
		if !s.pinging.CompareAndSwap(false, true) {
			continue
		}
		s.mu.Lock()
		ps := s.ps
		s.mu.Unlock()
		seq := s.pingSeq.Add(1)
		s.pingSent.CompareAndSwap(0, time.Now().UnixNano())
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.pinging.Store(false)
			// An error needs no handling: the missing answer is what counts
			// (and a broken connection fails the receive loop's read too).
			ctx, cancel := context.WithTimeout(s.ctx, s.interval)
			defer cancel()
			_ = ps.Ping(ctx, strconv.FormatUint(seq, 10))
		}()
	}
}

// An invalidation message is a kind byte, the sending Cache's 8-byte id and
// the 8-byte version Redis gave the write (the script puts it there), then,
// for msgKeys, each key as a uvarint length and its bytes, or, for msgValue,
// one key so written and then, to the end, the key's new envelope as stored
// in Redis. The client sends the script the head (kind and id) and the keys;
// the script joins them around the version.
//
// A msgBatch message names the writes of one batch (see writes.go), each
// with its own version, in the order Redis ran them: after the kind and the
// id come entries, each an entry kind (msgKeys or msgValue), the version,
// and, for msgKeys, the number of keys as a uvarint and the keys, or, for
// msgValue, the key and the envelope's length as a uvarint and the
// envelope. Single writes keep the single formats, which instances of the
// versions before batches read if the log is off (see below).
//
// A message the script also appended to the namespace's invalidation log
// (see invalidation_log.go) has its kind byte in upper case and, after its
// header (kind, id and, but for msgBatch, version), the log entry's ID as
// one length byte and its text; the log entry itself is the message without
// ID and envelopes (an entry that carried a value is logged as msgKeys).
const (
	msgKeys     = 'k'
	msgValue    = 'v'
	msgNotFound = 'n' // msgKeys of a load that found nothing: waiters for its lease need not load
	msgBatch    = 'b'

	msgHeader = 17 // kind, origin, version

	msgLogged = 'a' - 'A' // subtracted from a kind: the message carries its log entry's ID
)

// messageHead returns the kind byte and origin of a message.
func messageHead(kind byte, origin uint64) []byte {
	return binary.BigEndian.AppendUint64(append(make([]byte, 0, 9), kind), origin)
}

// encodeKeys returns the key list of a message.
func encodeKeys(keys ...string) []byte {
	n := 0
	for _, k := range keys {
		n += binary.MaxVarintLen64 + len(k)
	}
	b := make([]byte, 0, n)
	for _, k := range keys {
		b = binary.AppendUvarint(b, uint64(len(k)))
		b = append(b, k...)
	}
	return b
}

// batchEntryTail returns what follows the version in a msgBatch entry of
// keys, but for a msgValue entry's envelope, which the script appends.
func batchEntryTail(kind byte, keys []string, envelopeLen int) []byte {
	if kind == msgValue {
		return binary.AppendUvarint(encodeKeys(keys[0]), uint64(envelopeLen))
	}
	return append(binary.AppendUvarint(nil, uint64(len(keys))), encodeKeys(keys...)...)
}

var errBadInvalidation = errors.New("tiered: malformed invalidation message")

// invalidation is a decoded invalidation: a message, or one entry of a
// msgBatch message. Its strings alias the message.
type invalidation struct {
	kind     byte
	origin   uint64
	version  uint64
	logID    string // the ID of its log entry; "" if it was not logged
	keys     []string
	envelope string // msgValue: the new envelope of keys[0]
}

// decodeMessage decodes any message of ours into its invalidations, in
// the order Redis ran their writes.
func decodeMessage(p string) ([]invalidation, error) {
	if len(p) == 0 || p[0] != msgBatch && p[0]+msgLogged != msgBatch {
		m, err := decodeInvalidation(p)
		return []invalidation{m}, err
	}
	_, _, p = logged(p)
	if p[0] != msgBatch {
		return nil, errBadInvalidation
	}
	if len(p) < 9 {
		return nil, errBadInvalidation
	}
	origin := binary.BigEndian.Uint64([]byte(p[1:9]))
	var out []invalidation
	for rest := p[9:]; len(rest) > 0; {
		if len(rest) < 9 || rest[0] != msgKeys && rest[0] != msgValue {
			return nil, errBadInvalidation
		}
		m := invalidation{kind: rest[0], origin: origin, version: binary.BigEndian.Uint64([]byte(rest[1:9]))}
		rest = rest[9:]
		n := uint64(1)
		if m.kind == msgKeys {
			var ok bool
			if n, rest, ok = uvarint(rest); !ok || n == 0 || n > uint64(len(rest)) {
				return nil, errBadInvalidation
			}
		}
		for range n {
			l, r, ok := uvarint(rest)
			if !ok || l > uint64(len(r)) {
				return nil, errBadInvalidation
			}
			m.keys = append(m.keys, r[:l])
			rest = r[l:]
		}
		if m.kind == msgValue {
			l, r, ok := uvarint(rest)
			if !ok || l == 0 || l > uint64(len(r)) {
				return nil, errBadInvalidation
			}
			m.envelope, rest = r[:l], r[l:]
		}
		out = append(out, m)
	}
	if len(out) == 0 {
		return nil, errBadInvalidation
	}
	return out, nil
}

// uvarint reads a uvarint as binary.AppendUvarint writes it (a length in an
// overlong varint is not: a message from someone else) from the start of s.
func uvarint(s string) (n uint64, rest string, ok bool) {
	n, w := binary.Uvarint([]byte(s[:min(len(s), binary.MaxVarintLen64)]))
	var minimal [binary.MaxVarintLen64]byte
	if w <= 0 || binary.PutUvarint(minimal[:], n) != w {
		return 0, s, false
	}
	return n, s[w:], true
}

// logged returns the log entry ID message p carries, the entry's identity
// (see ident), and the message without the ID, its kind byte in lower case;
// if p carries no ID, id is "" and msg is p.
func logged(p string) (id, identity, msg string) {
	if len(p) == 0 {
		return "", "", p
	}
	k := p[0] + msgLogged
	at := msgHeader
	switch k {
	case msgKeys, msgValue, msgNotFound:
	case msgBatch:
		at = 9
	default:
		return "", "", p
	}
	if len(p) <= at {
		return "", "", p
	}
	n := int(p[at])
	if n == 0 || len(p) < at+1+n {
		return "", "", p
	}
	msg = string(k) + p[1:at] + p[at+1+n:]
	return p[at+1 : at+1+n], ident(msg), msg
}

// ident returns the identity of a message without log ID (a log entry):
// its origin and its first version, which an entry of another log with the
// same ID would not share.
func ident(msg string) string {
	switch {
	case len(msg) >= 18 && msg[0] == msgBatch:
		return msg[1:9] + msg[10:18]
	case len(msg) >= msgHeader:
		return msg[1:msgHeader]
	}
	return ""
}

func decodeInvalidation(p string) (m invalidation, err error) {
	m.logID, _, p = logged(p)
	if len(p) < msgHeader || p[0] != msgKeys && p[0] != msgValue && p[0] != msgNotFound {
		return m, errBadInvalidation
	}
	m.kind = p[0]
	m.origin = binary.BigEndian.Uint64([]byte(p[1:9]))
	m.version = binary.BigEndian.Uint64([]byte(p[9:17]))
	for rest := p[msgHeader:]; len(rest) > 0; {
		n, r, ok := uvarint(rest)
		if !ok || n > uint64(len(r)) {
			return m, errBadInvalidation
		}
		m.keys = append(m.keys, r[:n])
		rest = r[n:]
		if p[0] == msgValue {
			m.envelope = rest
			break
		}
	}
	if len(m.keys) == 0 || m.kind == msgValue && m.envelope == "" {
		return m, errBadInvalidation
	}
	return m, nil
}
