package he

import (
	"crypto/rand"
	"encoding/hex"
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
}

// ParamID returns the ID of the key's parameters.
func (k *PublicKey) ParamID() ParamID { return k.params.id }

// KeyID names an evaluation-key set: the SHA-256 of its encoding, in lowercase hex.
type KeyID string

func (id KeyID) short() string {
	if len(id) > 16 {
		return string(id[:16])
	}
	return string(id)
}

func validKeyID(s string) bool {
	if len(s) != 64 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil && s == lowerHex(s)
}

func lowerHex(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'F' {
			b[i] = c + 32
		}
	}
	return string(b)
}

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

// uniformFromSeed returns the uniform sampler the seeded encodings use.
func uniformFromSeed(params *Parameters, key []byte) (ringqp.UniformSampler, error) {
	prng, err := sampling.NewKeyedPRNG(key)
	if err != nil {
		return ringqp.UniformSampler{}, internalf("keyed PRNG")
	}
	return ringqp.NewUniformSampler(prng, *params.p.RingQP()), nil
}
