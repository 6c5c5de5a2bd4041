package tiered

import (
	"encoding/binary"
	"errors"
	"math"
)

// An L2 value is an envelope around the encoded value:
//
//	byte 0      format: envelopeV3 for values and not-founds, envelopeV2
//	            for leases (see below)
//	byte 1      kind: kindValue, kindNotFound, or a lease (kindLease,
//	            kindLeaseWaited) held by a load of the key
//	bytes 2-9   version, big-endian: assigned by Redis in the script that
//	            wrote it (see versionLua); zero in what the client sends
//	bytes 10-17 expiry, Unix milliseconds, big-endian: for a value, its
//	            logical expiry, after which it is no longer served as fresh
//	            (Redis keeps it Options.StaleIfError longer)
//	bytes 18-25 (format 3 only) the refresh lease: until when, in Redis'
//	            Unix milliseconds, a refresh holds the value (see
//	            refresh.go); zero if none. Written in place by a script.
//	bytes 18- or 26-
//	            payload: the codec's output; empty for kindNotFound; the
//	            holder's 16-byte token for a lease
//
// Carrying the expiry inside the value lets an instance that fills L1 from
// L2 cap the L1 entry at the L2 entry's remaining lifetime without a PTTL
// round trip; carrying the version lets L1 keep the newer of two values of
// a key (see local.settle), and tells a value's age: a version is Redis'
// clock when the value was written (in µs), or just above the version it
// replaced, which is later than that clock, so an age read from it is never
// too high (see refreshPoint). The format byte lets a later version change
// the layout, and makes most foreign values (written under our key by
// someone else) fail to parse instead of decoding into garbage. Format 1
// (no version) is read as a foreign value: a miss, replaced by the next
// load.
//
// Format 3 added the refresh lease and the grace period. Instances of this
// version read format 2 values as before (fresh until their expiry, never
// refreshed in place); an older instance reads a format 3 value as a foreign
// one: a miss, which it loads and overwrites with a format 2 value. That
// costs loads during a rolling upgrade, never a wrong value: an old instance
// would otherwise serve a value in its grace period as fresh. Leases keep
// format 2, so that old and new instances honour each other's leases.
const (
	envelopeV2       = 0x02
	envelopeV3       = 0x03
	envelopeHeaderV2 = 18
	envelopeHeader   = 26 // format 3
	versionAt        = 2  // offset of the version (versionLua reads it there)
	refreshLeaseAt   = 18 // offset of the refresh lease in format 3

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
// stamp: format 2 for a lease, format 3 otherwise.
func encodeEnvelope(kind byte, expiresUnixNano int64, payload []byte) []byte {
	format, header := byte(envelopeV3), envelopeHeader
	if kind == kindLease || kind == kindLeaseWaited {
		format, header = envelopeV2, envelopeHeaderV2
	}
	b := make([]byte, header+len(payload))
	b[0] = format
	b[1] = kind
	binary.BigEndian.PutUint64(b[10:], uint64(max(expiresUnixNano, 0)/1_000_000))
	copy(b[header:], payload)
	return b
}

// decodeEnvelope parses b, of format 2 or 3.
func decodeEnvelope(b []byte) (envelope, error) {
	header := 0
	switch {
	case len(b) >= envelopeHeader && b[0] == envelopeV3:
		header = envelopeHeader
	case len(b) >= envelopeHeaderV2 && b[0] == envelopeV2:
		header = envelopeHeaderV2
	default:
		return envelope{}, errCorrupt
	}
	e := envelope{kind: b[1], version: binary.BigEndian.Uint64(b[versionAt:]), payload: b[header:]}
	switch {
	case e.kind == kindValue:
	case e.kind == kindNotFound && len(e.payload) == 0:
	case e.isLease() && len(e.payload) == leaseTokenBytes && header == envelopeHeaderV2:
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
