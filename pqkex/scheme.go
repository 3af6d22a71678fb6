package pqkex

import (
	"bytes"
	"crypto"
	"crypto/sha3"
	"crypto/tls"

	"github.com/cloudflare/circl/hpke"
	"github.com/cloudflare/circl/kem"
	"github.com/cloudflare/circl/kem/hybrid"
	"github.com/cloudflare/circl/kem/mlkem/mlkem1024"
	"github.com/cloudflare/circl/kem/mlkem/mlkem768"
)

// Scheme is a pqkex suite: a hybrid KEM (circl's [kem.Scheme] contract) whose post-quantum and
// classical halves both contribute to every shared secret, and the hash used for the transcript
// and HKDF. Name returns the suite name, e.g. "X25519MLKEM768-SHA256".
type Scheme interface {
	kem.Scheme
	// ID is the suite's two-byte wire identifier.
	ID() uint16
	// Hash is the transcript and HKDF hash.
	Hash() Hash
}

// Suite identifiers on the wire.
const (
	suiteX25519MLKEM768 uint16 = 0x0001
	suiteX448MLKEM1024  uint16 = 0x0002
)

type suite struct {
	kem.Scheme
	name string
	id   uint16
	hash Hash
	pq   kem.Scheme // the post-quantum half; its keys and ciphertexts come first
}

func (s *suite) Name() string { return s.name }
func (s *suite) ID() uint16   { return s.id }
func (s *suite) Hash() Hash   { return s.hash }

var (
	x25519MLKEM768 = &suite{Scheme: hybrid.X25519MLKEM768(), name: "X25519MLKEM768-SHA256", id: suiteX25519MLKEM768, hash: crypto.SHA256, pq: mlkem768.Scheme()}
	x448MLKEM1024  = &suite{
		Scheme: &concatKEM{name: "X448MLKEM1024", pq: mlkem1024.Scheme(), classical: hpke.KEM_X448_HKDF_SHA512.Scheme()},
		name:   "X448MLKEM1024-SHA512", id: suiteX448MLKEM1024, hash: crypto.SHA512, pq: mlkem1024.Scheme(),
	}
)

// X25519MLKEM768 returns the default suite: ML-KEM-768 concatenated with X25519 (the layout of
// TLS's X25519MLKEM768, circl kem/hybrid), with SHA-256.
func X25519MLKEM768() Scheme { return x25519MLKEM768 }

// X448MLKEM1024 returns the high-security suite: ML-KEM-1024 concatenated with
// DHKEM(X448, HKDF-SHA512), with SHA-512.
func X448MLKEM1024() Scheme { return x448MLKEM1024 }

// Schemes returns every supported suite, the default first.
func Schemes() []Scheme { return []Scheme{x25519MLKEM768, x448MLKEM1024, sm2MLKEM768} }

// SchemeByName returns the suite with the given name, or nil.
func SchemeByName(name string) Scheme {
	for _, s := range Schemes() {
		if s.Name() == name {
			return s
		}
	}
	return nil
}

// SchemeByID returns the suite with the given wire identifier, or nil.
func SchemeByID(id uint16) Scheme {
	for _, s := range Schemes() {
		if s.ID() == id {
			return s
		}
	}
	return nil
}

// pqHalf returns the post-quantum half of a suite's KEM. Both suites put the ML-KEM public key,
// private key and ciphertext first, so a hybrid key's ML-KEM half is its prefix.
func pqHalf(s Scheme) kem.Scheme {
	if st, ok := s.(*suite); ok {
		return st.pq
	}
	return nil
}

// tlsEphemeralGroup reports whether a TLS connection that negotiated group g carries a
// hybrid post-quantum ephemeral secret with an ML-KEM at least as strong as suite's, so that
// a hello with flagTLSEphemeral may leave out pqkex's own ephemeral (spec 5.3). Both sides
// decide with it: the server before it answers, the client after.
func tlsEphemeralGroup(suite Scheme, g tls.CurveID) bool {
	switch pqHalf(suite) {
	case mlkem768.Scheme():
		if fullHybridOnly(suite) {
			return false
		}
		return g == tls.X25519MLKEM768 || g == tls.SecP256r1MLKEM768 || g == tls.SecP384r1MLKEM1024
	case mlkem1024.Scheme():
		return g == tls.SecP384r1MLKEM1024
	}
	return false
}

// concatKEM is a hybrid KEM whose public keys, ciphertexts and shared secrets are the
// concatenations of a post-quantum KEM's and a classical KEM's (post-quantum first). The
// concatenated secret must only be used through a KDF together with a transcript hash that
// covers the public keys and ciphertexts, as pqkex's key schedule does.
type concatKEM struct {
	name          string
	pq, classical kem.Scheme
}

type concatPublicKey struct {
	s             *concatKEM
	pq, classical kem.PublicKey
}

type concatPrivateKey struct {
	s             *concatKEM
	pq, classical kem.PrivateKey
}

func (s *concatKEM) Name() string { return s.name }
func (s *concatKEM) PublicKeySize() int {
	return s.pq.PublicKeySize() + s.classical.PublicKeySize()
}
func (s *concatKEM) PrivateKeySize() int {
	return s.pq.PrivateKeySize() + s.classical.PrivateKeySize()
}
func (s *concatKEM) CiphertextSize() int {
	return s.pq.CiphertextSize() + s.classical.CiphertextSize()
}
func (s *concatKEM) SharedKeySize() int {
	return s.pq.SharedKeySize() + s.classical.SharedKeySize()
}
func (s *concatKEM) SeedSize() int { return 32 }
func (s *concatKEM) EncapsulationSeedSize() int {
	return 32
}

// expand splits a seed into one seed per half with SHAKE256, so that a non-uniform seed
// cannot bias one half through the other.
func expand(seed []byte, a, b int) ([]byte, []byte) {
	out := sha3.SumSHAKE256(seed, a+b)
	return out[:a], out[a:]
}

func (s *concatKEM) GenerateKeyPair() (kem.PublicKey, kem.PrivateKey, error) {
	seed := make([]byte, s.SeedSize())
	if err := readRandom(nil, seed); err != nil {
		return nil, nil, err
	}
	pk, sk := s.DeriveKeyPair(seed)
	return pk, sk, nil
}

func (s *concatKEM) DeriveKeyPair(seed []byte) (kem.PublicKey, kem.PrivateKey) {
	if len(seed) != s.SeedSize() {
		panic(kem.ErrSeedSize)
	}
	a, b := expand(seed, s.pq.SeedSize(), s.classical.SeedSize())
	pk1, sk1 := s.pq.DeriveKeyPair(a)
	pk2, sk2 := s.classical.DeriveKeyPair(b)
	return &concatPublicKey{s, pk1, pk2}, &concatPrivateKey{s, sk1, sk2}
}

func (s *concatKEM) Encapsulate(pk kem.PublicKey) (ct, ss []byte, err error) {
	seed := make([]byte, s.EncapsulationSeedSize())
	if err := readRandom(nil, seed); err != nil {
		return nil, nil, err
	}
	return s.EncapsulateDeterministically(pk, seed)
}

func (s *concatKEM) EncapsulateDeterministically(pk kem.PublicKey, seed []byte) (ct, ss []byte, err error) {
	if len(seed) != s.EncapsulationSeedSize() {
		return nil, nil, kem.ErrSeedSize
	}
	p, ok := pk.(*concatPublicKey)
	if !ok || p.s != s {
		return nil, nil, kem.ErrTypeMismatch
	}
	a, b := expand(seed, s.pq.EncapsulationSeedSize(), s.classical.EncapsulationSeedSize())
	ct1, ss1, err := s.pq.EncapsulateDeterministically(p.pq, a)
	if err != nil {
		return nil, nil, err
	}
	ct2, ss2, err := s.classical.EncapsulateDeterministically(p.classical, b)
	if err != nil {
		return nil, nil, err
	}
	return append(ct1, ct2...), append(ss1, ss2...), nil
}

func (s *concatKEM) Decapsulate(sk kem.PrivateKey, ct []byte) ([]byte, error) {
	k, ok := sk.(*concatPrivateKey)
	if !ok || k.s != s {
		return nil, kem.ErrTypeMismatch
	}
	if len(ct) != s.CiphertextSize() {
		return nil, kem.ErrCiphertextSize
	}
	n := s.pq.CiphertextSize()
	ss1, err := s.pq.Decapsulate(k.pq, ct[:n])
	if err != nil {
		return nil, err
	}
	ss2, err := s.classical.Decapsulate(k.classical, ct[n:])
	if err != nil {
		return nil, err
	}
	return append(ss1, ss2...), nil
}

func (s *concatKEM) UnmarshalBinaryPublicKey(b []byte) (kem.PublicKey, error) {
	if len(b) != s.PublicKeySize() {
		return nil, kem.ErrPubKeySize
	}
	n := s.pq.PublicKeySize()
	pk1, err := s.pq.UnmarshalBinaryPublicKey(b[:n])
	if err != nil {
		return nil, err
	}
	pk2, err := s.classical.UnmarshalBinaryPublicKey(b[n:])
	if err != nil {
		return nil, err
	}
	return &concatPublicKey{s, pk1, pk2}, nil
}

func (s *concatKEM) UnmarshalBinaryPrivateKey(b []byte) (kem.PrivateKey, error) {
	if len(b) != s.PrivateKeySize() {
		return nil, kem.ErrPrivKeySize
	}
	n := s.pq.PrivateKeySize()
	sk1, err := s.pq.UnmarshalBinaryPrivateKey(b[:n])
	if err != nil {
		return nil, err
	}
	sk2, err := s.classical.UnmarshalBinaryPrivateKey(b[n:])
	if err != nil {
		return nil, err
	}
	return &concatPrivateKey{s, sk1, sk2}, nil
}

func marshalPair(a, b interface{ MarshalBinary() ([]byte, error) }) ([]byte, error) {
	x, err := a.MarshalBinary()
	if err != nil {
		return nil, err
	}
	y, err := b.MarshalBinary()
	if err != nil {
		return nil, err
	}
	return append(x, y...), nil
}

func (k *concatPublicKey) Scheme() kem.Scheme             { return k.s }
func (k *concatPublicKey) MarshalBinary() ([]byte, error) { return marshalPair(k.pq, k.classical) }
func (k *concatPublicKey) Equal(o kem.PublicKey) bool {
	p, ok := o.(*concatPublicKey)
	return ok && p.s == k.s && k.pq.Equal(p.pq) && k.classical.Equal(p.classical)
}

func (k *concatPrivateKey) Scheme() kem.Scheme             { return k.s }
func (k *concatPrivateKey) MarshalBinary() ([]byte, error) { return marshalPair(k.pq, k.classical) }
func (k *concatPrivateKey) Public() kem.PublicKey {
	return &concatPublicKey{k.s, k.pq.Public(), k.classical.Public()}
}
func (k *concatPrivateKey) Equal(o kem.PrivateKey) bool {
	p, ok := o.(*concatPrivateKey)
	if !ok || p.s != k.s {
		return false
	}
	a, err1 := k.MarshalBinary()
	b, err2 := p.MarshalBinary()
	return err1 == nil && err2 == nil && bytes.Equal(a, b)
}
