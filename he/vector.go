package he

import (
	"bytes"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
)

// Vector is an encrypted vector of float64 values, packed contiguously: value i sits
// in ciphertext i/Slots, slot i%Slots. Slots past Len hold zero in a fresh vector.
// A Vector is immutable: operations return new vectors.
type Vector struct {
	params *Parameters
	cts    []*rlwe.Ciphertext
	// seeds[i] is the PRNG key that regenerates cts[i]'s c1 (fresh secret-key
	// ciphertexts only); nil when the ciphertext must travel in full.
	seeds  [][]byte
	length int
	// dirty is set when slots past length may hold non-zero values (after a polynomial
	// evaluation or a rotation); sums then mask them first.
	dirty bool
	// noise bounds every coefficient of the decryption error; 0 when unknown
	// (flooding.go).
	noise float64
	// fp is the fingerprint of the key the vector is encrypted under; empty when the
	// sender did not say (older clients).
	fp []byte
}

// KeyFingerprint returns the fingerprint of the key the vector is encrypted under
// (PublicKey.Fingerprint), or nil when its sender gave none.
func (v *Vector) KeyFingerprint() []byte { return bytes.Clone(v.fp) }

// Len returns the number of meaningful values.
func (v *Vector) Len() int { return v.length }

// ParamID returns the ID of the vector's parameters.
func (v *Vector) ParamID() ParamID { return v.params.id }

// Ciphertexts returns the number of ciphertexts the vector spans.
func (v *Vector) Ciphertexts() int { return len(v.cts) }

// Level returns the lowest level among the vector's ciphertexts: how many more
// rescalings (multiplications) it supports.
func (v *Vector) Level() int {
	l := v.cts[0].Level()
	for _, ct := range v.cts[1:] {
		l = min(l, ct.Level())
	}
	return l
}

// Scale returns the scale of the first ciphertext.
func (v *Vector) Scale() float64 {
	f, _ := v.cts[0].Scale.Value.Float64()
	return f
}

// ciphertextsFor returns how many ciphertexts n values need.
func ciphertextsFor(n, slots int) int {
	if n <= 0 {
		return 1
	}
	return (n + slots - 1) / slots
}

// chunk returns the slots-long plaintext values for ciphertext i of a vector of values,
// zero-padded.
func chunk(values []float64, i, slots int) []float64 {
	out := make([]float64, slots)
	lo := i * slots
	if lo < len(values) {
		copy(out, values[lo:min(len(values), lo+slots)])
	}
	return out
}

// validSlots returns how many slots of ciphertext i hold meaningful values.
func (v *Vector) validSlots(i int) int {
	slots := v.params.Slots()
	return min(slots, v.length-i*slots)
}

func (v *Vector) derive(cts []*rlwe.Ciphertext, length int, dirty bool) *Vector {
	return &Vector{params: v.params, cts: cts, length: length, dirty: dirty, fp: v.fp}
}

// Fresh reports whether every ciphertext of v is as an encryption leaves it: degree 1,
// the top level and exactly the default scale. Services that add up untrusted
// contributions require it, so that one contribution cannot make the sum unalignable.
func (v *Vector) Fresh() bool {
	want := v.params.p.DefaultScale()
	for _, ct := range v.cts {
		if ct.Degree() != 1 || ct.Level() != v.params.MaxLevel() || ct.Scale.Cmp(want) != 0 {
			return false
		}
	}
	return true
}
