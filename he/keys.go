package he

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/ring/ringqp"
	"github.com/tuneinsight/lattigo/v5/utils/sampling"
)

// SecretKey is a CKKS secret key. It never leaves the client: no encoder in this
// package accepts it, and it refuses every generic marshaller (binary, text, JSON,
// gob) and prints as REDACTED.
type SecretKey struct {
	params *Parameters
	sk     *rlwe.SecretKey
}

var errSecretExport = errors.New("he: secret keys cannot be serialized")

// MarshalBinary refuses: secret keys are not serialized.
func (*SecretKey) MarshalBinary() ([]byte, error) { return nil, errSecretExport }

// MarshalText refuses: secret keys are not serialized.
func (*SecretKey) MarshalText() ([]byte, error) { return nil, errSecretExport }

// MarshalJSON refuses: secret keys are not serialized.
func (*SecretKey) MarshalJSON() ([]byte, error) { return nil, errSecretExport }

// GobEncode refuses: secret keys are not serialized.
func (*SecretKey) GobEncode() ([]byte, error) { return nil, errSecretExport }

// Format prints a placeholder for every verb, so the key cannot reach a log.
func (*SecretKey) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte("he.SecretKey(REDACTED)")) }

// PublicKey is a CKKS public key: data owners encrypt under it without the secret key.
type PublicKey struct {
	params *Parameters
	pk     *rlwe.PublicKey
	fp     []byte
}

// FingerprintSize is the length of a key fingerprint.
const FingerprintSize = 16

func newPublicKey(params *Parameters, pk *rlwe.PublicKey) *PublicKey {
	h := sha256.New()
	h.Write([]byte("veil-he-key-fingerprint-v1\x00"))
	h.Write([]byte(params.id))
	h.Write(appendQP(params, nil, pk.Value[0]))
	h.Write(appendQP(params, nil, pk.Value[1]))
	return &PublicKey{params: params, pk: pk, fp: h.Sum(nil)[:FingerprintSize]}
}

// Fingerprint returns the key's fingerprint: the first 16 bytes of a SHA-256 over a
// label, the parameter ID and the packed key. Every vector encrypted under the key (or
// under its secret key) carries it, so that vectors under different keys are refused
// instead of combined into garbage.
func (k *PublicKey) Fingerprint() []byte { return bytes.Clone(k.fp) }

// ParamID returns the ID of the key's parameters.
func (k *PublicKey) ParamID() ParamID { return k.params.id }

// KeyID names an evaluation-key set: the SHA-256 of its encoding, in lowercase hex.
type KeyID string

// SeedSize is the length of the PRNG keys in seeded encodings.
const SeedSize = 32

func newSeed() ([]byte, error) {
	s := make([]byte, SeedSize)
	if _, err := rand.Read(s); err != nil {
		return nil, internalf("reading randomness")
	}
	return s, nil
}

// rowSeed derives the PRNG key of row (i, j) of an evaluation key from its seed.
func rowSeed(seed []byte, i, j int) []byte {
	out := make([]byte, 0, SeedSize+8)
	out = append(out, seed...)
	out = append(out, byte(i>>24), byte(i>>16), byte(i>>8), byte(i), byte(j>>24), byte(j>>16), byte(j>>8), byte(j))
	return out
}

// seededPRNG returns the deterministic byte stream behind seeded encodings:
// AES-256-CTR (zero IV) keyed by SHA-256("veil-he-prng-v1" || key). AES-NI makes it
// several times faster than lattigo's blake2b PRNG, which matters because the server
// regenerates the uniform half of every seeded ciphertext and key it receives.
func seededPRNG(key []byte) sampling.PRNG {
	k := sha256.Sum256(append([]byte("veil-he-prng-v1"), key...))
	block, err := aes.NewCipher(k[:])
	if err != nil {
		panic(err) // a 32-byte key is always valid
	}
	return ctrPRNG{cipher.NewCTR(block, make([]byte, aes.BlockSize))}
}

type ctrPRNG struct{ s cipher.Stream }

func (c ctrPRNG) Read(p []byte) (int, error) {
	clear(p)
	c.s.XORKeyStream(p, p)
	return len(p), nil
}

// ciphertextEncoding is the version of the ciphertext encoding this package writes.
const ciphertextEncoding = 1

// ciphertextSeedKey returns the PRNG key of a seeded ciphertext's c1 in encoding 1: a
// purpose label and the parameter ID bound to the seed, so that the same seed never
// yields the same stream for another purpose (an evaluation-key row) or another
// parameter set. Encoding 0 used the seed itself.
func ciphertextSeedKey(params *Parameters, seed []byte, encoding uint32) []byte {
	if encoding == 0 {
		return seed
	}
	out := append([]byte("veil-he-ct-c1\x00"), params.id...)
	return append(out, seed...)
}

// uniformFromSeed returns the uniform sampler the seeded encodings use.
func uniformFromSeed(params *Parameters, key []byte) ringqp.UniformSampler {
	return ringqp.NewUniformSampler(seededPRNG(key), *params.p.RingQP())
}
