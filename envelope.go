package tiered

import (
	"encoding/binary"
	"errors"
	"math"
)

// An L2 value is an envelope around the encoded value:
//
//	byte 0      format (envelopeV2)
//	byte 1      kind: kindValue, kindNotFound, or a lease (kindLease,
//	            kindLeaseWaited) held by a load of the key
//	bytes 2-9   version, big-endian: assigned by Redis in the script that
//	            wrote it (see versionLua); zero in what the client sends
//	bytes 10-17 expiry, Unix milliseconds, big-endian
//	bytes 18-   payload: the codec's output; empty for kindNotFound; the
//	            holder's 16-byte token for a lease
//
// Carrying the expiry inside the value lets an instance that fills L1 from
// L2 cap the L1 entry at the L2 entry's remaining lifetime without a PTTL
// round trip; carrying the version lets L1 keep the newer of two values of
// a key (see local.settle). The format byte lets a later version change the
// layout, and makes most foreign values (written under our key by someone
// else) fail to parse instead of decoding into garbage. Format 1 (no
// version) is read as a foreign value: a miss, replaced by the next load.
const (
	envelopeV2     = 0x02
	envelopeHeader = 18
	versionAt      = 2 // offset of the version (versionLua reads it there)

	kindValue       = 0x00
	kindNotFound    = 0x01
	kindLease       = 0x02 // a load holds the key (see leases.go)
	kindLeaseWaited = 0x03 // and another instance waits for its value

	leaseTokenBytes = 16
)

var errCorrupt = errors.New("tiered: value in redis is not a tiered envelope")

// envelope is a decoded L2 value. payload aliases the bytes it was decoded
// from.
type envelope struct {
	kind    byte
	version uint64
	expires int64 // UnixNano, saturated
	payload []byte
}

// encodeEnvelope returns an envelope with version zero, for a script to
// stamp.
func encodeEnvelope(kind byte, expiresUnixNano int64, payload []byte) []byte {
	b := make([]byte, envelopeHeader+len(payload))
	b[0] = envelopeV2
	b[1] = kind
	binary.BigEndian.PutUint64(b[10:], uint64(max(expiresUnixNano, 0)/1_000_000))
	copy(b[envelopeHeader:], payload)
	return b
}

// decodeEnvelope parses b.
func decodeEnvelope(b []byte) (envelope, error) {
	if len(b) < envelopeHeader || b[0] != envelopeV2 {
		return envelope{}, errCorrupt
	}
	e := envelope{kind: b[1], version: binary.BigEndian.Uint64(b[versionAt:]), payload: b[envelopeHeader:]}
	switch {
	case e.kind == kindValue:
	case e.kind == kindNotFound && len(e.payload) == 0:
	case e.isLease() && len(e.payload) == leaseTokenBytes:
	default:
		return envelope{}, errCorrupt
	}
	ms := binary.BigEndian.Uint64(b[10:])
	if ms > math.MaxInt64/1_000_000 {
		e.expires = math.MaxInt64 // later than any clock reading
	} else {
		e.expires = int64(ms) * 1_000_000
	}
	return e, nil
}

func (e envelope) isLease() bool { return e.kind == kindLease || e.kind == kindLeaseWaited }

// addSat returns t+d, saturated at math.MaxInt64, for expiries: a TTL of
// a hundred years must mean "practically never", not wrap into the past.
func addSat(t int64, d int64) int64 {
	if d > 0 && t > math.MaxInt64-d {
		return math.MaxInt64
	}
	return t + d
}
