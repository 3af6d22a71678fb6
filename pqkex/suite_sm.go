package pqkex

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha3"
	"errors"
	"hash"
	"slices"
	"strings"

	"connectrpc.com/connect"
	"github.com/cloudflare/circl/kem"
	"github.com/cloudflare/circl/kem/mlkem/mlkem768"
	"github.com/emmansun/gmsm/ecdh"
	"github.com/emmansun/gmsm/sm2"
	"github.com/emmansun/gmsm/sm3"
)

// Hash is a suite's transcript and HKDF hash (spec 3). The SHA-2 suites use crypto.Hash
// values, which are Hashes; the ShangMi suite uses SM3, which crypto.Hash cannot name.
type Hash interface {
	New() hash.Hash
	Size() int
	String() string
}

// sm3Hash is SM3 (GB/T 32905-2016), emmansun/gmsm's implementation.
type sm3Hash struct{}

func (sm3Hash) New() hash.Hash { return sm3.New() }
func (sm3Hash) Size() int      { return sm3.Size }
func (sm3Hash) String() string { return "SM3" }

// suiteSM2MLKEM768 is the ShangMi suite's wire identifier (spec 3.1).
const suiteSM2MLKEM768 uint16 = 0x0003

var sm2MLKEM768 = &suite{
	Scheme: &concatKEM{name: "SM2MLKEM768", pq: mlkem768.Scheme(), classical: sm2KEM{}},
	name:   "SM2MLKEM768-SM3", id: suiteSM2MLKEM768, hash: sm3Hash{}, pq: mlkem768.Scheme(),
}

// SM2MLKEM768 returns the ShangMi suite (spec 3.1): ML-KEM-768 concatenated with ECDH on the
// SM2 curve (curveSM2 of RFC 8998), with SM3 for the transcript and HKDF. Its sessions seal
// with [SM4GCM], and its credentials carry an SM2 signature (GB/T 32918.2, default user ID)
// beside the ML-DSA-65 one.
func SM2MLKEM768() Scheme { return sm2MLKEM768 }

// isSM reports whether s is the ShangMi suite.
func isSM(s Scheme) bool { return s != nil && s.ID() == suiteSM2MLKEM768 }

// fullHybridOnly reports whether both halves of s's KEM must contribute to every secret,
// channel binding or not (spec 5.3): the high-security suite and the ShangMi suite, whose
// classical half is what a compliance assessment asks for.
func fullHybridOnly(s Scheme) bool {
	return s.ID() == suiteX448MLKEM1024 || isSM(s)
}

// aeadFits reports whether a session of suite may use AEAD a: SM4-GCM with the ShangMi suite
// and only there (spec 3.1).
func aeadFits(s Scheme, a AEAD) bool { return isSM(s) == (a.id() == uint16(SM4GCM)) }

// aeadFor is the AEAD a client proposes for suite: SM4-GCM for the ShangMi suite, otherwise
// the configured one.
func aeadFor(s Scheme, a AEAD) AEAD {
	if isSM(s) {
		return SM4GCM
	}
	return AEAD(a.id())
}

// sm2KEM is a KEM from ECDH on the SM2 curve (gmsm's ecdh.P256): a public key and a
// ciphertext are uncompressed points (65 bytes), the shared secret is the x-coordinate of the
// product (32 bytes), as curveSM2 key shares in RFC 8998. Like X25519 in the default suite, it
// is only used as half of a hybrid whose transcript covers both keys and the ciphertext.
type sm2KEM struct{}

type sm2PublicKey struct{ k *ecdh.PublicKey }
type sm2PrivateKey struct{ k *ecdh.PrivateKey }

const (
	sm2PointSize  = 65
	sm2ScalarSize = 32
)

func (sm2KEM) Name() string               { return "SM2-ECDH" }
func (sm2KEM) PublicKeySize() int         { return sm2PointSize }
func (sm2KEM) PrivateKeySize() int        { return sm2ScalarSize }
func (sm2KEM) CiphertextSize() int        { return sm2PointSize }
func (sm2KEM) SharedKeySize() int         { return sm2ScalarSize }
func (sm2KEM) SeedSize() int              { return 32 }
func (sm2KEM) EncapsulationSeedSize() int { return 32 }

// sm2Scalar derives a private key from seed: the first 32-byte block of SHAKE256(seed) that
// gmsm accepts as a scalar (1 <= d <= n-2, GB/T 32918.1). A block is refused with
// probability about 2^-32.
func sm2Scalar(seed []byte) *ecdh.PrivateKey {
	x := sha3.NewSHAKE256()
	x.Write(seed)
	var b [sm2ScalarSize]byte
	for {
		x.Read(b[:])
		if k, err := ecdh.P256().NewPrivateKey(b[:]); err == nil {
			clear(b[:])
			return k
		}
	}
}

func (s sm2KEM) GenerateKeyPair() (kem.PublicKey, kem.PrivateKey, error) {
	seed := make([]byte, s.SeedSize())
	if err := readRandom(nil, seed); err != nil {
		return nil, nil, err
	}
	pk, sk := s.DeriveKeyPair(seed)
	return pk, sk, nil
}

func (s sm2KEM) DeriveKeyPair(seed []byte) (kem.PublicKey, kem.PrivateKey) {
	if len(seed) != s.SeedSize() {
		panic(kem.ErrSeedSize)
	}
	k := sm2Scalar(seed)
	return sm2PublicKey{k.PublicKey()}, sm2PrivateKey{k}
}

func (s sm2KEM) Encapsulate(pk kem.PublicKey) (ct, ss []byte, err error) {
	seed := make([]byte, s.EncapsulationSeedSize())
	if err := readRandom(nil, seed); err != nil {
		return nil, nil, err
	}
	return s.EncapsulateDeterministically(pk, seed)
}

func (s sm2KEM) EncapsulateDeterministically(pk kem.PublicKey, seed []byte) (ct, ss []byte, err error) {
	if len(seed) != s.EncapsulationSeedSize() {
		return nil, nil, kem.ErrSeedSize
	}
	p, ok := pk.(sm2PublicKey)
	if !ok {
		return nil, nil, kem.ErrTypeMismatch
	}
	eph := sm2Scalar(seed)
	if ss, err = eph.ECDH(p.k); err != nil {
		return nil, nil, err
	}
	return eph.PublicKey().Bytes(), ss, nil
}

func (s sm2KEM) Decapsulate(sk kem.PrivateKey, ct []byte) ([]byte, error) {
	k, ok := sk.(sm2PrivateKey)
	if !ok {
		return nil, kem.ErrTypeMismatch
	}
	if len(ct) != sm2PointSize {
		return nil, kem.ErrCiphertextSize
	}
	eph, err := ecdh.P256().NewPublicKey(ct)
	if err != nil {
		return nil, err
	}
	return k.k.ECDH(eph)
}

func (s sm2KEM) UnmarshalBinaryPublicKey(b []byte) (kem.PublicKey, error) {
	if len(b) != sm2PointSize {
		return nil, kem.ErrPubKeySize
	}
	k, err := ecdh.P256().NewPublicKey(b)
	if err != nil {
		return nil, err
	}
	return sm2PublicKey{k}, nil
}

func (s sm2KEM) UnmarshalBinaryPrivateKey(b []byte) (kem.PrivateKey, error) {
	if len(b) != sm2ScalarSize {
		return nil, kem.ErrPrivKeySize
	}
	k, err := ecdh.P256().NewPrivateKey(b)
	if err != nil {
		return nil, err
	}
	return sm2PrivateKey{k}, nil
}

func (k sm2PublicKey) Scheme() kem.Scheme             { return sm2KEM{} }
func (k sm2PublicKey) MarshalBinary() ([]byte, error) { return k.k.Bytes(), nil }
func (k sm2PublicKey) Equal(o kem.PublicKey) bool {
	p, ok := o.(sm2PublicKey)
	return ok && k.k.Equal(p.k)
}

func (k sm2PrivateKey) Scheme() kem.Scheme             { return sm2KEM{} }
func (k sm2PrivateKey) MarshalBinary() ([]byte, error) { return k.k.Bytes(), nil }
func (k sm2PrivateKey) Public() kem.PublicKey          { return sm2PublicKey{k.k.PublicKey()} }
func (k sm2PrivateKey) Equal(o kem.PrivateKey) bool {
	p, ok := o.(sm2PrivateKey)
	return ok && k.k.Equal(p.k)
}

// isSM2Key reports whether pub is an SM2 public key (on gmsm's SM2 curve).
func isSM2Key(pub *ecdsa.PublicKey) bool { return sm2.IsSM2PublicKey(pub) }

// signSM2 makes the SM2 credential signature (spec 3.1): GB/T 32918.2 with SM3 over
// Z_A ‖ msg, Z_A with the default user ID "1234567812345678", DER-encoded (r, s).
// The signer receives the message itself, with gmsm's sm2.DefaultSM2SignerOpts.
func signSM2(s crypto.Signer, msg []byte) ([]byte, error) {
	return s.Sign(rand.Reader, msg, sm2.DefaultSM2SignerOpts)
}

// verifySM2 checks an SM2 credential signature made by signSM2's rule.
func verifySM2(pub *ecdsa.PublicKey, msg, sig []byte) bool {
	return sm2.VerifyASN1WithSM2(pub, nil, msg, sig)
}

// reasonSuitePolicy is the refusal of a suite that the local policy ([RequireSuites]) does
// not allow (spec 3.1, 9): a server's refusal of a hello, or a client's of a server or of its
// own identity.
const reasonSuitePolicy reason = "suite_policy"

func init() { reasonCodes[reasonSuitePolicy] = connect.CodePermissionDenied }

// RequireSuites restricts the suites a server accepts and a client uses to suites (spec 3.1):
// a server refuses a ClientHello of any other suite with reason suite_policy (counted in
// veil_pqkex_rejections_total), and a client refuses, with the same reason and without
// sending a hello, a server credential or its own identity of another suite. With the ShangMi
// suite alone it is the compliance mode of docs/compliance.md. A server with a policy also
// refuses plaintext calls (no_session) to procedures whose mode is [Permissive], and sealed
// calls whose ticket is of another suite. Without it, every suite is allowed (each side
// still speaks only the suite of its identity).
func RequireSuites(suites ...Scheme) Option {
	ids := make([]uint16, 0, len(suites))
	for _, s := range suites {
		if s != nil {
			ids = append(ids, s.ID())
		}
	}
	return option(func(c *config) { c.suites, c.suitesSet = ids, true })
}

// checkSuites validates a RequireSuites option: at least one suite, all known.
func (c *config) checkSuites() error {
	if !c.suitesSet {
		return nil
	}
	if len(c.suites) == 0 {
		return errors.New("pqkex: RequireSuites needs at least one suite")
	}
	for _, id := range c.suites {
		if SchemeByID(id) == nil {
			return errors.New("pqkex: RequireSuites names an unsupported suite")
		}
	}
	return nil
}

// allowsSuite reports whether the policy allows s.
func (c *config) allowsSuite(s Scheme) bool {
	return !c.suitesSet || slices.Contains(c.suites, s.ID())
}

// errSuitePolicy is the refusal of suite s under c's policy; the message names both.
func (c *config) errSuitePolicy(s Scheme, what string) *reasonError {
	names := make([]string, 0, len(c.suites))
	for _, id := range c.suites {
		names = append(names, SchemeByID(id).Name())
	}
	return newError(reasonSuitePolicy, what+" suite "+s.Name()+" refused by policy: only "+strings.Join(names, ", ")+" allowed")
}

// ParseSM2PublicKey reads a CA's SM2 public key, an uncompressed point (as `veil ca init
// --sm2` writes root-sm2.pub), for [Roots].SM2.
func ParseSM2PublicKey(b []byte) (crypto.PublicKey, error) {
	if len(b) != sm2PointSize {
		return nil, errors.New("pqkex: not an uncompressed SM2 public key")
	}
	k, err := sm2.NewPublicKey(b)
	if err != nil {
		return nil, errors.New("pqkex: not an SM2 public key")
	}
	return k, nil
}
