//go:build race

package tiered

// raceEnabled: the race detector makes sync.Pool drop items at random, so
// code on ristretto's read path allocates; allocation counts mean nothing.
const raceEnabled = true
