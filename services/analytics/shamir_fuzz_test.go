package analytics

import (
	"bytes"
	"testing"
)

// An opened Shamir payload is untrusted (anyone with the recipient's HPKE key can seal
// one): parsing never panics, and what parses re-encodes to the same bytes.
func FuzzParseShamirPayload(f *testing.F) {
	f.Add(shamirPayload([]byte("share"), []byte("sig"), [][]byte{[]byte("leaf"), []byte("ca")}))
	f.Add(shamirPayload(nil, nil, nil))
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 9, 1})
	f.Add(bytes.Repeat([]byte{0xff}, 24))
	f.Fuzz(func(t *testing.T, b []byte) {
		share, sig, chain, err := parseShamirPayload(b)
		if err != nil {
			return
		}
		if len(chain) < 1 || len(chain) > maxShamirChain {
			t.Fatalf("parsed a chain of %d certificates", len(chain))
		}
		if !bytes.Equal(shamirPayload(share, sig, chain), b) {
			t.Fatal("a parsed payload does not re-encode to its bytes")
		}
	})
}
