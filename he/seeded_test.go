package he

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"math"
	"math/bits"
	"testing"

	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
)

// independentC1 derives the c1 of a seeded ciphertext without lattigo's sampler or
// this package's PRNG: AES-256-CTR (zero IV) over zeros, keyed by SHA-256 of
// "veil-he-prng-v1" and the PRNG key, read 8 bytes at a time big-endian, masked to
// the prime's bit length, values at or above the prime rejected; limb by limb.
func independentC1(params *Parameters, prngKey []byte, level int) [][]uint64 {
	k := sha256.Sum256(append([]byte("veil-he-prng-v1"), prngKey...))
	block, _ := aes.NewCipher(k[:])
	stream := cipher.NewCTR(block, make([]byte, aes.BlockSize))
	var buf [8]byte
	out := make([][]uint64, level+1)
	for j, q := range params.p.Q()[:level+1] {
		mask := uint64(1)<<bits.Len64(q) - 1
		out[j] = make([]uint64, params.N())
		for i := range out[j] {
			for {
				clear(buf[:])
				stream.XORKeyStream(buf[:], buf[:])
				if v := binary.BigEndian.Uint64(buf[:]) & mask; v < q {
					out[j][i] = v
					break
				}
			}
		}
	}
	return out
}

// TestSeededC1Pinned: the c1 a receiver regenerates from a seed is the independent
// derivation above, in both encodings (1: label and parameter ID in the key; 0: the
// seed alone), and its hash is pinned in testdata/seeded_c1.txt, so that a lattigo
// upgrade that changes uniform sampling, or a change to the derivation, fails here
// instead of decrypting every seeded ciphertext to garbage.
func TestSeededC1Pinned(t *testing.T) {
	params := ParamsN13()
	seed := make([]byte, SeedSize)
	for i := range seed {
		seed[i] = byte(i)
	}
	const level = 0
	c0 := make([]byte, polyBytes(params.p.Q()[:level+1], params.N()))
	pins := map[string]string{}
	for _, kv := range readPairs(t, "testdata/seeded_c1.txt") {
		pins[kv[0]] = kv[1]
	}
	for _, enc := range []uint32{0, 1} {
		m := &hev1.Ciphertext{ParamId: string(params.ID()), Level: level, Scale: params.DefaultScale(), C0: c0, Seed: seed, Encoding: enc}
		ct, err := unmarshalCiphertext(params, m)
		if err != nil {
			t.Fatal(err)
		}
		want := independentC1(params, ciphertextSeedKey(params, seed, enc), level)
		for j := range want {
			for i, v := range want[j] {
				if ct.Value[1].Coeffs[j][i] != v {
					t.Fatalf("encoding %d: c1[%d][%d] = %d, the independent derivation %d", enc, j, i, ct.Value[1].Coeffs[j][i], v)
				}
			}
		}
		sum := sha256.Sum256(appendPoly(nil, ct.Value[1], params.p.Q()[:level+1]))
		name := "encoding" + string(rune('0'+enc))
		if got := hex.EncodeToString(sum[:]); got != pins[name] {
			t.Errorf("%s: SHA-256 of the packed c1 %s, pinned %s", name, got, pins[name])
		}
	}
	// The label separates: encoding 1 of a seed is not encoding 0 of it.
	if string(ciphertextSeedKey(params, seed, 1)) == string(ciphertextSeedKey(params, seed, 0)) {
		t.Error("encodings 0 and 1 share a PRNG key")
	}
	m := &hev1.Ciphertext{ParamId: string(params.ID()), Level: level, Scale: params.DefaultScale(), C0: c0, Seed: seed, Encoding: 2}
	if _, err := unmarshalCiphertext(params, m); kindOf(err) != KindInvalid {
		t.Errorf("unknown encoding: %v", err)
	}
}

// TestMulScalarByReciprocalExact guards the mean's scaling by 1/count (a
// self-reported count, up to 2^20 here): within 1e-5 of exact on a set whose last
// prime has 30 bits. (Issue 18 feared a relative error of count/q; lattigo's scalar
// multiplication measured at most 4e-6 here, so this passed before as well.)
func TestMulScalarByReciprocalExact(t *testing.T) {
	c, err := NewClient(smallParams())
	if err != nil {
		t.Fatal(err)
	}
	ev, _ := NewEvaluator(smallParams(), nil)
	for _, count := range []float64{3, 1000, 1<<20 + 7, -(1<<19 + 3)} {
		v, _ := c.Encrypt([]float64{count, 2 * count, -count})
		got, err := ev.MulScalar(context.Background(), v, 1/count)
		if err != nil {
			t.Fatal(err)
		}
		out, err := c.Decrypt(got)
		if err != nil {
			t.Fatal(err)
		}
		for i, want := range []float64{1, 2, -1} {
			if math.Abs(out[i]-want) > 1e-5 {
				t.Errorf("count %v: value %d = %v, want %v", count, i, out[i], want)
			}
		}
	}
}
