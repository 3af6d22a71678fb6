package analytics

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
)

// ErrUntrustedStudy is returned by Owner.Submit when a study's analyst signature does
// not verify: the study (or its public key) is not what the expected analyst signed,
// for example because the server substituted its own key.
var ErrUntrustedStudy = errors.New("analytics: study not signed by a trusted analyst")

// PublicKeyHash returns SHA-256 over a public key's parameter ID and both
// polynomials, each length-prefixed: what an analyst's signature binds.
func PublicKeyHash(pk *hev1.PublicKey) [32]byte {
	var b []byte
	b = appendField(b, []byte(pk.GetParamId()))
	b = appendField(b, pk.GetB())
	b = appendField(b, pk.GetA())
	return sha256.Sum256(b)
}

func appendField(b, f []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(len(f)))
	return append(b, f...)
}

func appendUint(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }

// studyStatement returns the bytes an analyst signs for a study: a domain label, then
// length-prefixed: study ID, analyst SPIFFE ID, parameter ID, public-key hash, the owner
// patterns, dimension, covariance, histogram edges, min owners, max submissions per
// owner and the ranges (docs/services.md).
func studyStatement(m *analyticsv1.Study) []byte {
	b := []byte("veil-analytics-study-v1\x00")
	b = appendField(b, []byte(m.GetStudyId()))
	b = appendField(b, []byte(m.GetAnalyst()))
	// A committee study's public key is the collective key, which exists only after
	// every member has joined: the analyst signs the reader key (and, below, the
	// committee) instead, and owners check the collective key against the members'
	// signed shares (VerifyCommittee).
	key := m.GetPublicKey()
	if c := m.GetCommittee(); c != nil {
		key = c.GetReaderKey()
	}
	b = appendField(b, []byte(key.GetParamId()))
	h := PublicKeyHash(key)
	b = appendField(b, h[:])
	b = appendUint(b, uint64(len(m.GetOwnerPatterns())))
	for _, p := range m.GetOwnerPatterns() {
		b = appendField(b, []byte(p))
	}
	b = appendUint(b, uint64(m.GetDimension()))
	cov := uint64(0)
	if m.GetCovariance() {
		cov = 1
	}
	b = appendUint(b, cov)
	b = appendUint(b, uint64(len(m.GetHistogramEdges())))
	for _, e := range m.GetHistogramEdges() {
		b = appendUint(b, math.Float64bits(e))
	}
	b = appendUint(b, uint64(m.GetMinOwners()))
	b = appendUint(b, uint64(m.GetMaxSubmissionsPerOwner()))
	b = appendUint(b, uint64(len(m.GetRanges())))
	for _, r := range m.GetRanges() {
		b = appendUint(b, math.Float64bits(r.GetMin()))
		b = appendUint(b, math.Float64bits(r.GetMax()))
	}
	if c := m.GetCommittee(); c != nil {
		b = appendField(b, []byte("committee"))
		b = appendUint(b, uint64(len(c.GetMembers())))
		for _, id := range c.GetMembers() {
			b = appendField(b, []byte(id))
		}
		b = appendUint(b, uint64(c.GetThreshold()))
	}
	if p := m.GetPrivacy(); p != nil {
		b = appendField(b, []byte("privacy"))
		b = appendUint(b, math.Float64bits(p.GetEpsilon()))
		b = appendUint(b, math.Float64bits(p.GetEpsilonPerRelease()))
	}
	return b
}

// signatureAlgorithm returns how a key of pub's type signs statements.
func signatureAlgorithm(pub crypto.PublicKey) (x509.SignatureAlgorithm, crypto.Hash, error) {
	switch pub.(type) {
	case *ecdsa.PublicKey:
		return x509.ECDSAWithSHA256, crypto.SHA256, nil
	case ed25519.PublicKey:
		return x509.PureEd25519, 0, nil
	case *rsa.PublicKey:
		return x509.SHA256WithRSA, crypto.SHA256, nil
	default:
		return 0, 0, fmt.Errorf("analytics: unsupported SVID key type %T", pub)
	}
}

// signStudy sets m.AnalystSignature with svid's key. m.Analyst must be svid's ID.
func signStudy(m *analyticsv1.Study, svid *x509svid.SVID) error {
	chain, sig, err := signStatement(studyStatement(m), svid)
	if err != nil {
		return err
	}
	m.AnalystSignature = &analyticsv1.AnalystSignature{Chain: chain, Signature: sig}
	return nil
}

// signStatement signs msg with svid's key: the chain (DER, leaf first) and the
// signature (ECDSA ASN.1 over SHA-256, Ed25519, or RSA PKCS#1 v1.5 over SHA-256).
func signStatement(msg []byte, svid *x509svid.SVID) (chain [][]byte, sig []byte, err error) {
	if svid == nil || len(svid.Certificates) == 0 || svid.PrivateKey == nil {
		return nil, nil, errors.New("analytics: signing needs an X.509-SVID")
	}
	_, hash, err := signatureAlgorithm(svid.Certificates[0].PublicKey)
	if err != nil {
		return nil, nil, err
	}
	digest := msg
	if hash != 0 {
		d := sha256.Sum256(msg)
		digest = d[:]
	}
	if sig, err = svid.PrivateKey.Sign(rand.Reader, digest, hash); err != nil {
		return nil, nil, errors.New("analytics: signing failed")
	}
	chain = make([][]byte, len(svid.Certificates))
	for i, c := range svid.Certificates {
		chain[i] = c.Raw
	}
	return chain, sig, nil
}

// VerifyStudy checks a study's analyst signature: the chain verifies to bundle as an
// X.509-SVID whose ID is the study's analyst and is accepted by analyst, and its leaf
// signed the study's statement. Any failure wraps ErrUntrustedStudy.
func VerifyStudy(m *analyticsv1.Study, bundle x509bundle.Source, analyst spiffeid.Matcher) error {
	sig := m.GetAnalystSignature()
	if sig == nil {
		return fmt.Errorf("%w: study %q carries no signature", ErrUntrustedStudy, m.GetStudyId())
	}
	id, err := verifyStatement(sig.GetChain(), sig.GetSignature(), studyStatement(m), bundle)
	if err != nil {
		return err
	}
	if id.String() != m.GetAnalyst() {
		return fmt.Errorf("%w: signed by %s, the study names %s", ErrUntrustedStudy, id, m.GetAnalyst())
	}
	if analyst == nil {
		return fmt.Errorf("%w: no expected analyst", ErrUntrustedStudy)
	}
	if err := analyst(id); err != nil {
		return fmt.Errorf("%w: %s is not an expected analyst", ErrUntrustedStudy, id)
	}
	return nil
}

// verifyStatement checks that chainDER verifies to bundle as an X.509-SVID whose leaf
// signed msg, and returns its SPIFFE ID. With a nil bundle only the leaf's signature
// and ID are checked (the server, which trusts the transport's verified caller
// instead). Any failure wraps ErrUntrustedStudy.
func verifyStatement(chainDER [][]byte, sig, msg []byte, bundle x509bundle.Source) (spiffeid.ID, error) {
	chain := make([]*x509.Certificate, 0, len(chainDER))
	for _, der := range chainDER {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return spiffeid.ID{}, fmt.Errorf("%w: bad certificate in the chain", ErrUntrustedStudy)
		}
		chain = append(chain, c)
	}
	if len(chain) == 0 {
		return spiffeid.ID{}, fmt.Errorf("%w: empty chain", ErrUntrustedStudy)
	}
	var id spiffeid.ID
	var err error
	if bundle != nil {
		id, _, err = x509svid.Verify(chain, bundle)
	} else {
		id, err = x509svid.IDFromCert(chain[0])
	}
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: chain: %v", ErrUntrustedStudy, err)
	}
	alg, _, err := signatureAlgorithm(chain[0].PublicKey)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: %v", ErrUntrustedStudy, err)
	}
	if err := chain[0].CheckSignature(alg, msg, sig); err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: the signature does not match the statement", ErrUntrustedStudy)
	}
	return id, nil
}
