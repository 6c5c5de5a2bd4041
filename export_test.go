package tiered

// QueuedWrites returns how many writes of c wait in its write queues (for
// the black-box tests in package tiered_test, which must know that a write
// waits behind a batch on the wire before releasing it).
func QueuedWrites[V any](c *Cache[V]) int {
	n := 0
	count := func(q *writeQueue) {
		q.mu.Lock()
		n += len(q.pending)
		q.mu.Unlock()
	}
	count(&c.remote.queue)
	c.remote.queues.Range(func(_, q any) bool {
		count(q.(*writeQueue))
		return true
	})
	return n
}
