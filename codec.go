package tiered

import (
	"encoding/json"
	"fmt"
)

// Codec turns values into bytes for Redis and back. It must be safe for
// concurrent use. Values of type string and []byte never reach the Codec:
// they are stored as they are.
//
// Every tier of every instance returns a value as the Codec reads it back:
// Set and loads keep in L1 (and GetOrLoad returns) the decoded encoding of
// the value, not the value itself, so that fields the Codec drops, a
// time.Time's monotonic reading or a []byte the caller reuses cannot make
// the instance that wrote a value see another one than the rest of the
// fleet. That costs one decode per Set and per load. A Codec that panics
// is treated like one that returns an error. Unmarshal must not modify
// data: it may be the memory of Redis' reply, shared, not a copy.
type Codec interface {
	Marshal(v any) ([]byte, error)
	Unmarshal(data []byte, v any) error
}

// JSONCodec is the default Codec: encoding/json.
type JSONCodec struct{}

// Marshal implements Codec.
func (JSONCodec) Marshal(v any) ([]byte, error) { return json.Marshal(v) }

// Unmarshal implements Codec.
func (JSONCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }

// valueCodec encodes values of type V, passing string and []byte through.
type valueCodec[V any] struct {
	codec Codec
}

// encode returns v's encoding. For V = []byte it is v itself.
func (c valueCodec[V]) encode(v V) (b []byte, err error) {
	// Switch on V, not on v's dynamic type: with V = any, a string value
	// must go through the codec, since decode (into *any) will use it.
	switch any((*V)(nil)).(type) {
	case *string:
		return []byte(any(v).(string)), nil
	case *[]byte:
		return any(v).([]byte), nil
	}
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: codec panicked: %v", ErrEncode, p)
		}
	}()
	b, err = c.codec.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrEncode, err)
	}
	return b, nil
}

// decode decodes b, which it may not keep (it aliases a reply buffer).
func (c valueCodec[V]) decode(b []byte) (v V, err error) {
	switch p := any(&v).(type) {
	case *string:
		*p = string(b)
	case *[]byte:
		*p = append([]byte(nil), b...)
	default:
		defer func() {
			if p := recover(); p != nil {
				var zero V
				v, err = zero, fmt.Errorf("tiered: codec panicked decoding: %v", p)
			}
		}()
		if err := c.codec.Unmarshal(b, &v); err != nil {
			return v, err
		}
	}
	return v, nil
}

// roundTrip returns v's encoding and v as decoded from it: what every
// other reader of the encoding gets. A string is immutable and needs no
// decoding.
func (c valueCodec[V]) roundTrip(v V) ([]byte, V, error) {
	b, err := c.encode(v)
	if err != nil {
		return nil, v, err
	}
	if isType[V, string]() {
		return b, v, nil
	}
	d, err := c.decode(b)
	if err != nil {
		return nil, v, fmt.Errorf("%w: the codec cannot read its own encoding back: %w", ErrEncode, err)
	}
	return b, d, nil
}

// isType reports whether V is T (not merely holding one, as V = any can).
func isType[V, T any]() bool {
	_, ok := any((*V)(nil)).(*T)
	return ok
}
