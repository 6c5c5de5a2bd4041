package tiered

import (
	"context"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// On a Redis Cluster an invalidation reaches the subscription by one of
// several paths: a write's script publishes on the key's master, and Redis
// forwards the message over that master's cluster-bus link to the node that
// holds the subscription. Such a link can stall without any error (Redis
// drops it only after cluster-node-timeout/2, and what was queued on it is
// lost) while the subscription's own connection, which the PING proves, is
// fine. So every interval the subscriber also publishes a heartbeat through
// each master, on its private channel, naming the master and a sequence
// number, and tracks per master what comes back:
//
//   - A master's path is down when a heartbeat the master acknowledged has
//     not come back and none came back for 3 intervals: the rule of the
//     subscription's PING, so the 4 × interval bound holds for every path.
//     That is a gap (L1 bypassed), healed once a heartbeat published after
//     it comes back through that master (and the subscription itself is
//     healthy).
//   - A path is down too when a heartbeat comes back while one that the
//     master acknowledged before it never did. A master sends everything to
//     our node over one link, in order, so the earlier one was lost: the
//     link was reset (by the network, or by Redis when its send buffer
//     passed cluster-link-sendbuf-limit) with it queued, and with it every
//     invalidation queued before it. The master reconnects within 100 ms
//     and the next heartbeats come back, so the silence may never reach 3
//     intervals. (What a reset loses is only seen if a heartbeat was among
//     it: a link that stalls for an interval before its reset, as a dead
//     network path does.)
//   - A master seen for the first time counts from then as if it had just
//     echoed, so a master that never echoes is down after the same 3
//     intervals: a new master cannot hide a broken path.
//   - A heartbeat that a master does not acknowledge (it is hung, dead or
//     unreachable from here) proves nothing and is not held against it:
//     writes through it fail or wait too, so no invalidation of theirs is in
//     flight. Publishes go out concurrently, at most one per master, and the
//     loop never waits for them: a hung master costs one goroutine until the
//     client's ReadTimeout, not the other masters' heartbeats.
//   - A master that leaves the slot map is no longer tracked (its keys moved
//     to another master, whose path is tracked; the change of masters
//     flushes L1 anyway).
type masterPaths struct {
	// Guarded by subscriber.stateMu: a path's state decides gaps and heals.
	byAddr map[string]*masterPath
	// unknown is set on a Cluster until the first slot map is loaded: L1 is
	// not used before, because a change of masters that happened before
	// that load (a failover losing writes) would flush nothing.
	unknown bool
	down    int    // paths down
	seq     uint64 // last heartbeat sequence number sent
}

type masterPath struct {
	client  *redis.Client
	since   int64    // UnixNano of the last echo, or of when the master was first seen
	acked   uint64   // highest heartbeat the master acknowledged
	echoed  uint64   // highest heartbeat that came back
	pending []uint64 // while up: heartbeats acknowledged above echoed, in order
	down    bool
	healAt  uint64      // while down: an echo above this heals the path
	sending atomic.Bool // a publish is in flight
}

// masterHeartbeat is the payload of a heartbeat published through a master.
func masterHeartbeat(seq uint64, addr string) string {
	return strconv.FormatUint(seq, 10) + " " + addr
}

// watchCluster runs on a Redis Cluster, at once and then every interval:
//
//   - It reloads the client's slot map (one CLUSTER SLOTS) on a goroutine
//     of its own, one at a time, that Close does not wait for (a reload that
//     asks a hung node waits for the client's ReadTimeout), and compares
//     the cluster's masters with the last ones seen. A change (a failover) flushes L1: the promoted
//     replica may lack the last writes its master acknowledged (replication
//     is asynchronous), so values read before may not be what Redis now
//     holds, and a subscription on another node sees nothing of it. The
//     reload also points the client at the promoted replica at once: a dead
//     master refuses connections and sends no MOVED, so by itself go-redis
//     would keep dialing it until its ClusterStateReloadInterval (60 s by
//     default) runs out.
//   - It declares a gap for every master path that stopped echoing, and
//     publishes the next heartbeat through every master (see masterPaths).
func (s *subscriber) watchCluster(cc *redis.ClusterClient) {
	defer s.wg.Done()
	t := time.NewTicker(s.interval)
	defer t.Stop()
	var reloading atomic.Bool
	var last string
	for first := true; ; first = false {
		if !first {
			select {
			case <-t.C:
			case <-s.ctx.Done():
				return
			}
		}
		if reloading.CompareAndSwap(false, true) {
			// Not in s.wg, like the heartbeat publishes: Close must not
			// wait for a hung node's ReadTimeout.
			go func() {
				defer reloading.Store(false)
				last = s.reloadMasters(cc, last)
			}()
		}
		s.checkPaths()
		s.publishHeartbeats()
	}
}

// reloadMasters reloads cc's slot map, tracks its masters and, if they are
// not last (their sorted addresses), flushes L1. It returns the masters now.
func (s *subscriber) reloadMasters(cc *redis.ClusterClient, last string) string {
	var mu sync.Mutex
	masters := make(map[string]*redis.Client)
	ctx, cancel := context.WithTimeout(s.ctx, 3*s.interval)
	err := cc.ForEachMaster(ctx, func(_ context.Context, m *redis.Client) error {
		mu.Lock()
		masters[m.Options().Addr] = m
		mu.Unlock()
		return nil
	})
	cancel()
	if err != nil || len(masters) == 0 || s.ctx.Err() != nil {
		return last // or stopped meanwhile: nothing is left to do
	}
	s.trackMasters(masters)
	if masters[s.subscribedOn()] == nil {
		// Its node is no longer a master (or was never chosen): move the
		// subscription to the master of its private channel's slot, to keep
		// the fleet's subscriptions spread (see subscriber.subscribe). The
		// new subscription's confirmation is a gap, healed by its first
		// ping.
		s.rebuild()
	}
	cur := strings.Join(slices.Sorted(maps.Keys(masters)), " ")
	if last != "" && cur != last {
		s.log.Info("tiered: Redis Cluster masters changed; L1 flushed", "before", last, "now", cur)
		s.flush("cluster masters changed")
		s.mu.Lock()
		var members []member
		for _, cm := range s.channels {
			members = append(members, cm.members...)
		}
		s.mu.Unlock()
		for _, m := range members {
			if cm, ok := m.(clusterMember); ok {
				cm.clusterChanged()
			}
		}
	}
	return cur
}

// trackMasters makes masters the set of tracked paths.
func (s *subscriber) trackMasters(masters map[string]*redis.Client) {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	if s.paths.byAddr == nil {
		s.paths.byAddr = make(map[string]*masterPath)
	}
	s.paths.unknown = false
	for addr, p := range s.paths.byAddr {
		if masters[addr] == nil {
			if p.down {
				s.paths.down--
			}
			delete(s.paths.byAddr, addr)
		}
	}
	now := time.Now().UnixNano()
	for addr, c := range masters {
		if p := s.paths.byAddr[addr]; p != nil {
			p.client = c
		} else {
			s.paths.byAddr[addr] = &masterPath{client: c, since: now}
		}
	}
	s.closeGap()
}

// checkPaths declares a gap for every master path that is down: a
// heartbeat it acknowledged is missing and none came back for 3 intervals.
func (s *subscriber) checkPaths() {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	deadAfter := int64(3 * s.interval)
	now := time.Now().UnixNano()
	for addr, p := range s.paths.byAddr {
		if p.down || p.acked <= p.echoed || now-p.since <= deadAfter {
			continue
		}
		s.pathDown(addr, p, "heartbeat through a master unanswered")
	}
}

// pathDown declares the path from the master at addr down: a gap, healed
// by an echo of a heartbeat sent after now. stateMu must be held.
func (s *subscriber) pathDown(addr string, p *masterPath, reason string) {
	p.down, p.healAt, p.pending = true, s.paths.seq, nil
	s.paths.down++
	if s.open(reason, nil, "master", addr) {
		s.hbMisses.Add(1)
	}
}

// publishHeartbeats publishes the next heartbeat through every tracked
// master that has none in flight, without waiting for any.
func (s *subscriber) publishHeartbeats() {
	s.stateMu.Lock()
	s.paths.seq++
	seq := s.paths.seq
	type send struct {
		addr string
		p    *masterPath
		c    *redis.Client
	}
	sends := make([]send, 0, len(s.paths.byAddr))
	for addr, p := range s.paths.byAddr {
		if p.sending.CompareAndSwap(false, true) {
			sends = append(sends, send{addr, p, p.client})
		}
	}
	s.stateMu.Unlock()
	for _, x := range sends {
		// Not in s.wg: Close must not wait for a hung master's ReadTimeout
		// (go-redis ignores the deadline unless ContextTimeoutEnabled).
		go func() {
			defer x.p.sending.Store(false)
			ctx, cancel := context.WithTimeout(s.ctx, s.interval)
			defer cancel()
			if x.c.Publish(ctx, s.hbChannel, masterHeartbeat(seq, x.addr)).Err() != nil {
				return
			}
			s.stateMu.Lock()
			x.p.acked = max(x.p.acked, seq)
			// Publishes through one master run one at a time, so the
			// acknowledged heartbeats are appended in order.
			if !x.p.down && seq > x.p.echoed {
				x.p.pending = append(x.p.pending, seq)
			}
			s.stateMu.Unlock()
		}()
	}
}

// echoed records a heartbeat that came back through a master.
func (s *subscriber) echoed(payload string) {
	n, addr, ok := strings.Cut(payload, " ")
	seq, err := strconv.ParseUint(n, 10, 64)
	if !ok || err != nil {
		return
	}
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	p := s.paths.byAddr[addr]
	if p == nil {
		return
	}
	p.since = time.Now().UnixNano()
	p.echoed = max(p.echoed, seq)
	switch {
	case p.down && seq > p.healAt:
		p.down = false
		s.paths.down--
		s.closeGap()
	case !p.down:
		n := 0
		for n < len(p.pending) && p.pending[n] <= seq {
			n++
		}
		lost := n > 0 && p.pending[0] < seq
		p.pending = p.pending[n:]
		if lost {
			s.pathDown(addr, p, "heartbeat through a master lost")
		}
	}
}
