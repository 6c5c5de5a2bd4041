package tiered

import (
	"encoding/binary"
	"errors"
)

// An L2 value is an envelope around the encoded value:
//
//	byte 0     format version (envelopeV1)
//	byte 1     kind: kindValue or kindNotFound
//	bytes 2-9  expiry, Unix milliseconds, big-endian
//	bytes 10-  payload (the codec's output; empty for kindNotFound)
//
// Carrying the expiry inside the value lets an instance that fills L1 from
// L2 cap the L1 entry at the L2 entry's remaining lifetime without a PTTL
// round trip. The format byte lets a later version change the layout, and
// makes most foreign values (written under our key by someone else) fail to
// parse instead of decoding into garbage.
const (
	envelopeV1     = 0x01
	envelopeHeader = 10

	kindValue    = 0x00
	kindNotFound = 0x01
)

var errCorrupt = errors.New("tiered: value in redis is not a tiered envelope")

func encodeEnvelope(kind byte, expiresUnixNano int64, payload []byte) []byte {
	b := make([]byte, envelopeHeader+len(payload))
	b[0] = envelopeV1
	b[1] = kind
	binary.BigEndian.PutUint64(b[2:], uint64(expiresUnixNano/1_000_000))
	copy(b[envelopeHeader:], payload)
	return b
}

// decodeEnvelope parses b. payload aliases b.
func decodeEnvelope(b []byte) (kind byte, expiresUnixNano int64, payload []byte, err error) {
	if len(b) < envelopeHeader || b[0] != envelopeV1 {
		return 0, 0, nil, errCorrupt
	}
	kind = b[1]
	if kind != kindValue && (kind != kindNotFound || len(b) != envelopeHeader) {
		return 0, 0, nil, errCorrupt
	}
	ms := binary.BigEndian.Uint64(b[2:])
	if ms > 1<<62/1_000_000 {
		return 0, 0, nil, errCorrupt
	}
	return kind, int64(ms) * 1_000_000, b[envelopeHeader:], nil
}
