package tiered

import (
	"bytes"
	"encoding/binary"
	"math"
	"strings"
	"testing"
)

// The seed corpora under testdata/fuzz run as ordinary tests; to fuzz:
//
//	go test -run '^$' -fuzz FuzzDecodeEnvelope -fuzztime 60s .
//	go test -run '^$' -fuzz FuzzDecodeInvalidation -fuzztime 60s .
//	go test -run '^$' -fuzz FuzzDecodeMessage -fuzztime 60s .

// decodeEnvelope reads what Redis holds under our keys, which anyone with
// access to Redis can write: it must never panic, and what it accepts must
// be exactly what encodeEnvelope (plus the version a script stamps) writes.
func FuzzDecodeEnvelope(f *testing.F) {
	f.Add(encodeEnvelope(kindValue, 1_700_000_000_000_000_000, []byte(`{"ID":"42"}`)))
	f.Add(encodeEnvelope(kindNotFound, 1_700_000_000_000_000_000, nil))
	f.Add(encodeEnvelope(kindLease, 1_700_000_000_000_000_000, make([]byte, leaseTokenBytes)))
	f.Add(encodeEnvelopeV2(kindValue, 1_700_000_000_000_000_000, []byte(`{"ID":"42"}`)))
	f.Add(encodeEnvelopeV2(kindNotFound, 1_700_000_000_000_000_000, nil))
	held := encodeEnvelope(kindValue, 1_700_000_000_000_000_000, []byte("v"))
	binary.BigEndian.PutUint64(held[refreshLeaseAt:], 1_700_000_000_000) // under a refresh lease
	f.Add(held)
	f.Add(append([]byte{envelopeV3, kindLease}, make([]byte, 24+leaseTokenBytes)...)) // leases are format 2 only
	f.Fuzz(func(t *testing.T, b []byte) {
		orig := bytes.Clone(b)
		e, err := decodeEnvelope(b)
		if !bytes.Equal(b, orig) {
			t.Fatalf("decodeEnvelope modified its input")
		}
		if err != nil {
			return
		}
		switch {
		case e.kind == kindValue:
		case e.kind == kindNotFound && len(e.payload) == 0:
		case e.isLease() && len(e.payload) == leaseTokenBytes:
		default:
			t.Fatalf("accepted kind %#x with a payload of %d bytes", e.kind, len(e.payload))
		}
		if e.expires < 0 {
			t.Fatalf("negative expiry %d", e.expires)
		}
		re := encodeEnvelope(e.kind, e.expires, e.payload)
		switch {
		case b[0] == envelopeV2 && !e.isLease():
			re = encodeEnvelopeV2(e.kind, e.expires, e.payload) // read, never written any more
		case b[0] == envelopeV3:
			copy(re[refreshLeaseAt:envelopeHeader], b[refreshLeaseAt:envelopeHeader]) // set by a script
		}
		binary.BigEndian.PutUint64(re[versionAt:], e.version)
		if ms := binary.BigEndian.Uint64(b[10:]); ms > math.MaxInt64/1_000_000 {
			// A saturated expiry ("never") does not re-encode as read.
			if e.expires != math.MaxInt64 {
				t.Fatalf("expiry %d ms read as %d ns, want saturation", ms, e.expires)
			}
			copy(re[10:18], b[10:18])
		}
		if !bytes.Equal(re, b) {
			t.Fatalf("re-encoding does not round-trip:\n in  %x\n out %x", b, re)
		}
	})
}

// decodeInvalidation reads every message on our channel, which anyone can
// publish to: it must never panic, and what it accepts must be exactly what
// the scripts publish (messageHead, version, encodeKeys, and for msgValue
// the new envelope).
func FuzzDecodeInvalidation(f *testing.F) {
	head := func(kind byte) []byte { return binary.BigEndian.AppendUint64(messageHead(kind, 1), 2) }
	f.Add(string(append(head(msgKeys), encodeKeys("a", "bc")...)))
	f.Add(string(append(append(head(msgValue), encodeKeys("a")...), encodeEnvelope(kindValue, 3_000_000, []byte("v"))...)))
	withID := append(head(msgKeys-msgLogged), 3)
	f.Add(string(append(append(withID, "1-0"...), encodeKeys("a")...)))
	f.Fuzz(func(t *testing.T, p string) {
		m, err := decodeInvalidation(p)
		if err != nil {
			return
		}
		if len(m.keys) == 0 {
			t.Fatal("accepted a message naming no key")
		}
		switch m.kind {
		case msgValue:
			if len(m.keys) != 1 || m.envelope == "" {
				t.Fatalf("msgValue with %d keys and an envelope of %d bytes", len(m.keys), len(m.envelope))
			}
		case msgKeys, msgNotFound:
			if m.envelope != "" {
				t.Fatalf("kind %q with an envelope", m.kind)
			}
		default:
			t.Fatalf("accepted kind %#x", m.kind)
		}
		kind := m.kind
		if m.logID != "" {
			kind -= msgLogged
		}
		re := binary.BigEndian.AppendUint64(messageHead(kind, m.origin), m.version)
		if m.logID != "" {
			re = append(append(re, byte(len(m.logID))), m.logID...)
			if id, identity, _ := logged(p); id != m.logID || identity != p[1:msgHeader] {
				t.Fatalf("logged(%x) = %q, %x; want %q and the origin and version", p, id, identity, m.logID)
			}
		}
		re = append(re, encodeKeys(m.keys...)...)
		re = append(re, m.envelope...)
		if string(re) != p {
			t.Fatalf("re-encoding does not round-trip:\n in  %x\n out %x", p, re)
		}
	})
}

// decodeMessage reads every message, batches (msgBatch) included: it must
// never panic, and what it accepts must be exactly what the scripts
// publish (for a batch, batchScript's entries in order).
func FuzzDecodeMessage(f *testing.F) {
	env := string(encodeEnvelope(kindValue, 3_000_000, []byte("v")))
	f.Add(msgBatchOf(1, invalidation{kind: msgKeys, version: 2, keys: []string{"a", "bc"}},
		invalidation{kind: msgValue, version: 3, keys: []string{"a"}, envelope: env}))
	f.Add(msgBatchOf(1, invalidation{kind: msgKeys, version: 2, keys: []string{""}}))
	f.Add(string(append(binary.BigEndian.AppendUint64(messageHead(msgKeys, 1), 2), encodeKeys("a")...)))
	b := msgBatchOf(1, invalidation{kind: msgKeys, version: 2, keys: []string{"a"}})
	f.Add("B" + b[1:9] + "\x031-0" + b[9:])
	f.Add("B" + b[1:9] + "\xc8" + strings.Repeat("9", 200) + b[9:]) // an ID length above 127 is one byte
	f.Fuzz(func(t *testing.T, p string) {
		ms, err := decodeMessage(p)
		if err != nil {
			return
		}
		if len(ms) == 0 {
			t.Fatal("accepted a message of no invalidation")
		}
		if p[0] != msgBatch && p[0] != msgBatch-msgLogged {
			if len(ms) != 1 {
				t.Fatalf("a single message decoded as %d", len(ms))
			}
			return // FuzzDecodeInvalidation checks it
		}
		for _, m := range ms {
			switch {
			case len(m.keys) == 0:
				t.Fatal("accepted an entry naming no key")
			case m.kind == msgValue && (len(m.keys) != 1 || m.envelope == ""):
				t.Fatalf("value entry with %d keys and an envelope of %d bytes", len(m.keys), len(m.envelope))
			case m.kind == msgKeys && m.envelope != "":
				t.Fatal("keys entry with an envelope")
			case m.kind != msgKeys && m.kind != msgValue:
				t.Fatalf("accepted entry kind %#x", m.kind)
			case m.origin != ms[0].origin:
				t.Fatal("entries of one message with different origins")
			}
		}
		re := msgBatchOf(ms[0].origin, ms...)
		if id, identity, _ := logged(p); id != "" {
			if identity != ident(re) {
				t.Fatalf("logged(%x) gives identity %x; want %x", p, identity, ident(re))
			}
			re = "B" + re[1:9] + string([]byte{byte(len(id))}) + id + re[9:]
		}
		if re != p {
			t.Fatalf("re-encoding does not round-trip:\n in  %x\n out %x", p, re)
		}
	})
}

// encodeEnvelopeV2 is encodeEnvelope of format 2 for values, as instances
// before format 3 wrote them.
func encodeEnvelopeV2(kind byte, expiresUnixNano int64, payload []byte) []byte {
	b := make([]byte, envelopeHeaderV2+len(payload))
	b[0], b[1] = envelopeV2, kind
	binary.BigEndian.PutUint64(b[10:], uint64(max(expiresUnixNano, 0)/1_000_000))
	copy(b[envelopeHeaderV2:], payload)
	return b
}
