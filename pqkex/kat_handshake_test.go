package pqkex

import (
	"bytes"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/mlkem"
	"crypto/sha3"
	"encoding/binary"
	"testing"

	gmecdh "github.com/emmansun/gmsm/ecdh"
)

// TestKnownAnswerHandshakesIndependently recomputes the handshake of every
// X25519MLKEM768-SHA256 vector from docs/pqkex.md with the standard library alone
// (crypto/mlkem, crypto/ecdh, crypto/sha3, crypto/hkdf, crypto/hmac) and none of pqkex's
// code: it derives the key pairs from the vector's seeds (spec 3: the hybrid seed expands
// with SHAKE256 into the ML-KEM-768 seed and the X25519 seed, which expands with SHAKE256
// into the scalar), parses both hellos as spec 5.1 lays them out, decapsulates ct_s, ct_e
// and ct_c, and computes th, the session secret, the session ID and the confirmation tag as
// spec 5.2 does, byte for byte against the vector. With TestKnownAnswerBodiesIndependently,
// which opens the vector's sealed call from the session secret, one full handshake and one
// sealed call are checked against the spec. The ShangMi vectors are recomputed the same way
// with gmsm's SM2 ECDH and SM3 in place of X25519 and SHA-256 (spec 3.1). (The X448 suite is
// not: the standard library has no X448.)
func TestKnownAnswerHandshakesIndependently(t *testing.T) {
	checked, checkedSM := 0, 0
	for i, v := range loadKAT(t) {
		var suiteID uint16
		hybrid := refHybridKey
		switch v.Suite {
		case "X25519MLKEM768-SHA256":
			suiteID = 0x0001
		case "SM2MLKEM768-SM3":
			suiteID, hybrid = 0x0003, refSMKey
			checkedSM++
		default:
			continue
		}
		checked++
		h := refHasherFor(v.Suite)
		ch := refParseClientHello(t, v.ClientHello)
		sh := refParseServerHello(t, v.ServerHello, h.Size())
		if ch.suite != suiteID || sh.suite != ch.suite || sh.aead != ch.aead {
			t.Fatalf("vector %d: suite %#x/%#x, aead %#x/%#x", i, ch.suite, sh.suite, ch.aead, sh.aead)
		}
		pqOnly := ch.flags&0x02 != 0 // ML-KEM halves only (spec 5.1 flags bit 1)
		server := hybrid(t, v.ServerKeySeed)
		client := hybrid(t, v.ClientKeySeed)
		ssS := server.decap(t, ch.ctS, pqOnly)
		ssC := client.decap(t, sh.ctC, pqOnly)
		ikm := append([]byte(nil), ssS...)
		if ch.flags&0x04 == 0 {
			var eph refKey
			if pqOnly {
				eph = refMLKEMKey(t, v.EphemeralSeed)
			} else {
				eph = hybrid(t, v.EphemeralSeed)
			}
			if !bytes.Equal(eph.public(pqOnly), ch.ephemeralPK) {
				t.Fatalf("vector %d: the ephemeral seed does not give the hello's ephemeral_pk", i)
			}
			ikm = append(ikm, eph.decap(t, sh.ctE, pqOnly)...)
		} else if len(ch.ephemeralPK) != 0 || len(sh.ctE) != 0 {
			t.Fatalf("vector %d: flags bit 2 with an ephemeral key or ciphertext", i)
		}
		ikm = append(ikm, ssC...)

		// CH': the client credential replaced by H(client_credential) (its u16 length is then
		// Nh), server_credential_digest by H(server_credential).
		sum := func(parts ...[]byte) []byte {
			d := h.New()
			for _, p := range parts {
				d.Write(p)
			}
			return d.Sum(nil)
		}
		chT := append([]byte(nil), v.ClientHello[:ch.digestAt]...)
		chT = append(chT, sum(v.ServerCredential)...)
		chT = append(chT, v.ClientHello[ch.digestAt+32:ch.credentialAt]...)
		chT = binary.BigEndian.AppendUint16(chT, uint16(h.Size()))
		chT = append(chT, sum(v.ClientCredential)...)
		if !bytes.Equal(v.ClientHello[ch.credentialAt+2:], v.ClientCredential) {
			t.Fatalf("vector %d: the hello does not end with the client credential", i)
		}
		th := sum(chT, v.ServerHello[:sh.keysEnd])
		prk, err := hkdf.Extract(h.New, ikm, v.Bind)
		if err != nil {
			t.Fatal(err)
		}
		session := refExpandLabel(h, prk, "session", th, h.Size())
		sid := refExpandLabel(h, prk, "session id", th, 16)
		ck := refExpandLabel(h, prk, "confirm", th, h.Size())
		m := hmac.New(h.New, ck)
		m.Write(sum(chT, v.ServerHello[:len(v.ServerHello)-h.Size()]))
		if !bytes.Equal(session, v.Session) {
			t.Errorf("vector %d: session secret %x, the vector's %x", i, session, []byte(v.Session))
		}
		if !bytes.Equal(sid, v.SessionID) {
			t.Errorf("vector %d: session ID %x, the vector's %x", i, sid, []byte(v.SessionID))
		}
		if !bytes.Equal(m.Sum(nil), sh.confirm) {
			t.Errorf("vector %d: the ServerHello's confirm is not HMAC(ck, H(CH' ‖ SH without confirm))", i)
		}
	}
	if checked-checkedSM < 2 || checkedSM < 2 {
		t.Fatalf("%d X25519MLKEM768 and %d SM2MLKEM768 vectors checked, want the bound and the unbound ones of each", checked-checkedSM, checkedSM)
	}
}

// refClientHello is a ClientHello parsed as spec 5.1 lays it out.
type refClientHello struct {
	suite, aead            uint16
	flags                  byte
	ephemeralPK, ctS       []byte
	digestAt, credentialAt int // offsets of server_credential_digest and client_credential's u16 length
}

func refParseClientHello(t *testing.T, b []byte) refClientHello {
	t.Helper()
	var m refClientHello
	r := &refReader{t: t, what: "ClientHello", b: b}
	take, vec16 := r.take, r.vec16
	if hdr := take(2); hdr[0] != 2 || hdr[1] != 1 {
		t.Fatalf("ClientHello version %d type %d", hdr[0], hdr[1])
	}
	take(int(take(1)[0]))     // versions
	take(2 * int(take(1)[0])) // suites
	m.suite, m.aead = binary.BigEndian.Uint16(take(2)), binary.BigEndian.Uint16(take(2))
	m.flags = take(1)[0]
	take(32) // client_random
	m.digestAt = r.at
	take(32)
	m.ephemeralPK, m.ctS = vec16(), vec16()
	m.credentialAt = r.at
	vec16()
	if r.at != len(b) {
		t.Fatalf("ClientHello: %d bytes after the credential", len(b)-r.at)
	}
	return m
}

// refServerHello is a ServerHello parsed as spec 5.1 lays it out.
type refServerHello struct {
	suite, aead uint16
	ctE, ctC    []byte
	keysEnd     int // the end of ct_c: th covers the ServerHello up to here
	confirm     []byte
}

func refParseServerHello(t *testing.T, b []byte, nh int) refServerHello {
	t.Helper()
	var m refServerHello
	r := &refReader{t: t, what: "ServerHello", b: b}
	take, vec16 := r.take, r.vec16
	if hdr := take(2); hdr[0] != 2 || hdr[1] != 2 {
		t.Fatalf("ServerHello version %d type %d", hdr[0], hdr[1])
	}
	m.suite, m.aead = binary.BigEndian.Uint16(take(2)), binary.BigEndian.Uint16(take(2))
	take(32) // server_random
	m.ctE, m.ctC = vec16(), vec16()
	m.keysEnd = r.at
	take(8) // ticket_expiry
	vec16() // ticket
	m.confirm = take(nh)
	if r.at != len(b) {
		t.Fatalf("ServerHello: %d bytes after confirm", len(b)-r.at)
	}
	return m
}

// refReader reads the fields of a handshake message in order.
type refReader struct {
	t    *testing.T
	what string
	b    []byte
	at   int
}

func (r *refReader) take(n int) []byte {
	if r.at+n > len(r.b) {
		r.t.Fatalf("%s: %d bytes, need %d at %d", r.what, len(r.b), n, r.at)
	}
	r.at += n
	return r.b[r.at-n : r.at]
}

// vec16 reads a u16 length and that many bytes.
func (r *refReader) vec16() []byte { return r.take(int(binary.BigEndian.Uint16(r.take(2)))) }

// refKey is an X25519MLKEM768 key pair from the standard library: the ML-KEM-768 half and,
// unless the key is ML-KEM only, the X25519 half.
type refKey struct {
	pq *mlkem.DecapsulationKey768
	x  *ecdh.PrivateKey
	sm *gmecdh.PrivateKey // instead of x in the ShangMi suite
}

// refSMKey derives the ShangMi hybrid key pair of a 32-byte seed (spec 3.1): SHAKE256(seed)
// gives the 64-byte ML-KEM-768 seed and then the 32-byte SM2 seed; the scalar is the first
// 32-byte block of SHAKE256(SM2 seed) that is in [1, n-2], which gmsm checks.
func refSMKey(t *testing.T, seed []byte) refKey {
	t.Helper()
	h := sha3.NewSHAKE256()
	h.Write(seed)
	pqSeed, smSeed := make([]byte, mlkem.SeedSize), make([]byte, 32)
	h.Read(pqSeed)
	h.Read(smSeed)
	k := refMLKEMKey(t, pqSeed)
	sh := sha3.NewSHAKE256()
	sh.Write(smSeed)
	for k.sm == nil {
		scalar := make([]byte, 32)
		sh.Read(scalar)
		k.sm, _ = gmecdh.P256().NewPrivateKey(scalar)
	}
	return k
}

// refHybridKey derives the hybrid key pair of a 32-byte seed: SHAKE256(seed) gives the
// 64-byte ML-KEM-768 seed and then the 32-byte X25519 seed, whose SHAKE256 is the scalar.
func refHybridKey(t *testing.T, seed []byte) refKey {
	t.Helper()
	h := sha3.NewSHAKE256()
	h.Write(seed)
	pqSeed, xSeed := make([]byte, mlkem.SeedSize), make([]byte, 32)
	h.Read(pqSeed)
	h.Read(xSeed)
	k := refMLKEMKey(t, pqSeed)
	scalar := make([]byte, 32)
	xh := sha3.NewSHAKE256()
	xh.Write(xSeed)
	xh.Read(scalar)
	var err error
	if k.x, err = ecdh.X25519().NewPrivateKey(scalar); err != nil {
		t.Fatal(err)
	}
	return k
}

// refMLKEMKey is the ML-KEM-768 key pair of a 64-byte seed (FIPS 203 d ‖ z).
func refMLKEMKey(t *testing.T, seed []byte) refKey {
	t.Helper()
	dk, err := mlkem.NewDecapsulationKey768(seed)
	if err != nil {
		t.Fatal(err)
	}
	return refKey{pq: dk}
}

// public is the key's public encoding: ML-KEM-768's, then X25519's unless pqOnly.
func (k refKey) public(pqOnly bool) []byte {
	pk := k.pq.EncapsulationKey().Bytes()
	if pqOnly {
		return pk
	}
	if k.sm != nil {
		return append(pk, k.sm.PublicKey().Bytes()...)
	}
	return append(pk, k.x.PublicKey().Bytes()...)
}

// decap returns ss_pq ‖ ss_classical of ct (ML-KEM-768 ciphertext ‖ X25519 public key), or
// ss_pq alone when pqOnly.
func (k refKey) decap(t *testing.T, ct []byte, pqOnly bool) []byte {
	t.Helper()
	if len(ct) < mlkem.CiphertextSize768 {
		t.Fatalf("ciphertext of %d bytes", len(ct))
	}
	ss, err := k.pq.Decapsulate(ct[:mlkem.CiphertextSize768])
	if err != nil {
		t.Fatal(err)
	}
	if pqOnly {
		if len(ct) != mlkem.CiphertextSize768 {
			t.Fatalf("ML-KEM-only ciphertext of %d bytes", len(ct))
		}
		return ss
	}
	if k.sm != nil {
		peer, err := gmecdh.P256().NewPublicKey(ct[mlkem.CiphertextSize768:])
		if err != nil {
			t.Fatal(err)
		}
		x, err := k.sm.ECDH(peer)
		if err != nil {
			t.Fatal(err)
		}
		return append(ss, x...)
	}
	peer, err := ecdh.X25519().NewPublicKey(ct[mlkem.CiphertextSize768:])
	if err != nil {
		t.Fatal(err)
	}
	x, err := k.x.ECDH(peer)
	if err != nil {
		t.Fatal(err)
	}
	return append(ss, x...)
}

// TestTranscriptHelloKeepsTheHello checks CH' (spec 5.2) for every vector, the SHA-512 suite
// included: the ClientHello up to server_credential_digest unchanged (all of client_random),
// then H(server credential) with the suite hash, the rest of the hello up to the client
// credential, and H(client credential) in its place.
func TestTranscriptHelloKeepsTheHello(t *testing.T) {
	for i, v := range loadKAT(t) {
		h := refHasherFor(v.Suite)
		ch := refParseClientHello(t, v.ClientHello)
		m, err := parseClientHello(v.ClientHello)
		if err != nil {
			t.Fatal(err)
		}
		got := m.transcriptHello(refHash(h, v.ClientCredential), refHash(h, v.ServerCredential))
		want := append([]byte(nil), v.ClientHello[:ch.digestAt]...)
		want = append(want, refHash(h, v.ServerCredential)...)
		want = append(want, v.ClientHello[ch.digestAt+32:ch.credentialAt]...)
		want = binary.BigEndian.AppendUint16(want, uint16(h.Size()))
		want = append(want, refHash(h, v.ClientCredential)...)
		if !bytes.Equal(got, want) {
			t.Errorf("vector %d (%s): CH' differs from spec 5.2", i, v.Suite)
		}
	}
}
