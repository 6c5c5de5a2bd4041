package main

import (
	"encoding/json"
	"time"
)

// item is a row of the simulated database, and what the caches hold. The
// unexported fields are not encoded: each copy records where and when it
// was made, which tells which tier answered a read.
type item struct {
	Key     string `json:"key"`
	Version uint64 `json:"version"`
	Payload string `json:"payload"`

	src    source
	madeAt time.Duration // since the run started
}

type source int

const (
	fromWriter source = iota // the value a Set stored
	fromRedis                // decoded from Redis (an L2 read)
	fromLoader               // returned by the loader
)

// stampCodec is JSON that marks every value decoded from Redis, so that a
// read that got it can tell it came from L2.
type stampCodec struct {
	since func() time.Duration
}

func (stampCodec) Marshal(v any) ([]byte, error) { return json.Marshal(v) }

func (c stampCodec) Unmarshal(data []byte, v any) error {
	if err := json.Unmarshal(data, v); err != nil {
		return err
	}
	if p, ok := v.(**item); ok && *p != nil {
		(*p).src, (*p).madeAt = fromRedis, c.since()
	}
	return nil
}
