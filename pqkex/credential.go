package pqkex

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	_ "crypto/sha512" // SHA-384 and SHA-512 for ECDSA P-384 and the high-security suite
	"encoding/binary"
	"errors"
	"hash/maphash"
	"io"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/cloudflare/circl/kem"
	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
)

const (
	credentialMagic   = "VPQC"
	credentialVersion = 1
	maxSPIFFEID       = 2048
	pqSignLabel       = labelPrefix + "credential pq"
	classicSignLabel  = labelPrefix + "credential classical"
)

// Credential certifies a workload's static hybrid KEM public key: suite, SPIFFE ID and
// validity, signed by the CA's ML-DSA-65 key and by its classical (ECDSA or Ed25519) key.
// Spec section 4.1. A Credential is immutable once parsed.
type Credential struct {
	suite     Scheme
	spiffeID  string
	notBefore time.Time
	notAfter  time.Time
	publicKey []byte

	raw          []byte
	tbs          []byte
	pqSig        []byte
	classicalSig []byte
	digest       [32]byte // SHA-256, names the credential on the wire
	hash         []byte   // H(credential) with the suite hash, for the transcript and srv (spec 5.2)

	parsedMu sync.Mutex
	parsed   map[kem.Scheme]kem.PublicKey // static public key parsed per KEM, see staticPublic
}

// Suite returns the credential's suite.
func (c *Credential) Suite() Scheme { return c.suite }

// SPIFFEID returns the workload identity the credential certifies.
func (c *Credential) SPIFFEID() string { return c.spiffeID }

// NotBefore returns the start of the validity period.
func (c *Credential) NotBefore() time.Time { return c.notBefore }

// NotAfter returns the end of the validity period (exclusive).
func (c *Credential) NotAfter() time.Time { return c.notAfter }

// PublicKey returns the static hybrid KEM public key.
func (c *Credential) PublicKey() []byte { return append([]byte(nil), c.publicKey...) }

// Bytes returns the credential's encoding.
func (c *Credential) Bytes() []byte { return append([]byte(nil), c.raw...) }

// Digest returns SHA-256 of the encoding, the credential's name in the handshake.
func (c *Credential) Digest() [32]byte { return c.digest }

func unixSeconds(t time.Time) uint64 {
	s := t.Unix()
	if s < 0 {
		return 0
	}
	return uint64(s)
}

// maxCredentialTime is 9999-12-31T23:59:59Z in Unix seconds, the latest time a
// credential may name.
const maxCredentialTime = 253402300799

func fromUnix(s uint64) time.Time {
	if s > math.MaxInt64 {
		s = math.MaxInt64
	}
	return time.Unix(int64(s), 0).UTC()
}

func marshalTBS(suite Scheme, spiffeID string, notBefore, notAfter time.Time, pk []byte) []byte {
	b := append([]byte(credentialMagic), credentialVersion)
	b = binary.BigEndian.AppendUint16(b, suite.ID())
	b = appendVec16(b, []byte(spiffeID))
	b = binary.BigEndian.AppendUint64(b, unixSeconds(notBefore))
	b = binary.BigEndian.AppendUint64(b, unixSeconds(notAfter))
	return appendVec16(b, pk)
}

func validSPIFFEID(id string) bool {
	return len(id) > len("spiffe://") && len(id) <= maxSPIFFEID && strings.HasPrefix(id, "spiffe://")
}

// IssueCredential is the CA side: it certifies staticPublicKey (from [GenerateKey]) for
// spiffeID over [notBefore, notAfter). pqCA must be an ML-DSA-65 signer (circl's
// *mldsa65.PrivateKey, or any crypto.Signer producing ML-DSA-65 signatures with an empty
// context); classicalCA must be an ECDSA P-256/P-384 or Ed25519 signer, normally the X.509 CA's
// key, so that forging a credential needs both CA keys.
func IssueCredential(pqCA, classicalCA crypto.Signer, suite Scheme, spiffeID string, notBefore, notAfter time.Time, staticPublicKey []byte) ([]byte, error) {
	if suite == nil || SchemeByID(suite.ID()) == nil {
		return nil, errors.New("pqkex: unsupported suite")
	}
	if !validSPIFFEID(spiffeID) {
		return nil, errors.New("pqkex: invalid SPIFFE ID")
	}
	if !notAfter.After(notBefore) {
		return nil, errors.New("pqkex: empty validity period")
	}
	if notBefore.Unix() < 0 || notAfter.Unix() > maxCredentialTime {
		return nil, errors.New("pqkex: validity outside 1970-9999")
	}
	if _, err := suite.UnmarshalBinaryPublicKey(staticPublicKey); err != nil {
		return nil, errors.New("pqkex: static public key does not match the suite")
	}
	if _, ok := pqCA.Public().(*mldsa65.PublicKey); !ok {
		return nil, errors.New("pqkex: post-quantum CA key is not ML-DSA-65")
	}
	if pub, ok := classicalCA.Public().(*ecdsa.PublicKey); isSM(suite) != (ok && isSM2Key(pub)) {
		return nil, errors.New("pqkex: ShangMi credentials, and only they, are signed with an SM2 classical CA key")
	}
	tbs := marshalTBS(suite, spiffeID, notBefore, notAfter, staticPublicKey)
	pqSig, err := pqCA.Sign(rand.Reader, append([]byte(pqSignLabel), tbs...), crypto.Hash(0))
	if err != nil {
		return nil, errors.New("pqkex: post-quantum CA signature failed")
	}
	clSig, err := signClassical(classicalCA, append([]byte(classicSignLabel), tbs...))
	if err != nil {
		return nil, err
	}
	out := appendVec16(tbs, pqSig)
	return appendVec16(out, clSig), nil
}

func signClassical(s crypto.Signer, msg []byte) ([]byte, error) {
	switch pub := s.Public().(type) {
	case ed25519.PublicKey:
		return s.Sign(rand.Reader, msg, crypto.Hash(0))
	case *ecdsa.PublicKey:
		if isSM2Key(pub) {
			return signSM2(s, msg)
		}
		h, ok := ecdsaHash(pub)
		if !ok {
			return nil, errors.New("pqkex: unsupported ECDSA curve")
		}
		return s.Sign(rand.Reader, digest(h, msg), h)
	default:
		return nil, errors.New("pqkex: classical CA key must be ECDSA or Ed25519")
	}
}

func ecdsaHash(pub *ecdsa.PublicKey) (crypto.Hash, bool) {
	switch pub.Curve {
	case elliptic.P256():
		return crypto.SHA256, true
	case elliptic.P384():
		return crypto.SHA384, true
	default:
		return 0, false
	}
}

// ParseCredential parses a credential's encoding. It checks the structure only; [Roots]
// verifies the signatures and validity.
func ParseCredential(b []byte) (*Credential, error) {
	p := parser{b: b}
	magic := p.take(len(credentialMagic))
	version := p.u8()
	suite := SchemeByID(p.u16())
	if p.bad || string(magic) != credentialMagic || version != credentialVersion || suite == nil {
		return nil, errMalformed
	}
	id := p.vec16()
	nb, na := p.u64(), p.u64()
	pk := p.exact16(suite.PublicKeySize())
	tbsLen := len(b) - len(p.b)
	pqSig := p.exact16(mldsa65.SignatureSize)
	clSig := p.vec16()
	// Times past the year 9999 are refused: they would not re-encode to the same bytes
	// (time.Time cannot hold every uint64 of seconds), which would make credentials
	// malleable (found by FuzzParseCredential).
	if !p.ok() || !validSPIFFEID(string(id)) || len(clSig) == 0 || nb > maxCredentialTime || na > maxCredentialTime {
		return nil, errMalformed
	}
	raw := append([]byte(nil), b...)
	c := &Credential{
		suite: suite, spiffeID: string(id), notBefore: fromUnix(nb), notAfter: fromUnix(na),
		raw: raw, tbs: raw[:tbsLen], digest: sha256.Sum256(raw),
	}
	c.hash = digest(suite.Hash(), raw)
	c.publicKey = raw[tbsLen-len(pk) : tbsLen]
	c.pqSig = raw[tbsLen+2 : tbsLen+2+len(pqSig)]
	c.classicalSig = raw[len(raw)-len(clSig):]
	return c, nil
}

// Roots are the CA public keys that certify credentials: the ML-DSA-65 key and the classical
// key (the X.509 CA's ECDSA or Ed25519 key, or for ShangMi credentials the CA's SM2 key). Both
// signatures must verify.
type Roots struct {
	// PQ is the CA's *mldsa65.PublicKey.
	PQ crypto.PublicKey
	// Classical is the CA's *ecdsa.PublicKey or ed25519.PublicKey.
	Classical crypto.PublicKey
	// SM2 is the CA's SM2 public key (an *ecdsa.PublicKey on gmsm's SM2 curve), which signs
	// the classical half of ShangMi credentials in place of Classical (spec 3.1). Nil when the
	// CA issues none.
	SM2 crypto.PublicKey
}

// Verify checks both CA signatures on c and that now lies in its validity period.
func (r Roots) Verify(c *Credential, now time.Time) error {
	if now.Before(c.notBefore) || !now.Before(c.notAfter) {
		return errCredentialTime
	}
	pq, ok := r.PQ.(*mldsa65.PublicKey)
	if !ok || !mldsa65.Verify(pq, append([]byte(pqSignLabel), c.tbs...), nil, c.pqSig) {
		return errCredential
	}
	msg := append([]byte(classicSignLabel), c.tbs...)
	if isSM(c.suite) {
		// A ShangMi credential carries an SM2 signature, checked with the CA's SM2 key (spec 3.1).
		if pub, ok := r.SM2.(*ecdsa.PublicKey); !ok || !isSM2Key(pub) || !verifySM2(pub, msg, c.classicalSig) {
			return errCredential
		}
		return nil
	}
	switch pub := r.Classical.(type) {
	case ed25519.PublicKey:
		if !ed25519.Verify(pub, msg, c.classicalSig) {
			return errCredential
		}
	case *ecdsa.PublicKey:
		h, ok := ecdsaHash(pub)
		if !ok || !ecdsa.VerifyASN1(pub, digest(h, msg), c.classicalSig) {
			return errCredential
		}
	default:
		return errCredential
	}
	return nil
}

// GenerateKey makes a static key pair for suite. It returns the public key to certify with
// [IssueCredential] and the private key to pass to [NewIdentity]; the private key must stay
// secret (store it 0600). rand may be nil for crypto/rand.
func GenerateKey(suite Scheme, rand io.Reader) (publicKey, privateKey []byte, err error) {
	seed := make([]byte, suite.SeedSize())
	if err := readRandom(rand, seed); err != nil {
		return nil, nil, err
	}
	pk, sk := suite.DeriveKeyPair(seed)
	if publicKey, err = pk.MarshalBinary(); err != nil {
		return nil, nil, err
	}
	if privateKey, err = sk.MarshalBinary(); err != nil {
		return nil, nil, err
	}
	return publicKey, privateKey, nil
}

// Identity is a workload's credential together with its static private key. It is the
// local half of authentication on both server and client.
type Identity struct {
	cred   *Credential
	priv   kem.PrivateKey
	pqPriv kem.PrivateKey // the ML-KEM half of priv, for channel-bound handshakes
}

// IdentitySource supplies the current identity; implement it to rotate credentials without
// restarting. *Identity is a static source.
type IdentitySource interface {
	GetIdentity() (*Identity, error)
}

// GetIdentity returns id itself.
func (id *Identity) GetIdentity() (*Identity, error) { return id, nil }

// Credential returns the identity's credential.
func (id *Identity) Credential() *Credential { return id.cred }

// NewIdentity pairs a credential with the static private key from [GenerateKey]. It fails if
// the key does not match the credential's public key.
func NewIdentity(credential, privateKey []byte) (*Identity, error) {
	c, err := ParseCredential(credential)
	if err != nil {
		return nil, err
	}
	sk, err := c.suite.UnmarshalBinaryPrivateKey(privateKey)
	if err != nil {
		return nil, errors.New("pqkex: private key does not match the suite")
	}
	pk, err := sk.Public().MarshalBinary()
	if err != nil || string(pk) != string(c.publicKey) {
		return nil, errors.New("pqkex: private key does not match the credential")
	}
	pq := pqHalf(c.suite)
	pqPriv, err := pq.UnmarshalBinaryPrivateKey(privateKey[:pq.PrivateKeySize()])
	if err != nil {
		return nil, errors.New("pqkex: private key does not match the suite")
	}
	return &Identity{cred: c, priv: sk, pqPriv: pqPriv}, nil
}

// Authorizer decides whether an authenticated peer SPIFFE ID may talk to us.
type Authorizer func(spiffeID string) error

// AuthorizeAny accepts any identity certified by the roots.
func AuthorizeAny() Authorizer { return func(string) error { return nil } }

// AuthorizeID accepts exactly one SPIFFE ID.
func AuthorizeID(id string) Authorizer {
	return func(got string) error {
		if got != id {
			return errIdentity
		}
		return nil
	}
}

// credCache remembers which credentials verified until they expire, so each peer's
// signatures are checked, and its credential parsed and hashed, once. Entries are found by
// a keyed non-cryptographic hash of the credential's bytes (maphash, seeded per cache) and
// used only if the bytes are equal to those that verified: a hit costs about a tenth of the
// SHA-256 of a 5.5 KB credential, and a collision, which an attacker cannot aim at without
// the seed, costs only a second verification. A changed credential (same SPIFFE ID, other
// bytes) is never served from the cache, and an expired one is refused.
type credCache struct {
	mu   sync.Mutex
	seed maphash.Seed
	m    map[uint64]*Credential
}

// maxCachedCredentials bounds a cache: a server keeps one entry per client credential
// seen in the last lifetime of the credentials.
const maxCachedCredentials = 4096

// verify parses and verifies b, using the cache.
func (cc *credCache) verify(roots Roots, b []byte, now time.Time) (*Credential, error) {
	cc.mu.Lock()
	if cc.m == nil {
		cc.seed = maphash.MakeSeed()
		cc.m = make(map[uint64]*Credential)
	}
	key := maphash.Bytes(cc.seed, b)
	c, ok := cc.m[key]
	cc.mu.Unlock()
	if ok && bytes.Equal(c.raw, b) {
		if now.Before(c.notBefore) || !now.Before(c.notAfter) {
			return nil, errCredentialTime
		}
		return c, nil
	}
	c, err := ParseCredential(b)
	if err != nil {
		return nil, err
	}
	if err := roots.Verify(c, now); err != nil {
		return nil, err
	}
	cc.mu.Lock()
	cc.bound(now)
	cc.m[key] = c
	cc.mu.Unlock()
	return c, nil
}

// bound makes room for one more entry: it drops the credentials that expired and, if that
// is not enough, arbitrary ones (map order) down to three quarters of the bound. The caller
// holds mu.
func (cc *credCache) bound(now time.Time) {
	if len(cc.m) < maxCachedCredentials {
		return
	}
	for k, c := range cc.m {
		if !now.Before(c.notAfter) {
			delete(cc.m, k)
		}
	}
	for k := range cc.m {
		if len(cc.m) < maxCachedCredentials*3/4 {
			return
		}
		delete(cc.m, k)
	}
}

// len returns the number of cached credentials.
func (cc *credCache) len() int {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return len(cc.m)
}
