package tiered

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// tcpProxy is an in-test TCP proxy in front of a Redis server. It can stall
// connections (hold their traffic in both directions without closing them,
// like a dead NAT entry or a partitioned link) and kill them. It tells
// pub/sub connections apart from command connections by watching for a
// SUBSCRIBE command in what the client sends, so a test can stall or kill
// just the invalidation subscription while ordinary commands still flow.
// While flapping, it closes every pub/sub connection right after it passed
// on the server's confirmation of its subscription: a subscription that
// dies as soon as it is made (an output-buffer limit hit at once, a
// middlebox that drops pub/sub clients).
type tcpProxy struct {
	Addr     string
	upstream string
	ln       net.Listener

	flapping    atomic.Bool
	subscribers atomic.Int64 // connections that became pub/sub ones

	mu     sync.Mutex
	cond   *sync.Cond // signalled when stalled, closed or a connection changes
	conns  map[*proxyConn]struct{}
	stall  func(*proxyConn) bool // which connections are held; nil: none
	closed bool
	wg     sync.WaitGroup
}

type proxyConn struct {
	client, server net.Conn
	subscriber     bool   // has sent a (P|S)SUBSCRIBE; guarded by tcpProxy.mu
	dead           bool   // guarded by tcpProxy.mu
	head           []byte // the first bytes the client sent (up to 128); guarded by tcpProxy.mu
}

// startProxy listens on a free loopback port and forwards every connection
// to upstream. It is closed at cleanup.
func startProxy(t testing.TB, upstream string) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tcpProxy{Addr: ln.Addr().String(), upstream: upstream, ln: ln,
		conns: make(map[*proxyConn]struct{})}
	p.cond = sync.NewCond(&p.mu)
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

func isSubscriber(c *proxyConn) bool { return c.subscriber }

func anyConn(*proxyConn) bool { return true }

// StallSubscribers holds all traffic, both ways, of every pub/sub
// connection, present or future (a new connection is held from its first
// SUBSCRIBE on), until Resume. Command connections are not affected.
func (p *tcpProxy) StallSubscribers() { p.setStall(isSubscriber) }

// StallAll holds all traffic of every connection, present or future.
func (p *tcpProxy) StallAll() { p.setStall(anyConn) }

// KeepOnlyCurrentStalled keeps holding the connections held now, forever
// (until Resume), and lets every other connection, present or future,
// through: a link that died silently while the network recovered.
func (p *tcpProxy) KeepOnlyCurrentStalled() {
	p.mu.Lock()
	held := make(map[*proxyConn]bool)
	for c := range p.conns {
		if p.stall != nil && p.stall(c) {
			held[c] = true
		}
	}
	p.stall = func(c *proxyConn) bool { return held[c] }
	p.mu.Unlock()
	p.cond.Broadcast()
}

// Resume lets held traffic through again.
func (p *tcpProxy) Resume() { p.setStall(nil) }

func (p *tcpProxy) setStall(f func(*proxyConn) bool) {
	p.mu.Lock()
	p.stall = f
	p.mu.Unlock()
	p.cond.Broadcast()
}

// KillSubscribers closes every pub/sub connection, as CLIENT KILL TYPE
// pubsub does on a real server, and returns how many it closed.
func (p *tcpProxy) KillSubscribers() int {
	p.mu.Lock()
	var victims []*proxyConn
	for c := range p.conns {
		if c.subscriber && !c.dead {
			c.dead = true
			victims = append(victims, c)
		}
	}
	p.mu.Unlock()
	p.cond.Broadcast()
	for _, c := range victims {
		_ = c.client.Close()
		_ = c.server.Close()
	}
	return len(victims)
}

// Close stops the proxy and closes every connection.
func (p *tcpProxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	conns := make([]*proxyConn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	p.cond.Broadcast()
	_ = p.ln.Close()
	for _, c := range conns {
		_ = c.client.Close()
		_ = c.server.Close()
	}
	p.wg.Wait()
}

func (p *tcpProxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		server, err := net.Dial("tcp", p.upstream)
		if err != nil {
			_ = client.Close()
			continue
		}
		c := &proxyConn{client: client, server: server}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			_ = client.Close()
			_ = server.Close()
			return
		}
		p.conns[c] = struct{}{}
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pump(c, client, server, true)
		go p.pump(c, server, client, false)
	}
}

// subscribeCmds are the command names, as RESP bulk strings, that turn a
// connection into a pub/sub one.
var subscribeCmds = [][]byte{[]byte("\r\nsubscribe\r\n"), []byte("\r\npsubscribe\r\n"), []byte("\r\nssubscribe\r\n")}

func sendsSubscribe(b []byte) bool {
	b = bytes.ToLower(b)
	for _, cmd := range subscribeCmds {
		if bytes.Contains(b, cmd) {
			return true
		}
	}
	return false
}

// pump copies src to dst, holding each chunk while c is stalled.
func (p *tcpProxy) pump(c *proxyConn, src, dst net.Conn, fromClient bool) {
	defer p.wg.Done()
	defer func() {
		p.mu.Lock()
		c.dead = true
		delete(p.conns, c)
		p.mu.Unlock()
		_ = c.client.Close()
		_ = c.server.Close()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if fromClient {
				p.mu.Lock()
				if !c.subscriber && sendsSubscribe(buf[:n]) {
					c.subscriber = true
					p.subscribers.Add(1)
				}
				if len(c.head) < 128 {
					c.head = append(c.head, buf[:min(n, 128-len(c.head))]...)
				}
				p.mu.Unlock()
			}
			if !p.hold(c) {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
			if !fromClient && p.flapping.Load() && p.subscribed(c) && bytes.Contains(buf[:n], []byte("subscribe\r\n")) {
				return // confirmed; now die
			}
		}
		if err != nil {
			return // EOF, reset or closed: the deferred close tells the other side
		}
	}
}

func (p *tcpProxy) subscribed(c *proxyConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return c.subscriber
}

// hold blocks while c is stalled. It reports whether c may still be used.
func (p *tcpProxy) hold(c *proxyConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for !p.closed && !c.dead && p.stall != nil && p.stall(c) {
		p.cond.Wait()
	}
	return !p.closed && !c.dead
}
