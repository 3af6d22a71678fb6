package pqkex

import (
	"bytes"
	"crypto"
	"crypto/hmac"
	"encoding/binary"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// The keyed HMAC (padded blocks absorbed once) is HMAC, and is really used.
func TestKeyedHMAC(t *testing.T) {
	for _, h := range []Hash{crypto.SHA256, crypto.SHA512, sm3Hash{}} {
		k := getKDF(h)
		for _, keyLen := range []int{0, 1, 32, h.Size()} {
			key := bytes.Repeat([]byte{byte(keyLen + 1)}, keyLen)
			var hk hmacKey
			k.keyed(&hk, key)
			if hk.n == 0 {
				t.Fatalf("%v: state not marshaled: keyed HMAC falls back", h)
			}
			for _, msg := range [][]byte{nil, []byte("x"), bytes.Repeat([]byte("m"), 300)} {
				want := hmac.New(h.New, key)
				want.Write(msg)
				if got := k.macKeyed(nil, &hk, msg); !bytes.Equal(got, want.Sum(nil)) {
					t.Fatalf("%v key %d msg %d: keyed HMAC differs", h, keyLen, len(msg))
				}
				if got := k.mac(nil, key, msg); !bytes.Equal(got, want.Sum(nil)) {
					t.Fatalf("%v key %d msg %d: HMAC differs", h, keyLen, len(msg))
				}
			}
		}
		k.put()
	}
}

// Per-call derivation (both directions) allocates only the call's keys and AEADs.
func TestCallKeysAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	sk := callRoot(crypto.SHA256, make([]byte, 32), katServerID, make([]byte, 32))
	allocs := testing.AllocsPerRun(100, func() {
		ck, err := newCallKeys(crypto.SHA256, AES256GCM, sk, 7, "/test.v1.EchoService/Unary")
		if err != nil {
			t.Fatal(err)
		}
		if err := ck.deriveS2C(); err != nil { // once the server nonce is known
			t.Fatal(err)
		}
	})
	if allocs > 6 {
		t.Fatalf("newCallKeys and deriveS2C: %v allocations, want at most 6 (callKeys and two AEADs)", allocs)
	}
}

// BenchmarkCallCrypto is the cryptographic floor of one sealed 1 KiB unary call, both sides,
// without HTTP: per-call keys on each side, the request sealed whole and opened (call ID,
// head, data and FINAL frames), the server nonce drawn, the s2c keys derived, the response
// sealed and opened. bench/ compares whole calls; this says how much of their difference
// the protocol's own work can explain.
func BenchmarkCallCrypto(b *testing.B) {
	session := bytes.Repeat([]byte{7}, 32)
	const procedure = "/veil.echo.v1.EchoService/Echo"
	plain := bytes.Repeat([]byte{'x'}, 1024)
	clientKey, serverKey := callRoot(crypto.SHA256, session, katServerID, make([]byte, 32)), callRoot(crypto.SHA256, session, katServerID, make([]byte, 32))
	reqHead := &fieldBlock{method: http.MethodPost, path: procedure, attempt: katAttempt(1), headers: http.Header{"Content-Type": {"application/proto"}}}
	respHead := &fieldBlock{status: http.StatusOK, headers: http.Header{"Content-Type": {"application/proto"}}}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		id := uint64(i)
		// Client: keys, request sealed whole.
		ck, err := newCallKeys(crypto.SHA256, AES256GCM, clientKey, id, procedure)
		if err != nil {
			b.Fatal(err)
		}
		req, err := sealWhole(&sealer{dir: &ck.c2s, now: time.Now}, id, reqHead, io.NopCloser(bytes.NewReader(plain)), int64(len(plain)), nil)
		if err != nil {
			b.Fatal(err)
		}
		// Server: keys from the call ID, request opened, nonce, response sealed.
		sk, err := newCallKeys(crypto.SHA256, AES256GCM, serverKey, binary.BigEndian.Uint64(req), procedure)
		if err != nil {
			b.Fatal(err)
		}
		o := &opener{dir: &sk.c2s, r: bytes.NewReader(req[callIDSize:])}
		if err := o.preread(int64(len(req) - callIDSize)); err != nil {
			b.Fatal(err)
		}
		if _, err := readHead(o, requestHead); err != nil {
			b.Fatal(err)
		}
		if n, err := io.Copy(io.Discard, &openReader{o: o}); err != nil || n != int64(len(plain)) {
			b.Fatal(n, err)
		}
		if err := readRandom(nil, sk.nonce[:]); err != nil {
			b.Fatal(err)
		}
		if err := sk.deriveS2C(); err != nil {
			b.Fatal(err)
		}
		s := &sealer{dir: &sk.s2c, now: time.Now}
		box, resp := getBuffer()
		resp = append(resp, sk.nonce[:]...)
		if resp, err = s.appendBlock(resp, 0, respHead); err == nil {
			if resp, err = s.appendData(resp, plain); err == nil {
				resp, err = s.appendBlock(resp, flagFinal, &fieldBlock{})
			}
		}
		if err != nil {
			b.Fatal(err)
		}
		// Client: response opened.
		ro := &opener{r: bytes.NewReader(resp)}
		if err := openResponse(ro, ck, int64(len(resp))); err != nil {
			b.Fatal(err)
		}
		if _, err := readHead(ro, responseHead); err != nil {
			b.Fatal(err)
		}
		if n, err := io.Copy(io.Discard, &openReader{o: ro}); err != nil || n != int64(len(plain)) {
			b.Fatal(n, err)
		}
		putBuffer(box, resp)
	}
}

// sealWhole refuses a body longer than its declared length, and one shorter.
func TestSealWholeLength(t *testing.T) {
	sk := callRoot(crypto.SHA256, make([]byte, 32), katServerID, make([]byte, 32))
	for _, tt := range []struct {
		body    string
		n       int64
		wantErr bool
	}{{"abc", 3, false}, {"abcd", 3, true}, {"ab", 3, true}, {"", 0, false}} {
		ck, err := newCallKeys(crypto.SHA256, AES256GCM, sk, 1, "/p")
		if err != nil {
			t.Fatal(err)
		}
		_, err = sealWhole(&sealer{dir: &ck.c2s, now: time.Now}, 1, &fieldBlock{method: "POST", path: "/p"}, io.NopCloser(strings.NewReader(tt.body)), tt.n, nil)
		if (err != nil) != tt.wantErr {
			t.Errorf("body %q declared %d: err %v, want error %v", tt.body, tt.n, err, tt.wantErr)
		}
	}
}

// newCallKeys returns the keys of a call on their own, as the tests and vectors use them
// (calls keep theirs inside clientCall and serverCall).
func newCallKeys(h Hash, a AEAD, session *hmacKey, callID uint64, procedure string) (*callKeys, error) {
	ck := new(callKeys)
	if err := ck.init(h, a, session, callID, procedure); err != nil {
		return nil, err
	}
	return ck, nil
}

// TestPooledKDFForgetsKeys: a kdf goes back to the pool without what it derived. Its hash
// ends each HMAC in the state that finalizes to the HMAC's output, the derived key (a call's
// AEAD key, ck, a ticket key): wipe must leave no state that finalizes to it, as it leaves
// no copy in the buffers.
func TestPooledKDFForgetsKeys(t *testing.T) {
	for _, h := range []Hash{crypto.SHA256, crypto.SHA512, sm3Hash{}} {
		secret := bytes.Repeat([]byte{0x5a}, h.Size())
		k := getKDF(h)
		var hk hmacKey
		k.keyed(&hk, secret)
		for name, derive := range map[string]func() []byte{
			"expand":       func() []byte { return k.expand(nil, secret, keyLabelC2S, []byte("ctx"), 32) },
			"expand keyed": func() []byte { return k.expandKeyed(nil, &hk, keyLabelC2S, []byte("ctx"), 32) },
			"mac":          func() []byte { return k.mac(nil, secret, []byte("transcript")) },
		} {
			key := derive()
			k.wipe()
			if bytes.HasPrefix(k.h.Sum(nil), key) {
				t.Errorf("%v %s: the wiped kdf's hash still finalizes to the derived key", h, name)
			}
		}
		k.put()
	}
}
