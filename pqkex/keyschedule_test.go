package pqkex

import (
	"bytes"
	"crypto"
	"crypto/hmac"
	"testing"
)

// The keyed HMAC (padded blocks absorbed once) is HMAC, and is really used.
func TestKeyedHMAC(t *testing.T) {
	for _, h := range []crypto.Hash{crypto.SHA256, crypto.SHA512} {
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
	sk := sessionKey(crypto.SHA256, make([]byte, 32))
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
