package main

// item is a row of the simulated database, and what the caches hold.
type item struct {
	Key     string `json:"key"`
	Version uint64 `json:"version"`
	Payload string `json:"payload"`
}
