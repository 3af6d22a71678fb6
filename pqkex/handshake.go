package pqkex

import (
	"crypto/hmac"
	"encoding/binary"
	"hash"
	"io"

	"github.com/cloudflare/circl/kem"
)

const (
	wireVersion      = 2 // spec 5.5; version 1 is no longer accepted
	typeClientHello  = 1
	typeServerHello  = 2
	flagBinding      = 0x01
	flagPQOnly       = 0x02 // only with flagBinding: inner KEMs are the suite's ML-KEM half
	flagTLSEphemeral = 0x04 // only with flagBinding|flagPQOnly: no pqkex ephemeral, TLS's stands in
	knownFlags       = flagBinding | flagPQOnly | flagTLSEphemeral
	randomSize       = 32
	sessionIDSize    = 16
	credDigestSize   = 32
	maxHandshakeBody = 64 << 10
	// handshakeBodyPrealloc bounds what a handshake body's declared length reserves before
	// its bytes arrive: every valid message fits (the largest, an X448 ClientHello with the
	// longest SPIFFE ID, is about 11 KB); a longer body grows as it is read.
	handshakeBodyPrealloc = 16 << 10
)

// clientHello is the client's only flight (spec section 5.1).
type clientHello struct {
	versions     []uint8  // offered (spec 5.5)
	suites       []uint16 // offered
	suite        Scheme
	aead         AEAD
	flags        uint8
	random       [randomSize]byte
	serverDigest [credDigestSize]byte
	ephemeralPK  []byte
	ctS          []byte
	credential   []byte

	raw []byte // the encoding as sent or received: CH' is hashed from it (spec 5.2)
}

func (m *clientHello) marshal() []byte {
	b := make([]byte, 0, 9+len(m.versions)+2*len(m.suites)+randomSize+credDigestSize+6+len(m.ephemeralPK)+len(m.ctS)+len(m.credential))
	b = append(b, wireVersion, typeClientHello)
	b = appendOffers(b, m.versions, m.suites)
	b = binary.BigEndian.AppendUint16(b, m.suite.ID())
	b = binary.BigEndian.AppendUint16(b, m.aead.id())
	b = append(b, m.flags)
	b = append(b, m.random[:]...)
	b = append(b, m.serverDigest[:]...)
	b = appendVec16(b, m.ephemeralPK)
	b = appendVec16(b, m.ctS)
	return appendVec16(b, m.credential)
}

func parseClientHello(b []byte) (*clientHello, error) {
	p := parser{b: b}
	version, typ := p.u8(), p.u8()
	if p.bad || typ != typeClientHello {
		return nil, errMalformed
	}
	if version != wireVersion { // nothing after the version is read: its layout is the version's (spec 5.5)
		return nil, errVersionRefused(version)
	}
	versions, suites := p.offers()
	suiteID, aeadID := p.u16(), p.u16()
	flags := p.u8()
	if p.bad {
		return nil, errMalformed
	}
	if err := checkOffers(version, versions, suites, suiteID); err != nil {
		return nil, err
	}
	m := &clientHello{versions: versions, suites: suites, suite: SchemeByID(suiteID), aead: AEAD(aeadID), flags: flags}
	if m.suite == nil || !m.aead.supported() || aeadID == 0 || !aeadFits(m.suite, m.aead) {
		return nil, errUnsupported
	}
	if !validFlagsFor(m.suite, flags) {
		return nil, errMalformed
	}
	k := m.kem()
	copy(m.random[:], p.take(randomSize))
	copy(m.serverDigest[:], p.take(credDigestSize))
	m.ephemeralPK = p.exact16(ephemeralSize(flags, k.PublicKeySize()))
	m.ctS = p.exact16(k.CiphertextSize())
	m.credential = p.vec16()
	if !p.ok() || len(m.credential) == 0 {
		return nil, errMalformed
	}
	m.raw = b
	return m, nil
}

func validFlags(f uint8) bool {
	return f&^knownFlags == 0 && (f&flagPQOnly == 0 || f&flagBinding != 0) &&
		(f&flagTLSEphemeral == 0 || f&(flagBinding|flagPQOnly) == flagBinding|flagPQOnly)
}

// validFlagsFor is validFlags for a suite: the X448 suite never leaves its classical half
// (bit 1) or its ephemeral (bit 2) to the TLS connection, whose group is never X448 (spec 5.3).
func validFlagsFor(suite Scheme, f uint8) bool {
	return validFlags(f) && (!fullHybridOnly(suite) || f&(flagPQOnly|flagTLSEphemeral) == 0)
}

// suiteFlags restricts a client's flags to those its suite allows (validFlagsFor).
func suiteFlags(suite Scheme, f uint8) uint8 {
	if fullHybridOnly(suite) {
		return f & flagBinding
	}
	return f
}

// clientFlags are the flags of a client's hello: channel-bound handshakes use the ML-KEM
// halves, and leave the ephemeral to TLS unless the server refused that (spec 5.3).
func clientFlags(bind, tlsEphemeral bool) uint8 {
	switch {
	case bind && tlsEphemeral:
		return flagBinding | flagPQOnly | flagTLSEphemeral
	case bind:
		return flagBinding | flagPQOnly
	}
	return 0
}

// ephemeralSize is the exact length of ephemeral_pk or ct_e for a KEM size n: empty when the
// TLS connection's ephemeral stands in for pqkex's.
func ephemeralSize(flags uint8, n int) int {
	if flags&flagTLSEphemeral != 0 {
		return 0
	}
	return n
}

// kem returns the KEM of the handshake's encapsulations (three, or two with
// flagTLSEphemeral): the hybrid suite KEM, or its ML-KEM half when the handshake is
// channel-bound (spec 5.3).
func (m *clientHello) kem() kem.Scheme { return innerKEM(m.suite, m.flags) }

func innerKEM(suite Scheme, flags uint8) kem.Scheme {
	if flags&flagPQOnly != 0 {
		return pqHalf(suite)
	}
	return suite
}

// staticPublic returns the parsed static public key of a credential for KEM k (the suite or
// its ML-KEM half). Parsing ML-KEM keys expands their matrix, so credentials keep the result.
func staticPublic(k kem.Scheme, c *Credential) (kem.PublicKey, error) {
	c.parsedMu.Lock()
	defer c.parsedMu.Unlock()
	if pk, ok := c.parsed[k]; ok {
		return pk, nil
	}
	pk, err := k.UnmarshalBinaryPublicKey(c.publicKey[:k.PublicKeySize()])
	if err != nil {
		return nil, err
	}
	if c.parsed == nil {
		c.parsed = make(map[kem.Scheme]kem.PublicKey, 2)
	}
	c.parsed[k] = pk
	return pk, nil
}

// staticPrivate returns the part of an identity's static private key the handshake uses.
func (id *Identity) staticPrivate(flags uint8) kem.PrivateKey {
	if flags&flagPQOnly != 0 {
		return id.pqPriv
	}
	return id.priv
}

// serverHello is the server's only flight.
type serverHello struct {
	suite        uint16 // the session's suite and AEAD, echoed (spec 5.1)
	aead         uint16
	random       [randomSize]byte
	ctE, ctC     []byte
	ticketExpiry uint64
	ticket       []byte
	confirm      []byte
}

// marshalKeys encodes the prefix that the session keys depend on (up to ct_c), with room for
// the rest of the message and extra more bytes.
func (m *serverHello) marshalKeys(extra int) []byte {
	b := make([]byte, 0, 6+randomSize+4+len(m.ctE)+len(m.ctC)+8+2+len(m.ticket)+maxHashSize+extra)
	b = append(b, wireVersion, typeServerHello)
	b = binary.BigEndian.AppendUint16(b, m.suite)
	b = binary.BigEndian.AppendUint16(b, m.aead)
	b = append(b, m.random[:]...)
	b = appendVec16(b, m.ctE)
	return appendVec16(b, m.ctC)
}

// marshalUnconfirmed encodes everything but the confirmation tag.
func (m *serverHello) marshalUnconfirmed() []byte {
	b := binary.BigEndian.AppendUint64(m.marshalKeys(0), m.ticketExpiry)
	return appendVec16(b, m.ticket)
}

func (m *serverHello) marshal() []byte { return append(m.marshalUnconfirmed(), m.confirm...) }

func parseServerHello(b []byte, suite Scheme, aead AEAD, flags uint8) (*serverHello, error) {
	p := parser{b: b}
	version, typ := p.u8(), p.u8()
	if p.bad || typ != typeServerHello {
		return nil, errMalformed
	}
	if version != wireVersion {
		return nil, errServerVersion
	}
	m := &serverHello{suite: p.u16(), aead: p.u16()}
	if m.suite != suite.ID() || m.aead != aead.id() {
		return nil, errMalformed
	}
	k := innerKEM(suite, flags)
	copy(m.random[:], p.take(randomSize))
	m.ctE = p.exact16(ephemeralSize(flags, k.CiphertextSize()))
	m.ctC = p.exact16(k.CiphertextSize())
	m.ticketExpiry = p.u64()
	m.ticket = p.vec16()
	m.confirm = p.take(suite.Hash().Size())
	if !p.ok() || len(m.ticket) == 0 {
		return nil, errMalformed
	}
	return m, nil
}

// transcriptHello is the ClientHello as the transcript sees it (CH', spec 5.2): the encoding
// with the client credential replaced by its hash and the server credential's SHA-256 name by
// its hash, both with the suite hash (which binds them as well and spares hashing the ML-DSA
// signature four times per handshake). The handshake hashes it with writeTranscriptHello
// without building it.
func (m *clientHello) transcriptHello(clientHash, serverHash []byte) []byte {
	var w appendWriter
	var scratch [2]byte
	m.writeTranscriptHello(&w, scratch[:], clientHash, serverHash)
	return w.b
}

// writeTranscriptHello writes CH' to w from the hello's encoding (m.raw), piece by piece:
// the encoding up to server_credential_digest, serverHash in its place, the rest up to the
// client credential, and clientHash with its u16 length in place of the credential. scratch
// holds the length (2 bytes).
func (m *clientHello) writeTranscriptHello(w io.Writer, scratch, clientHash, serverHash []byte) {
	// server_credential_digest's offset (spec 5.1): version, type, the two offer lists,
	// suite, aead, flags, client_random.
	at := 2 + 1 + len(m.versions) + 1 + 2*len(m.suites) + 5 + randomSize
	credAt := len(m.raw) - len(m.credential) - 2 // the client credential's u16 length
	binary.BigEndian.PutUint16(scratch[:2], uint16(len(clientHash)))
	for _, b := range [...][]byte{m.raw[:at], serverHash, m.raw[at+credDigestSize : credAt], scratch[:2], clientHash} {
		_, _ = w.Write(b) // a hash or an appendWriter: never fails
	}
}

// appendWriter is an io.Writer that appends to b.
type appendWriter struct{ b []byte }

func (w *appendWriter) Write(p []byte) (int, error) {
	w.b = append(w.b, p...)
	return len(p), nil
}

// transcript is the running hash of a handshake: th = H(CH' ‖ ServerHello up to ct_c), from
// which the session keys derive, then thc = H(CH' ‖ ServerHello without confirm), which the
// confirmation tag covers, without hashing anything twice or copying the messages.
type transcript struct {
	h       hash.Hash
	th      []byte
	scratch [2]byte
}

// newTranscript hashes CH' of ch and keys, the ServerHello's encoding up to ct_c, and
// takes th.
func newTranscript(suite Scheme, ch *clientHello, clientHash, serverHash, keys []byte) *transcript {
	t := &transcript{h: suite.Hash().New()}
	ch.writeTranscriptHello(t.h, t.scratch[:], clientHash, serverHash)
	t.h.Write(keys)
	t.th = t.h.Sum(nil)
	return t
}

// confirmed continues the hash with rest, the ServerHello's encoding from ticket_expiry up
// to the confirmation tag, and returns thc.
func (t *transcript) confirmed(rest []byte) []byte {
	t.h.Write(rest)
	return t.h.Sum(nil)
}

// clientHandshake is the client between its flight and the server's.
type clientHandshake struct {
	self   *Identity
	server *Credential
	hello  *clientHello
	raw    []byte
	ephSK  kem.PrivateKey
	ssS    []byte
}

// startClient builds the ClientHello with flags (clientFlags). Randomness is drawn from rand
// in a fixed order (random, ephemeral seed unless flagTLSEphemeral, encapsulation seed) so
// that known-answer tests can replay it.
func startClient(rand io.Reader, self *Identity, server *Credential, aead AEAD, flags uint8) (*clientHandshake, error) {
	suite := self.cred.suite
	if server.suite.ID() != suite.ID() {
		return nil, errUnsupported
	}
	if !validFlagsFor(suite, flags) {
		return nil, errInternal
	}
	m := &clientHello{versions: serverVersions, suites: []uint16{suite.ID()}, suite: suite, aead: aeadFor(suite, aead),
		flags: flags, serverDigest: server.digest, credential: self.cred.raw}
	k := m.kem()
	if err := readRandom(rand, m.random[:]); err != nil {
		return nil, err
	}
	var ephSK kem.PrivateKey
	if flags&flagTLSEphemeral == 0 {
		var err error
		if m.ephemeralPK, ephSK, err = newEphemeral(rand, k); err != nil {
			return nil, err
		}
	}
	serverPK, err := staticPublic(k, server)
	if err != nil {
		return nil, errCredential
	}
	encSeed := make([]byte, k.EncapsulationSeedSize())
	if err := readRandom(rand, encSeed); err != nil {
		return nil, err
	}
	ct, ss, err := k.EncapsulateDeterministically(serverPK, encSeed)
	if err != nil {
		return nil, errInternal
	}
	m.ctS = ct
	m.raw = m.marshal()
	return &clientHandshake{self: self, server: server, hello: m, raw: m.raw, ephSK: ephSK, ssS: ss}, nil
}

// newEphemeral derives the client's ephemeral key pair for k from a seed read from rand.
func newEphemeral(rand io.Reader, k kem.Scheme) ([]byte, kem.PrivateKey, error) {
	seed := make([]byte, k.SeedSize())
	if err := readRandom(rand, seed); err != nil {
		return nil, nil, err
	}
	pk, sk := k.DeriveKeyPair(seed)
	raw, err := pk.MarshalBinary()
	if err != nil {
		return nil, nil, errInternal
	}
	return raw, sk, nil
}

// clientResult is what the client keeps from a completed handshake.
type clientResult struct {
	secrets handshakeSecrets
	ticket  []byte
	expiry  uint64
}

// finish processes the ServerHello; cb is the channel binding (nil without it).
func (c *clientHandshake) finish(raw, cb []byte) (*clientResult, error) {
	suite, k := c.hello.suite, c.hello.kem()
	sh, err := parseServerHello(raw, suite, c.hello.aead, c.hello.flags)
	if err != nil {
		return nil, err
	}
	var ssE []byte // none with flagTLSEphemeral: the TLS ephemeral reaches prk through cb
	if c.hello.flags&flagTLSEphemeral == 0 {
		if ssE, err = k.Decapsulate(c.ephSK, sh.ctE); err != nil {
			return nil, errTampered
		}
	}
	ssC, err := k.Decapsulate(c.self.staticPrivate(c.hello.flags), sh.ctC)
	if err != nil {
		return nil, errTampered
	}
	ikm := concat(c.ssS, ssE, ssC)
	// The transcript hashes the ServerHello as received: parseServerHello accepts exactly
	// one encoding of a message, so these are the bytes the server hashed.
	unconfirmed := len(raw) - len(sh.confirm)
	keysEnd := unconfirmed - len(sh.ticket) - 2 - 8 // before ticket_expiry and the ticket
	t := newTranscript(suite, c.hello, c.self.cred.hash, c.server.hash, raw[:keysEnd])
	sec := deriveHandshake(suite.Hash(), cb, ikm, t.th)
	if !hmac.Equal(macTo(suite.Hash(), nil, sec.confirm, t.confirmed(raw[keysEnd:unconfirmed])), sh.confirm) {
		return nil, errServerConfirm
	}
	return &clientResult{secrets: sec, ticket: sh.ticket, expiry: sh.ticketExpiry}, nil
}

// ticketIssuer seals the session into a ticket for the server's reply.
type ticketIssuer func(sec handshakeSecrets) (ticket []byte, expiry uint64, err error)

// respond is the server's side of a handshake for a parsed and authorized ClientHello. Its
// randomness is drawn from rand in a fixed order (random, encapsulation to the ephemeral key
// unless flagTLSEphemeral, encapsulation to the client's static key); the issuer draws the
// ticket nonce after them.
func respond(rand io.Reader, ch *clientHello, self *Identity, peer *Credential, cb []byte, issue ticketIssuer) ([]byte, handshakeSecrets, error) {
	suite, k := ch.suite, ch.kem()
	ssS, err := k.Decapsulate(self.staticPrivate(ch.flags), ch.ctS)
	if err != nil {
		return nil, handshakeSecrets{}, errMalformed
	}
	sh := &serverHello{suite: suite.ID(), aead: ch.aead.id()}
	if err := readRandom(rand, sh.random[:]); err != nil {
		return nil, handshakeSecrets{}, err
	}
	clientPK, err := staticPublic(k, peer)
	if err != nil {
		return nil, handshakeSecrets{}, errCredential
	}
	seed := make([]byte, k.EncapsulationSeedSize())
	var ssE []byte // none with flagTLSEphemeral: the TLS ephemeral reaches prk through cb
	if ch.flags&flagTLSEphemeral == 0 {
		if sh.ctE, ssE, err = encapEphemeral(rand, k, ch.ephemeralPK, seed); err != nil {
			return nil, handshakeSecrets{}, err
		}
	}
	if err := readRandom(rand, seed); err != nil {
		return nil, handshakeSecrets{}, err
	}
	ctC, ssC, err := k.EncapsulateDeterministically(clientPK, seed)
	if err != nil {
		return nil, handshakeSecrets{}, errInternal
	}
	sh.ctC = ctC
	// One buffer for the whole ServerHello, hashed as it is written: room for a ticket
	// (section 7) and the confirmation tag.
	out := sh.marshalKeys(ticketSizeHint(peer) + maxHashSize)
	keysEnd := len(out)
	t := newTranscript(suite, ch, peer.hash, self.cred.hash, out)
	sec := deriveHandshake(suite.Hash(), cb, concat(ssS, ssE, ssC), t.th)
	if sh.ticket, sh.ticketExpiry, err = issue(sec); err != nil {
		return nil, handshakeSecrets{}, err
	}
	out = binary.BigEndian.AppendUint64(out, sh.ticketExpiry)
	out = appendVec16(out, sh.ticket)
	sh.confirm = macTo(suite.Hash(), nil, sec.confirm, t.confirmed(out[keysEnd:]))
	return append(out, sh.confirm...), sec, nil
}

// encapEphemeral encapsulates to the client's ephemeral key with a seed read from rand into
// seed.
func encapEphemeral(rand io.Reader, k kem.Scheme, ephemeralPK, seed []byte) (ct, ss []byte, err error) {
	pk, err := k.UnmarshalBinaryPublicKey(ephemeralPK)
	if err != nil {
		return nil, nil, errMalformed
	}
	if err := readRandom(rand, seed); err != nil {
		return nil, nil, err
	}
	if ct, ss, err = k.EncapsulateDeterministically(pk, seed); err != nil {
		return nil, nil, errMalformed
	}
	return ct, ss, nil
}

func concat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// readHandshakeBody reads a handshake message of at most maxHandshakeBody bytes. A declared
// length (n >= 0) of at most handshakeBodyPrealloc bytes, as every valid message has, is read
// into a buffer of that size, which spares io.ReadAll's growing copies of a 7 KB ClientHello;
// a longer one is read as it arrives (the length is the peer's claim: reserving it up front
// would let a stalled body hold the limit for a few header bytes). The body must end at its
// declared length. Without one it reads up to the limit. It reports a body over the limit,
// or not of its declared length, as errMalformed.
func readHandshakeBody(r io.Reader, n int64) ([]byte, error) {
	if n > maxHandshakeBody {
		return nil, errMalformed
	}
	if n < 0 || n > handshakeBodyPrealloc {
		limit := int64(maxHandshakeBody)
		if n >= 0 {
			limit = n
		}
		b, err := io.ReadAll(io.LimitReader(r, limit+1))
		if err != nil {
			return nil, err
		}
		if int64(len(b)) > limit || n >= 0 && int64(len(b)) != n { // longer, or shorter than declared
			return nil, errMalformed
		}
		return b, nil
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			return nil, errMalformed
		}
		return nil, err
	}
	var extra [1]byte
	if m, err := io.ReadFull(r, extra[:]); m != 0 {
		return nil, errMalformed
	} else if err != io.EOF {
		return nil, err
	}
	return b, nil
}
