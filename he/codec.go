package he

import (
	"bytes"
	"math"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/ring/ringqp"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
)

const (
	// maxVectorLength bounds EncryptedVector.length (as the proto does).
	maxVectorLength = 1 << 26
	// maxVectorCiphertexts bounds the ciphertexts of one EncryptedVector.
	maxVectorCiphertexts = 4096
)

// MarshalVector converts v into its wire form. Fresh secret-key ciphertexts travel
// seeded (c1 replaced by its 32-byte PRNG key).
func MarshalVector(v *Vector) (*hev1.EncryptedVector, error) {
	if v == nil || len(v.cts) == 0 {
		return nil, invalidf("nil vector")
	}
	out := &hev1.EncryptedVector{
		ParamId: string(v.params.id),
		Length:  uint64(v.length),
		Slots:   uint32(v.params.Slots()),
		Layout:  hev1.Layout_LAYOUT_CONTIGUOUS,

		KeyFingerprint: v.fp,
	}
	for i, ct := range v.cts {
		var seed []byte
		if v.seeds != nil {
			seed = v.seeds[i]
		}
		out.Ciphertexts = append(out.Ciphertexts, marshalCiphertext(v.params, ct, seed))
	}
	return out, nil
}

func marshalCiphertext(params *Parameters, ct *rlwe.Ciphertext, seed []byte) *hev1.Ciphertext {
	scale, _ := ct.Scale.Value.Float64()
	size := polyBytes(params.p.Q()[:ct.Level()+1], params.N())
	m := &hev1.Ciphertext{
		ParamId:  string(params.id),
		Level:    uint32(ct.Level()),
		Scale:    scale,
		C0:       appendPoly(make([]byte, 0, size), ct.Value[0], params.p.Q()),
		Encoding: ciphertextEncoding,
	}
	if seed != nil {
		m.Seed = append([]byte(nil), seed...)
	} else {
		m.C1 = appendPoly(make([]byte, 0, size), ct.Value[1], params.p.Q())
	}
	return m
}

// UnmarshalVector validates an untrusted EncryptedVector against params and returns
// it. Every rule is checked (parameter ID, layout, slots, length, ciphertext count,
// level, scale, sizes, coefficients reduced modulo each prime); a parameter mismatch is
// failed_precondition naming both IDs, anything else malformed is invalid_argument.
func UnmarshalVector(params *Parameters, m *hev1.EncryptedVector) (v *Vector, err error) {
	defer recoverInto(&err, "decode vector")
	if params == nil || m == nil {
		return nil, invalidf("nil vector")
	}
	if ParamID(m.GetParamId()) != params.id {
		return nil, paramMismatch("vector", ParamID(m.GetParamId()), params.id)
	}
	if m.GetLayout() != hev1.Layout_LAYOUT_CONTIGUOUS {
		return nil, invalidf("vector layout %v not supported", m.GetLayout())
	}
	if int(m.GetSlots()) != params.Slots() {
		return nil, invalidf("vector packs %d slots per ciphertext, parameters have %d", m.GetSlots(), params.Slots())
	}
	if m.GetLength() < 1 || m.GetLength() > maxVectorLength {
		return nil, invalidf("vector length %d out of range [1, %d]", m.GetLength(), maxVectorLength)
	}
	n := ciphertextsFor(int(m.GetLength()), params.Slots())
	if n > maxVectorCiphertexts {
		return nil, invalidf("vector of length %d needs %d ciphertexts, at most %d", m.GetLength(), n, maxVectorCiphertexts)
	}
	if len(m.GetCiphertexts()) != n {
		return nil, invalidf("vector of length %d needs %d ciphertexts, has %d", m.GetLength(), n, len(m.GetCiphertexts()))
	}
	if fp := m.GetKeyFingerprint(); len(fp) != 0 && len(fp) != FingerprintSize {
		return nil, invalidf("key fingerprint of %d bytes, want %d", len(fp), FingerprintSize)
	}
	v = &Vector{params: params, length: int(m.GetLength()), cts: make([]*rlwe.Ciphertext, n)}
	if fp := m.GetKeyFingerprint(); len(fp) != 0 {
		v.fp = bytes.Clone(fp)
	}
	for i, c := range m.GetCiphertexts() {
		if v.cts[i], err = unmarshalCiphertext(params, c); err != nil {
			return nil, err
		}
	}
	return v, nil
}

func unmarshalCiphertext(params *Parameters, m *hev1.Ciphertext) (*rlwe.Ciphertext, error) {
	if ParamID(m.GetParamId()) != params.id {
		return nil, paramMismatch("ciphertext", ParamID(m.GetParamId()), params.id)
	}
	if m.GetEncoding() > ciphertextEncoding {
		return nil, invalidf("ciphertext encoding version %d unknown (this receiver knows up to %d)", m.GetEncoding(), ciphertextEncoding)
	}
	level := int(m.GetLevel())
	if level > params.MaxLevel() {
		return nil, invalidf("ciphertext level %d above the maximum %d", level, params.MaxLevel())
	}
	scale := m.GetScale()
	if math.IsNaN(scale) || math.IsInf(scale, 0) || scale < 1 || math.Log2(scale) >= float64(params.p.LogQLvl(level)) {
		return nil, invalidf("ciphertext scale %g out of range [1, 2^%d)", scale, params.p.LogQLvl(level))
	}
	size := polyBytes(params.p.Q()[:level+1], params.N())
	if len(m.GetC0()) != size {
		return nil, invalidf("ciphertext c0 is %d bytes, level %d needs %d", len(m.GetC0()), level, size)
	}
	seeded := len(m.GetSeed()) != 0
	switch {
	case seeded && len(m.GetC1()) != 0:
		return nil, invalidf("ciphertext has both c1 and a seed")
	case seeded && len(m.GetSeed()) != SeedSize:
		return nil, invalidf("ciphertext seed is %d bytes, want %d", len(m.GetSeed()), SeedSize)
	case !seeded && len(m.GetC1()) != size:
		return nil, invalidf("ciphertext c1 is %d bytes, level %d needs %d", len(m.GetC1()), level, size)
	}
	ct := rlwe.NewCiphertext(params.p, 1, level)
	ct.IsNTT = true
	ct.Scale = rlwe.NewScale(scale)
	ct.LogDimensions = params.p.LogMaxDimensions()
	ct.IsBatched = true
	if _, err := readPoly(m.GetC0(), ct.Value[0], params.p.Q()); err != nil {
		return nil, err
	}
	if seeded {
		uniformFromSeed(params, ciphertextSeedKey(params, m.GetSeed(), m.GetEncoding())).AtLevel(level, -1).Read(ringqp.Poly{Q: ct.Value[1]})
	} else if _, err := readPoly(m.GetC1(), ct.Value[1], params.p.Q()); err != nil {
		return nil, err
	}
	return ct, nil
}

// MarshalPublicKey converts pk into its wire form.
func MarshalPublicKey(pk *PublicKey) (*hev1.PublicKey, error) {
	if pk == nil || pk.pk == nil {
		return nil, invalidf("nil public key")
	}
	return &hev1.PublicKey{
		ParamId: string(pk.params.id),
		B:       appendQP(pk.params, nil, pk.pk.Value[0]),
		A:       appendQP(pk.params, nil, pk.pk.Value[1]),
	}, nil
}

// UnmarshalPublicKey validates an untrusted public key against params.
func UnmarshalPublicKey(params *Parameters, m *hev1.PublicKey) (pk *PublicKey, err error) {
	defer recoverInto(&err, "decode public key")
	if params == nil || m == nil {
		return nil, invalidf("nil public key")
	}
	if ParamID(m.GetParamId()) != params.id {
		return nil, paramMismatch("public key", ParamID(m.GetParamId()), params.id)
	}
	size := polyBytes(params.p.Q(), params.N()) + polyBytes(params.p.P(), params.N())
	if len(m.GetB()) != size || len(m.GetA()) != size {
		return nil, invalidf("public key parts are %d and %d bytes, want %d", len(m.GetB()), len(m.GetA()), size)
	}
	k := rlwe.NewPublicKey(params.p)
	for i, b := range [][]byte{m.GetB(), m.GetA()} {
		rest, err := readPoly(b, k.Value[i].Q, params.p.Q())
		if err != nil {
			return nil, err
		}
		if _, err := readPoly(rest, k.Value[i].P, params.p.P()); err != nil {
			return nil, err
		}
	}
	return newPublicKey(params, k), nil
}

// MarshalManifest converts m into its wire form.
func MarshalManifest(m *Manifest) *hev1.KeyManifest {
	out := &hev1.KeyManifest{ParamId: string(m.params.id), Relinearization: m.relin, GaloisElements: m.GaloisElements()}
	for _, r := range m.Rotations() {
		out.Rotations = append(out.Rotations, int64(r))
	}
	return out
}

// UnmarshalManifest validates a manifest received from a server against params.
func UnmarshalManifest(params *Parameters, m *hev1.KeyManifest) (*Manifest, error) {
	if params == nil || m == nil {
		return nil, invalidf("nil manifest")
	}
	if ParamID(m.GetParamId()) != params.id {
		return nil, paramMismatch("manifest", ParamID(m.GetParamId()), params.id)
	}
	if len(m.GetGaloisElements()) > maxGaloisKeys {
		return nil, invalidf("manifest lists %d Galois elements, at most %d", len(m.GetGaloisElements()), maxGaloisKeys)
	}
	out := &Manifest{params: params, relin: m.GetRelinearization()}
	twoN := uint64(2 * params.N())
	for _, g := range m.GetGaloisElements() {
		if g&1 == 0 || g >= twoN || g == 1 || !params.isRotation(g) {
			return nil, invalidf("manifest: bad Galois element %d", g)
		}
		out.galEls = append(out.galEls, g)
	}
	out.normalize()
	return out, nil
}

// MaxVectorWireSize bounds the protobuf size of an EncryptedVector of n values on
// params, unseeded at the maximum level. The rpc layer sets it (times the vectors a
// message carries) as the read limit of procedures that carry ciphertexts; the
// default limit stays small. ParamsN13: 289 KB per 4096 values; ParamsN14: 1.36 MB
// per 8192; ParamsN15: 5.7 MB per 16384.
func MaxVectorWireSize(params *Parameters, n int) int64 {
	const overhead = 128 // field tags, lengths, IDs, level, scale
	perCt := int64(2*polyBytes(params.p.Q(), params.N())) + overhead
	return int64(ciphertextsFor(n, params.Slots()))*perCt + overhead
}

// CiphertextMemory returns the bytes one decoded ciphertext at the maximum level
// takes in memory: two polynomials of N words per prime of Q.
func CiphertextMemory(params *Parameters) int64 {
	return 2 * int64(params.MaxLevel()+1) * int64(params.N()) * 8
}

// isRotation reports whether g is the Galois element of a slot rotation (a power of 5
// modulo 2N), the only automorphisms this package evaluates.
func (p *Parameters) isRotation(g uint64) bool {
	return p.p.GaloisElementForRotation(p.p.SolveDiscreteLogGaloisElement(g)) == g
}
