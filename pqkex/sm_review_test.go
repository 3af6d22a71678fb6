package pqkex

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"io"
	"math/big"
	"net/http"
	"testing"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/emmansun/gmsm/sm2"
)

// The SM2 half of the KEM refuses, as public key and as ciphertext, every point encoding but
// the canonical uncompressed one of a point on the curve (spec 3.1): the identity, a
// compressed or hybrid prefix, a point off the curve (the invalid-curve attack), and a
// coordinate given as itself plus p. (0, sqrt(b)) is on curveSM2, so x = p is the
// non-canonical spelling of a valid point, not merely an off-curve one.
func TestSM2KEMRefusesNonCanonicalAndInvalidPoints(t *testing.T) {
	p, _ := new(big.Int).SetString("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF", 16)
	b, _ := new(big.Int).SetString("28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93", 16)
	y := new(big.Int).Exp(b, new(big.Int).Rsh(new(big.Int).Add(p, big.NewInt(1)), 2), p)
	if new(big.Int).Exp(y, big.NewInt(2), p).Cmp(b) != 0 {
		t.Fatal("b is not a square mod p: the test's point does not exist")
	}
	point := func(x, y *big.Int) []byte {
		out := []byte{4}
		out = append(out, x.FillBytes(make([]byte, 32))...)
		return append(out, y.FillBytes(make([]byte, 32))...)
	}
	k := sm2KEM{}
	pk, sk := k.DeriveKeyPair(bytes.Repeat([]byte{7}, 32))
	valid, _, err := k.EncapsulateDeterministically(pk, bytes.Repeat([]byte{8}, 32))
	if err != nil {
		t.Fatal(err)
	}
	zeroX := point(new(big.Int), y)
	if _, err := k.UnmarshalBinaryPublicKey(zeroX); err != nil {
		t.Fatalf("(0, sqrt(b)) is on the curve but refused: %v", err)
	}
	if _, err := k.Decapsulate(sk, zeroX); err != nil {
		t.Fatalf("(0, sqrt(b)) does not decapsulate: %v", err)
	}
	offCurve := bytes.Clone(valid)
	offCurve[64] ^= 1
	compressed := append([]byte{2 | valid[64]&1}, valid[1:33]...)
	hybrid := bytes.Clone(valid)
	hybrid[0] = 6 | valid[64]&1
	for name, enc := range map[string][]byte{
		"identity (one zero byte)":    {0},
		"identity (65 zero bytes)":    make([]byte, 65),
		"04 and zeros":                append([]byte{4}, make([]byte, 64)...),
		"off the curve":               offCurve,
		"compressed":                  compressed,
		"compressed, padded to 65":    append(bytes.Clone(compressed), make([]byte, 32)...),
		"hybrid prefix":               hybrid,
		"x = p (non-canonical x = 0)": point(p, y),
		"y = p (out of range)":        point(new(big.Int), new(big.Int).Add(p, big.NewInt(0))),
		"trailing byte":               append(bytes.Clone(valid), 0),
		"truncated":                   valid[:64],
	} {
		if _, err := k.UnmarshalBinaryPublicKey(enc); err == nil {
			t.Errorf("%s: accepted as a public key", name)
		}
		if ss, err := k.Decapsulate(sk, enc); err == nil {
			t.Errorf("%s: decapsulated to %x", name, ss)
		}
	}
}

// SM4-GCM as the sealing AEAD takes 16-byte keys only, and uses 12-byte nonces and 16-byte
// tags (spec 3.1): a truncated, extended or flipped tag does not open.
func TestSM4GCMKeyNonceTag(t *testing.T) {
	if _, err := SM4GCM.new(make([]byte, 32)); err == nil {
		t.Error("SM4-GCM accepted a 32-byte key")
	}
	if SM4GCM.keySize() != 16 {
		t.Errorf("SM4-GCM key size %d", SM4GCM.keySize())
	}
	a, err := SM4GCM.new(bytes.Repeat([]byte{1}, 16))
	if err != nil {
		t.Fatal(err)
	}
	if a.NonceSize() != aeadNonceSize || a.Overhead() != aeadTagSize {
		t.Fatalf("nonce %d, tag %d", a.NonceSize(), a.Overhead())
	}
	nonce := make([]byte, aeadNonceSize)
	ct := a.Seal(nil, nonce, []byte("sealed"), []byte("aad"))
	flipped := bytes.Clone(ct)
	flipped[len(flipped)-1] ^= 1
	for name, c := range map[string][]byte{"truncated tag": ct[:len(ct)-1], "extended": append(bytes.Clone(ct), 0), "flipped tag": flipped, "no tag": ct[:len(ct)-aeadTagSize]} {
		if _, err := a.Open(nil, nonce, c, []byte("aad")); err == nil {
			t.Errorf("%s opened", name)
		}
	}
	other := make([]byte, aeadNonceSize)
	other[11] = 1
	if _, err := a.Open(nil, other, ct, []byte("aad")); err == nil {
		t.Error("opened with the wrong nonce")
	}
}

// A ShangMi credential whose SM2 signature is stripped and replaced by a valid signature of
// the X.509 CA's classical key (or by nothing) is refused by roots that hold both keys: the
// suite, which the ML-DSA signature covers, picks the SM2 key, so the classical half cannot
// be moved to another algorithm (spec 3.1, 4.1). A default-suite credential is likewise
// never checked with the SM2 key, even when Classical is (mis)set to it.
func TestShangMiCredentialSignatureStripping(t *testing.T) {
	_, pq, err := mldsa65.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	smCA, err := sm2.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ecCA, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	pub, _, err := GenerateKey(SM2MLKEM768(), nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := IssueCredential(pq, smCA, SM2MLKEM768(), "spiffe://example.org/sm", now.Add(-time.Hour), now.Add(time.Hour), pub)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseCredential(raw)
	if err != nil {
		t.Fatal(err)
	}
	roots := Roots{PQ: pq.Public(), Classical: &ecCA.PublicKey, SM2: &smCA.PublicKey}
	if err := roots.Verify(c, now); err != nil {
		t.Fatal(err)
	}
	ecSig, err := signClassical(ecCA, append([]byte(classicSignLabel), c.tbs...))
	if err != nil {
		t.Fatal(err)
	}
	for name, sig := range map[string][]byte{"ECDSA P-256 signature": ecSig, "empty signature": {}} {
		forged := appendVec16(appendVec16(bytes.Clone(c.tbs), c.pqSig), sig)
		fc, err := ParseCredential(forged)
		if err != nil {
			continue // refused at parsing: as good
		}
		if err := roots.Verify(fc, now); err == nil || reasonOf(err) != reasonCredential {
			t.Errorf("%s in place of the SM2 one: %v", name, err)
		}
	}
	// A default-suite credential signed with the X.509 key does not verify when Classical is
	// the SM2 key: SM2 is no classical algorithm of the other suites.
	xpub, _, _ := GenerateKey(X25519MLKEM768(), nil)
	xraw, err := IssueCredential(pq, ecCA, X25519MLKEM768(), "spiffe://example.org/x", now.Add(-time.Hour), now.Add(time.Hour), xpub)
	if err != nil {
		t.Fatal(err)
	}
	xc, err := ParseCredential(xraw)
	if err != nil {
		t.Fatal(err)
	}
	smSig, err := signSM2(smCA, append([]byte(classicSignLabel), xc.tbs...))
	if err != nil {
		t.Fatal(err)
	}
	forged := appendVec16(appendVec16(bytes.Clone(xc.tbs), xc.pqSig), smSig)
	if fc, err := ParseCredential(forged); err == nil {
		for _, r := range []Roots{roots, {PQ: pq.Public(), Classical: &smCA.PublicKey, SM2: &smCA.PublicKey}} {
			if err := r.Verify(fc, now); err == nil {
				t.Errorf("default-suite credential with an SM2 signature verified under %v", r)
			}
		}
	}
}

// FuzzVerifySM2Signature feeds arbitrary bytes as the SM2 signature of a ShangMi credential
// to Roots.Verify with a real SM2 CA key (FuzzParseCredential's empty Roots stop before the
// SM2 check), and to ParseSM2PublicKey: neither panics, and only an SM2 signature of the
// CA's key verifies.
func FuzzVerifySM2Signature(f *testing.F) {
	pq, smCA, _, c := newSM2Credential(f)
	now := time.Now()
	roots := Roots{PQ: pq.Public(), SM2: &smCA.PublicKey}
	f.Add(c.classicalSig)
	f.Add([]byte{0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00})
	f.Add(append([]byte{4}, make([]byte, 64)...))
	f.Fuzz(func(t *testing.T, sig []byte) {
		forged := appendVec16(appendVec16(bytes.Clone(c.tbs), c.pqSig), sig)
		if fc, err := ParseCredential(forged); err == nil {
			// What verifies is an SM2 signature of the CA's, as gmsm checks it with the
			// default user ID given explicitly.
			if roots.Verify(fc, now) == nil && !sm2.VerifyASN1WithSM2(&smCA.PublicKey, []byte("1234567812345678"), append([]byte(classicSignLabel), c.tbs...), sig) {
				t.Fatalf("signature %x verified", sig)
			}
		}
		if k, err := ParseSM2PublicKey(sig); err == nil && k == nil {
			t.Fatal("nil key without an error")
		}
	})
}

// FuzzServerHandshakeSM is FuzzServerHandshake with the ShangMi vector's server: the
// other target's server is of the first vector's suite, so a ShangMi hello stops there at
// the suite check and the SM2 half of the ciphertext and ephemeral key, split out by
// concatKEM, never reaches gmsm.
func FuzzServerHandshakeSM(f *testing.F) {
	var sm []katVector
	for _, v := range loadKAT(f) {
		if v.Suite == SM2MLKEM768().Name() {
			sm = append(sm, v)
		}
	}
	if len(sm) == 0 {
		f.Fatal("no ShangMi known-answer vector")
	}
	for _, v := range sm {
		f.Add([]byte(v.ClientHello))
	}
	s := katServer(f, sm[0])
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := http.NewRequest(http.MethodPost, HandshakePath, io.NopCloser(bytes.NewReader(b)))
		if err != nil {
			t.Fatal(err)
		}
		out, err := s.handshake(r)
		if err == nil && len(out) == 0 {
			t.Fatal("handshake succeeded without a server hello")
		}
	})
}
