package tiered

import (
	"encoding/json"
	"fmt"
)

// Codec turns values into bytes for Redis and back. It must be safe for
// concurrent use. Values of type string and []byte never reach the Codec:
// they are stored as they are.
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

func (c valueCodec[V]) encode(v V) ([]byte, error) {
	// Switch on V, not on v's dynamic type: with V = any, a string value
	// must go through the codec, since decode (into *any) will use it.
	switch any((*V)(nil)).(type) {
	case *string:
		return []byte(any(v).(string)), nil
	case *[]byte:
		return any(v).([]byte), nil
	}
	b, err := c.codec.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrEncode, err)
	}
	return b, nil
}

// decode decodes b, which it may not keep (it aliases a reply buffer).
func (c valueCodec[V]) decode(b []byte) (V, error) {
	var v V
	switch p := any(&v).(type) {
	case *string:
		*p = string(b)
	case *[]byte:
		*p = append([]byte(nil), b...)
	default:
		if err := c.codec.Unmarshal(b, &v); err != nil {
			return v, err
		}
	}
	return v, nil
}
