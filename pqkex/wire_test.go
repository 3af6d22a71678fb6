package pqkex

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"
)

// encodings returns every encoding of a vector with the function that parses it.
func encodings(v katVector) map[string]struct {
	b     []byte
	parse func([]byte) error
} {
	suite := SchemeByName(v.Suite)
	return map[string]struct {
		b     []byte
		parse func([]byte) error
	}{
		"server credential": {v.ServerCredential, func(b []byte) error { _, err := ParseCredential(b); return err }},
		"client credential": {v.ClientCredential, func(b []byte) error { _, err := ParseCredential(b); return err }},
		"client hello":      {v.ClientHello, func(b []byte) error { _, err := parseClientHello(b); return err }},
		"server hello": {v.ServerHello, func(b []byte) error {
			_, err := parseServerHello(b, suite, aeadByName(v.AEAD), helloFlags(v))
			return err
		}},
		"ticket plaintext": {v.TicketPlaintext, func(b []byte) error { _, err := parseTicketState(b); return err }},
		"request body":     {v.RequestBody, func(b []byte) error { _, _, err := openBody(v, dirC2S, b); return err }},
		"response body":    {v.ResponseBody, func(b []byte) error { _, _, err := openBody(v, dirS2C, b); return err }},
		// Bodies of known length are read whole and opened in place (opener.preread).
		"request body, read whole":  {v.RequestBody, func(b []byte) error { _, _, err := openBodyWhole(v, dirC2S, b); return err }},
		"response body, read whole": {v.ResponseBody, func(b []byte) error { _, _, err := openBodyWhole(v, dirS2C, b); return err }},
		"request head": {(&fieldBlock{method: "POST", path: "/p?q", attempt: katAttempt(1), headers: http.Header{"A": {"1", "2"}, "Content-Type": {"x"}}}).encode(nil),
			func(b []byte) error { _, err := decodeFieldBlock(b, requestHead); return err }},
		"response head": {(&fieldBlock{status: 200, headers: http.Header{"A": {"1"}}}).encode(nil),
			func(b []byte) error { _, err := decodeFieldBlock(b, responseHead); return err }},
		"response final block": {(&fieldBlock{trailers: http.Header{"Grpc-Status": {"0"}}}).encode(nil),
			func(b []byte) error { _, err := decodeFieldBlock(b, responseFinal); return err }},
	}
}

// openBody opens a sealed body of vector v and returns its plaintext, and its head and
// trailers in the side.
func openBody(v katVector, dir string, b []byte) ([]byte, *trailerSide, error) {
	return openBodyMode(v, dir, b, false)
}

// openBodyWhole is openBody for a body read whole first, as one of known length is.
func openBodyWhole(v katVector, dir string, b []byte) ([]byte, *trailerSide, error) {
	return openBodyMode(v, dir, b, true)
}

func openBodyMode(v katVector, dir string, b []byte, whole bool) ([]byte, *trailerSide, error) {
	suite := SchemeByName(v.Suite)
	o := &opener{r: bytes.NewReader(b)}
	if dir == dirS2C {
		// A response body starts with the server nonce, which selects the s2c keys: derived
		// from the session as a client does, not taken from the vector's s2c_secret.
		h := suite.Hash()
		keys, err := newCallKeys(h, aeadByName(v.AEAD), callRoot(h, v.Session, katServerID, katServerHash(v)), v.CallID, v.Procedure)
		if err != nil {
			return nil, nil, err
		}
		n := int64(-1)
		if whole {
			n = int64(len(b))
		}
		if err := openResponse(o, keys, n); err != nil {
			return nil, nil, err
		}
	} else {
		h := suite.Hash()
		keys, err := newCallKeys(h, aeadByName(v.AEAD), callRoot(h, v.Session, katServerID, katServerHash(v)), v.CallID, v.Procedure)
		if err != nil {
			return nil, nil, err
		}
		d := &keys.c2s
		// A request body starts with its call ID, which selects the keys.
		if len(b) < callIDSize {
			return nil, nil, errTruncated
		}
		if binary.BigEndian.Uint64(b) != v.CallID {
			return nil, nil, errTampered
		}
		o.dir, o.r = d, bytes.NewReader(b[callIDSize:])
		if whole {
			if err := o.preread(int64(len(b) - callIDSize)); err != nil {
				return nil, nil, err
			}
		}
	}
	side := &trailerSide{role: responseFinal}
	role := responseHead
	if dir == dirC2S {
		side.role, role = requestFinal, requestHead
	}
	head, err := readHead(o, role)
	if err != nil {
		return nil, nil, err
	}
	side.head = head
	pt, err := io.ReadAll(&openReader{o: o, side: side})
	return pt, side, err
}

// trailerSide is the callSide of a body opened in a test: it keeps the head and the FINAL
// frame's trailers and supports no rekeys.
type trailerSide struct {
	role     blockRole // of the FINAL frame's block
	head     fieldBlock
	trailers http.Header
}

func (*trailerSide) encap() ([]byte, []byte, error) { return nil, nil, errInternal }
func (*trailerSide) decap([]byte) ([]byte, error)   { return nil, errMalformed }
func (*trailerSide) rekeyed()                       {}
func (*trailerSide) counted(int)                    {}
func (*trailerSide) rejected(error)                 {}
func (t *trailerSide) final(b []byte) error {
	f, err := decodeFieldBlock(b, t.role)
	t.trailers = f.trailers
	return err
}

// helloFlags returns the flags of the vector's ClientHello.
func helloFlags(v katVector) uint8 {
	ch, err := parseClientHello(v.ClientHello)
	if err != nil {
		return 0
	}
	return ch.flags
}

func aeadByName(name string) AEAD {
	for _, a := range []AEAD{AES256GCM, ChaCha20Poly1305, SM4GCM} {
		if a.String() == name {
			return a
		}
	}
	return 0
}

func TestVectorsParse(t *testing.T) {
	for _, v := range loadKAT(t) {
		for name, e := range encodings(v) {
			if err := e.parse(e.b); err != nil {
				t.Errorf("%s %s: %v", v.Suite, name, err)
			}
		}
		pt, side, err := openBody(v, dirS2C, v.ResponseBody)
		if err != nil || string(pt) != "pong!" || side.trailers.Get("Grpc-Message") != "ok" ||
			!reflect.DeepEqual(side.head, fieldBlock{status: 200, headers: katResponseHeaders}) {
			t.Errorf("%s response opens to %q %+v %v", v.Suite, pt, side, err)
		}
		pt, side, err = openBody(v, dirC2S, v.RequestBody)
		if err != nil || string(pt) != "ping" ||
			!reflect.DeepEqual(side.head, fieldBlock{method: "POST", path: v.Procedure, attempt: v.Attempt, headers: katRequestHeaders}) {
			t.Errorf("%s request opens to %q %+v %v", v.Suite, pt, side, err)
		}
		for _, dir := range []string{dirC2S, dirS2C} {
			body, want := v.RequestBody, "ping"
			if dir == dirS2C {
				body, want = v.ResponseBody, "pong!"
			}
			if pt, _, err := openBodyWhole(v, dir, append([]byte(nil), body...)); err != nil || string(pt) != want {
				t.Errorf("%s %s read whole opens to %q %v", v.Suite, dir, pt, err)
			}
		}
		ch, err := parseClientHello(v.ClientHello)
		if err != nil || !bytes.Equal(ch.marshal(), v.ClientHello) {
			t.Errorf("%s client hello does not round-trip", v.Suite)
		}
	}
}

// TestBadLengths: every truncation and every extension of every encoding is an error, for
// the first vector and those without a pqkex ephemeral (empty ephemeral_pk and ct_e).
func TestBadLengths(t *testing.T) {
	for i, v := range loadKAT(t) {
		if i > 0 && helloFlags(v)&flagTLSEphemeral == 0 {
			continue
		}
		for name, e := range encodings(v) {
			step := 1
			if len(e.b) > 4096 {
				step = 7 // credentials are large; still covers every field boundary region densely
			}
			for i := 0; i < len(e.b); i += step {
				if e.parse(e.b[:i]) == nil {
					t.Errorf("%s truncated to %d of %d bytes parsed", name, i, len(e.b))
				}
			}
			if strings.HasPrefix(name, "request body") || strings.HasPrefix(name, "response body") {
				continue // bytes after FINAL are never read, by design (spec 6.2)
			}
			if e.parse(append(append([]byte(nil), e.b...), 0)) == nil {
				t.Errorf("%s extended by one byte parsed", name)
			}
		}
	}
}

// TestResponseNonce: a response body cut inside its server nonce is truncated; one whose
// nonce changed in any byte opens under other s2c keys, so its first frame is tampered
// (spec 6.2). Both when read frame by frame and when read whole.
func TestResponseNonce(t *testing.T) {
	for _, v := range loadKAT(t) {
		for _, whole := range []bool{false, true} {
			for i := 0; i <= serverNonceSize; i++ {
				if _, _, err := openBodyMode(v, dirS2C, append([]byte(nil), v.ResponseBody[:i]...), whole); !errors.Is(err, errTruncated) {
					t.Errorf("%s whole=%v: response cut to %d bytes: %v, want truncated", v.Suite, whole, i, err)
				}
			}
			for i := 0; i < serverNonceSize; i++ {
				b := append([]byte(nil), v.ResponseBody...)
				b[i] ^= 0x80
				if _, _, err := openBodyMode(v, dirS2C, b, whole); reasonOf(err) != reasonTampered {
					t.Errorf("%s whole=%v: nonce byte %d changed: %v, want tampered", v.Suite, whole, i, err)
				}
			}
		}
	}
}

// TestCredentialFieldBoundaries truncates credentials at every byte near a field boundary.
func TestCredentialFieldBoundaries(t *testing.T) {
	v := loadKAT(t)[0]
	b := v.ClientCredential
	c, err := ParseCredential(b)
	if err != nil {
		t.Fatal(err)
	}
	tbs := len(c.tbs)
	for _, edge := range []int{4, 5, 7, 9, tbs - 1220, tbs - 2, tbs, tbs + 2, tbs + 3311, len(b) - 1} {
		for i := max(edge-3, 0); i <= min(edge+3, len(b)-1); i++ {
			if _, err := ParseCredential(b[:i]); err == nil {
				t.Errorf("credential truncated to %d parsed", i)
			}
		}
	}
}

func TestRootsVerify(t *testing.T) {
	v := loadKAT(t)[0]
	c, err := ParseCredential(v.ServerCredential)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(v.Now, 0)
	// Recreate the vector's CA to get its roots.
	roots := katRoots(t, v)
	if err := roots.Verify(c, now); err != nil {
		t.Fatal(err)
	}
	if err := roots.Verify(c, now.Add(25*time.Hour)); !errors.Is(err, errCredentialTime) {
		t.Errorf("expired: %v", err)
	}
	if err := roots.Verify(c, now.Add(-2*time.Hour)); !errors.Is(err, errCredentialTime) {
		t.Errorf("not yet valid: %v", err)
	}
	for _, i := range []int{6, 40, len(c.tbs) + 100, len(v.ServerCredential) - 10} {
		bad := append([]byte(nil), v.ServerCredential...)
		bad[i] ^= 1
		if bc, err := ParseCredential(bad); err == nil && roots.Verify(bc, now) == nil {
			t.Errorf("credential with byte %d flipped verified", i)
		}
	}
	// Each signature alone is not enough.
	onlyPQ := roots
	onlyPQ.Classical = nil
	if onlyPQ.Verify(c, now) == nil {
		t.Error("verified without the classical root")
	}
	onlyClassical := roots
	onlyClassical.PQ = nil
	if onlyClassical.Verify(c, now) == nil {
		t.Error("verified without the post-quantum root")
	}
}

func katRoots(t *testing.T, v katVector) Roots {
	t.Helper()
	return katKeysOf(t, v).roots
}

// helloFlagsOffset is where the flags lie in the vectors' ClientHellos, which offer one
// version and one suite: u8 version, u8 type, u8 1, u8 version, u8 1, u16 suite, then the
// chosen u16 suite and u16 aead (spec 5.1).
const helloFlagsOffset = 11

func TestFlags(t *testing.T) {
	vs := loadKAT(t)
	v := vs[0]
	for _, f := range []uint8{flagPQOnly, flagTLSEphemeral, flagBinding | flagTLSEphemeral, flagPQOnly | flagTLSEphemeral, 0x08, 0x0f, 0x80} {
		b := append([]byte(nil), v.ClientHello...)
		b[helloFlagsOffset] = f
		if _, err := parseClientHello(b); err == nil {
			t.Errorf("flags %#x accepted", f)
		}
	}
	for f := range 256 {
		want := f == 0 || f == flagBinding || f == flagBinding|flagPQOnly || f == flagBinding|flagPQOnly|flagTLSEphemeral
		if validFlags(uint8(f)) != want {
			t.Errorf("validFlags(%#x) = %v", f, !want)
		}
	}
}

// TestTLSEphemeralLengths: with flagTLSEphemeral the ephemeral key and ct_e must be empty,
// without it they must have the KEM's size; a hello or ServerHello whose flag says otherwise
// than its lengths is malformed (spec 5.1).
func TestTLSEphemeralLengths(t *testing.T) {
	vs := loadKAT(t)
	full, none := vs[1], vs[3] // channel-bound with and without a pqkex ephemeral, same suite
	if helloFlags(full) != flagBinding|flagPQOnly || helloFlags(none) != flagBinding|flagPQOnly|flagTLSEphemeral {
		t.Fatalf("vector flags %#x, %#x", helloFlags(full), helloFlags(none))
	}
	withFlags := func(hello []byte, f uint8) []byte {
		b := append([]byte(nil), hello...)
		b[helloFlagsOffset] = f
		return b
	}
	// Bit 2 with an ephemeral key; no bit 2 with an empty one.
	if _, err := parseClientHello(withFlags(full.ClientHello, helloFlags(none))); err != errMalformed {
		t.Errorf("bit 2 with an ephemeral key: %v, want malformed", err)
	}
	if _, err := parseClientHello(withFlags(none.ClientHello, helloFlags(full))); err != errMalformed {
		t.Errorf("no bit 2 and no ephemeral key: %v, want malformed", err)
	}
	suite := SchemeByName(none.Suite)
	if _, err := parseServerHello(full.ServerHello, suite, aeadByName(none.AEAD), helloFlags(none)); err != errMalformed {
		t.Errorf("bit 2 with a ct_e: %v, want malformed", err)
	}
	if _, err := parseServerHello(none.ServerHello, suite, aeadByName(full.AEAD), helloFlags(full)); err != errMalformed {
		t.Errorf("no bit 2 and no ct_e: %v, want malformed", err)
	}
	// A one-byte ephemeral key or ct_e behind a length of 1, with bit 2.
	const ephOffset = helloFlagsOffset + 1 + randomSize + credDigestSize
	ch := append(append(append([]byte(nil), none.ClientHello[:ephOffset]...), 0, 1, 0x42), none.ClientHello[ephOffset+2:]...)
	if _, err := parseClientHello(ch); err != errMalformed {
		t.Errorf("bit 2 with a 1-byte ephemeral key: %v, want malformed", err)
	}
	const ctEOffset = 6 + randomSize // u8 version, u8 type, u16 suite, u16 aead, server_random
	sh := append(append(append([]byte(nil), none.ServerHello[:ctEOffset]...), 0, 1, 0x42), none.ServerHello[ctEOffset+2:]...)
	if _, err := parseServerHello(sh, suite, aeadByName(none.AEAD), helloFlags(none)); err != errMalformed {
		t.Errorf("bit 2 with a 1-byte ct_e: %v, want malformed", err)
	}
	// The vectors' empty fields are on the wire as a zero length.
	if none.ClientHello[ephOffset] != 0 || none.ClientHello[ephOffset+1] != 0 || none.ServerHello[ctEOffset] != 0 || none.ServerHello[ctEOffset+1] != 0 {
		t.Error("empty ephemeral_pk or ct_e not encoded as a zero length")
	}
}

// TestAttemptField: a request head's :attempt (spec 6.3) is required, third among the
// control data, and has one spelling (48 lowercase hex digits); anything else is malformed.
func TestAttemptField(t *testing.T) {
	good := katAttempt(1)
	head := func(entries ...[2]string) []byte {
		b := binary.BigEndian.AppendUint16(nil, uint16(len(entries)))
		for _, e := range entries {
			b = appendEntry(b, kindControl, e[0], e[1])
		}
		return b
	}
	m, p := [2]string{ctlMethod, "POST"}, [2]string{ctlPath, "/a.B/C"}
	if f, err := decodeFieldBlock(head(m, p, [2]string{ctlAttempt, good}), requestHead); err != nil || f.attempt != good {
		t.Fatalf("a good attempt: %v", err)
	}
	for name, b := range map[string][]byte{
		"missing":      head(m, p),
		"repeated":     head(m, p, [2]string{ctlAttempt, good}, [2]string{ctlAttempt, good}),
		"out of order": head(m, [2]string{ctlAttempt, good}, p),
		"upper case":   head(m, p, [2]string{ctlAttempt, strings.ToUpper(good)}),
		"short":        head(m, p, [2]string{ctlAttempt, good[2:]}),
		"long":         head(m, p, [2]string{ctlAttempt, good + "00"}),
		"not hex":      head(m, p, [2]string{ctlAttempt, "zz" + good[2:]}),
		"empty":        head(m, p, [2]string{ctlAttempt, ""}),
	} {
		if _, err := decodeFieldBlock(b, requestHead); err != errMalformed {
			t.Errorf("attempt %s: %v, want malformed", name, err)
		}
	}
	if _, err := decodeFieldBlock(head([2]string{ctlStatus, "200"}, [2]string{ctlAttempt, good}), responseHead); err != errMalformed {
		t.Errorf("attempt in a response head: %v, want malformed", err)
	}
}
