package pqkex

import (
	"bytes"
	"encoding/binary"
	"io"
	"net/http"
	"reflect"
	"testing"
	"time"
)

// Fuzz targets for every parser of untrusted bytes, seeded from testdata/kat.json. Each
// checks that parsing never panics and that whatever parses re-encodes to the same bytes
// (no malleability).

func seedFuzz(f *testing.F, pick func(katVector) []byte) {
	f.Helper()
	for _, v := range loadKAT(f) {
		f.Add(pick(v))
	}
}

func FuzzParseCredential(f *testing.F) {
	seedFuzz(f, func(v katVector) []byte { return v.ServerCredential })
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseCredential(b)
		if err != nil {
			return
		}
		tbs := marshalTBS(c.suite, c.spiffeID, c.notBefore, c.notAfter, c.publicKey)
		out := appendVec16(appendVec16(tbs, c.pqSig), c.classicalSig)
		if !bytes.Equal(out, b) {
			t.Fatalf("credential does not re-encode to its input")
		}
		_ = Roots{}.Verify(c, time.Unix(0, 0))
	})
}

func FuzzParseClientHello(f *testing.F) {
	seedFuzz(f, func(v katVector) []byte { return v.ClientHello })
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseClientHello(b)
		if err != nil {
			return
		}
		if !bytes.Equal(m.marshal(), b) {
			t.Fatal("client hello does not re-encode to its input")
		}
	})
}

// FuzzParseServerHello: the first byte picks the suite, the second the ClientHello flags.
func FuzzParseServerHello(f *testing.F) {
	seedFuzz(f, func(v katVector) []byte {
		return append([]byte{byte(SchemeByName(v.Suite).ID()), helloFlags(v)}, v.ServerHello...)
	})
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < 8 || !validFlags(b[1]) { // the AEAD the client chose is taken from the hello itself
			return
		}
		suite := SchemeByID(uint16(b[0]))
		if suite == nil {
			return
		}
		m, err := parseServerHello(b[2:], suite, AEAD(binary.BigEndian.Uint16(b[6:])), b[1])
		if err != nil {
			return
		}
		if !bytes.Equal(m.marshal(), b[2:]) {
			t.Fatal("server hello does not re-encode to its input")
		}
	})
}

func FuzzParseTicketState(f *testing.F) {
	seedFuzz(f, func(v katVector) []byte { return v.TicketPlaintext })
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := parseTicketState(b)
		if err != nil {
			return
		}
		if !bytes.Equal(s.marshal(), b) {
			t.Fatal("ticket plaintext does not re-encode to its input")
		}
	})
}

// FuzzOpenTicket feeds sealed tickets (as they arrive in headers) to a key set.
func FuzzOpenTicket(f *testing.F) {
	keys, err := NewTicketKeys(TicketKey{ID: 1})
	if err != nil {
		f.Fatal(err)
	}
	for _, v := range loadKAT(f) {
		tk, err := keys.seal(bytes.NewReader(make([]byte, ticketSaltSize)), katServerID, v.TicketPlaintext, time.Unix(0, 0))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(tk)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := keys.openTicket(b, katServerID, time.Unix(0, 0))
		if err == nil && s.suite == nil {
			t.Fatal("ticket opened without a suite")
		}
	})
}

// FuzzOpenFrames feeds sealed response bodies (server nonce, then frames) to an opener keyed
// like the first vector's call.
func FuzzOpenFrames(f *testing.F) {
	vs := loadKAT(f)
	for _, v := range vs {
		f.Add([]byte(v.ResponseBody))
		f.Add([]byte(v.ResponseBody[:serverNonceSize-1])) // cut inside the server nonce
	}
	v := vs[0]
	f.Fuzz(func(t *testing.T, b []byte) {
		pt, _, err := openBody(v, dirS2C, b)
		if err == nil && !bytes.HasPrefix(b, v.ResponseBody) {
			t.Fatalf("forged body opened to %q", pt)
		}
		// Read whole and opened in place (bodies of known length): the same verdicts.
		pt2, _, err2 := openBodyWhole(v, dirS2C, append([]byte(nil), b...))
		if (err == nil) != (err2 == nil) || !bytes.Equal(pt, pt2) {
			t.Fatalf("read whole: %q %v, read by frame: %q %v", pt2, err2, pt, err)
		}
	})
}

// FuzzOpenRequest feeds sealed request bodies (call ID, head frame, frames) to an opener
// keyed like the first vector's call, as the server opens them.
func FuzzOpenRequest(f *testing.F) {
	vs := loadKAT(f)
	for _, v := range vs {
		f.Add([]byte(v.RequestBody))
	}
	v := vs[0]
	f.Fuzz(func(t *testing.T, b []byte) {
		pt, _, err := openBody(v, dirC2S, b)
		if err == nil && !bytes.HasPrefix(b, v.RequestBody) {
			t.Fatalf("forged request opened to %q", pt)
		}
		pt2, _, err2 := openBodyWhole(v, dirC2S, append([]byte(nil), b...))
		if (err == nil) != (err2 == nil) || !bytes.Equal(pt, pt2) {
			t.Fatalf("read whole: %q %v, read by frame: %q %v", pt2, err2, pt, err)
		}
	})
}

// FuzzFieldBlock decodes arbitrary field blocks (heads and FINAL blocks, spec 6.3) in each
// role: a block that decodes re-encodes to one that decodes to the same fields.
func FuzzFieldBlock(f *testing.F) {
	f.Add(byte(requestHead), (&fieldBlock{method: "POST", path: "/a.B/C", attempt: katAttempt(1), headers: http.Header{"Content-Type": {"x"}, "X-A": {"1", "2"}}}).encode(nil))
	f.Add(byte(responseHead), (&fieldBlock{status: 200, headers: http.Header{"Content-Type": {"x"}}}).encode(nil))
	f.Add(byte(responseFinal), (&fieldBlock{trailers: http.Header{"Grpc-Status": {"0"}, "Grpc-Message": {"a", "b"}}}).encode(nil))
	f.Add(byte(requestFinal), []byte{0, 0})
	f.Fuzz(func(t *testing.T, role byte, b []byte) {
		blk, err := decodeFieldBlock(b, blockRole(role%4))
		if err != nil {
			return
		}
		again, err := decodeFieldBlock(blk.encode(nil), blockRole(role%4))
		if err != nil || !reflect.DeepEqual(blk, again) {
			t.Fatalf("field block does not round-trip: %v", err)
		}
	})
}

// FuzzServerHandshake runs the server's handshake on arbitrary bodies: it must fail cleanly.
func FuzzServerHandshake(f *testing.F) {
	vs := loadKAT(f)
	for _, v := range vs {
		f.Add([]byte(v.ClientHello))
	}
	s := katServer(f, vs[0])
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := http.NewRequest(http.MethodPost, HandshakePath, io.NopCloser(bytes.NewReader(b)))
		if err != nil {
			t.Fatal(err)
		}
		out, err := s.handshake(r)
		if err == nil && len(out) == 0 {
			t.Fatal("handshake succeeded without a server hello")
		}
	})
}
