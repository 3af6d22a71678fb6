package pqkex

import (
	"crypto"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"encoding/binary"
	"hash"
	"io"
	"sync"
)

// labelPrefix separates pqkex v1 from every other use of the same secrets.
const labelPrefix = "veil-pqkex-v1 "

// exporterLabel is the TLS exporter label used for channel binding.
const exporterLabel = "EXPORTER-veil-pqkex-v1"

func hashFunc(h Hash) func() hash.Hash { return h.New }

// maxHashSize and maxBlockSize bound the suites' hashes (SHA-256 and SHA-512).
const (
	maxHashSize  = 64
	maxBlockSize = 128
)

// kdf computes the HMACs of the key schedule with one reusable hash and fixed buffers, so a
// call's derivations (spec 5.2: one AEAD key per direction on each side) allocate nothing.
// Every pqkex ExpandLabel output is at most one hash block long, so is the single HMAC(secret, info ‖ 0x01) truncated to L (RFC 5869 with N = 1). A kdf is not safe for concurrent use; getKDF and put recycle them.
type kdf struct {
	hash  Hash
	h     hash.Hash
	size  int
	block int
	pad   [maxBlockSize]byte
	key   [maxHashSize]byte
	inner [maxHashSize]byte
	info  [256 + 64]byte

	// Scratch for the per-call keys: in the pooled kdf, not on the stack, where the hash
	// interface's calls would make it escape.
	out [maxHashSize]byte
	prk hmacKey // the handshake's keyed prk (deriveHandshake), for the same reason
}

var kdfPools sync.Map // Hash -> *sync.Pool

func getKDF(h Hash) *kdf {
	p, ok := kdfPools.Load(h)
	if !ok {
		p, _ = kdfPools.LoadOrStore(h, &sync.Pool{New: func() any {
			d := h.New()
			return &kdf{hash: h, h: d, size: d.Size(), block: d.BlockSize()}
		}})
	}
	return p.(*sync.Pool).Get().(*kdf)
}

func (k *kdf) put() {
	k.wipe()
	p, _ := kdfPools.Load(k.hash) // present: getKDF made k
	p.(*sync.Pool).Put(k)
}

// wipe clears what k holds of the secrets it derived, before it goes back to the pool.
func (k *kdf) wipe() {
	// The hash ended the last HMAC in a state that finalizes to its output (the derived key):
	// reset, it holds the initial state.
	k.h.Reset()
	clear(k.pad[:])
	clear(k.key[:])
	clear(k.inner[:])
	clear(k.out[:])
	if k.prk.keyLen != 0 { // only deriveHandshake keys it: calls do not pay for clearing it
		k.prk = hmacKey{}
	}
}

// maxStateSize bounds a marshaled SHA-256 or SHA-512 state (108 and 204 bytes).
const maxStateSize = 204

// hmacKey is an HMAC key with its padded blocks already absorbed: the inner and outer hash
// states after K^ipad and K^opad, marshaled. Each use then costs two hash blocks fewer.
type hmacKey struct {
	inner, outer [maxStateSize]byte
	n            int // marshaled size; 0: the hash cannot marshal its state
	key          [maxHashSize]byte
	keyLen       int
}

type stateHash interface {
	AppendBinary([]byte) ([]byte, error)
	UnmarshalBinary([]byte) error
}

// keyed sets hk to key (at most one hash output long, as every key schedule secret is).
func (k *kdf) keyed(hk *hmacKey, key []byte) {
	hk.keyLen = copy(hk.key[:], key)
	hk.n = 0
	sh, ok := k.h.(stateHash)
	if !ok || len(key) > maxHashSize {
		return
	}
	pad := k.pad[:k.block]
	clear(pad)
	copy(pad, key)
	for i := range pad {
		pad[i] ^= 0x36
	}
	k.h.Reset()
	k.h.Write(pad)
	in, err := sh.AppendBinary(hk.inner[:0])
	for i := range pad {
		pad[i] ^= 0x36 ^ 0x5c
	}
	k.h.Reset()
	k.h.Write(pad)
	out, err2 := sh.AppendBinary(hk.outer[:0])
	clear(pad)
	if err != nil || err2 != nil || len(in) != len(out) || len(in) > maxStateSize || &in[0] != &hk.inner[0] || &out[0] != &hk.outer[0] {
		return // fall back to plain HMAC
	}
	hk.n = len(in)
}

// macKeyed appends HMAC-H(hk, msg) to dst.
func (k *kdf) macKeyed(dst []byte, hk *hmacKey, msg []byte) []byte {
	sh, ok := k.h.(stateHash)
	if hk.n == 0 || !ok {
		return k.mac(dst, hk.key[:hk.keyLen], msg)
	}
	if sh.UnmarshalBinary(hk.inner[:hk.n]) != nil {
		return k.mac(dst, hk.key[:hk.keyLen], msg)
	}
	k.h.Write(msg)
	inner := k.h.Sum(k.inner[:0])
	if sh.UnmarshalBinary(hk.outer[:hk.n]) != nil {
		return k.mac(dst, hk.key[:hk.keyLen], msg)
	}
	k.h.Write(inner)
	return k.h.Sum(dst)
}

// mac appends HMAC-H(key, msg) to dst.
func (k *kdf) mac(dst, key, msg []byte) []byte {
	if len(key) > k.block {
		k.h.Reset()
		k.h.Write(key)
		key = k.h.Sum(k.key[:0])
	}
	pad := k.pad[:k.block]
	clear(pad)
	copy(pad, key)
	for i := range pad {
		pad[i] ^= 0x36
	}
	k.h.Reset()
	k.h.Write(pad)
	k.h.Write(msg)
	inner := k.h.Sum(k.inner[:0])
	for i := range pad {
		pad[i] ^= 0x36 ^ 0x5c
	}
	k.h.Reset()
	k.h.Write(pad)
	k.h.Write(inner)
	return k.h.Sum(dst)
}

// expand appends ExpandLabel(secret, label, context, length) to dst (length <= Nh).
func (k *kdf) expand(dst, secret []byte, label string, context []byte, length int) []byte {
	info := k.expandInfo(label, context, length)
	n := len(dst)
	dst = k.mac(dst, secret, info)
	return dst[:n+length]
}

// expandKeyed is expand with a keyed secret.
func (k *kdf) expandKeyed(dst []byte, secret *hmacKey, label string, context []byte, length int) []byte {
	info := k.expandInfo(label, context, length)
	n := len(dst)
	dst = k.macKeyed(dst, secret, info)
	return dst[:n+length]
}

// expandInfo is HKDF-Expand's info for a label, followed by the counter byte 0x01.
func (k *kdf) expandInfo(label string, context []byte, length int) []byte {
	if length > k.size {
		panic("pqkex: expandLabel output longer than one hash block") // programmer error
	}
	info := k.info[:0]
	info = binary.BigEndian.AppendUint16(info, uint16(length))
	info = append(info, byte(len(labelPrefix)+len(label)))
	info = append(info, labelPrefix...)
	info = append(info, label...)
	info = binary.BigEndian.AppendUint16(info, uint16(len(context)))
	info = append(info, context...)
	return append(info, 1) // HKDF-Expand counter of the first (only) block
}

// expandLabel is HKDF-Expand(secret, label info, length) for length <= Nh.
func expandLabel(h Hash, secret []byte, label string, context []byte, length int) []byte {
	k := getKDF(h)
	defer k.put()
	return k.expand(make([]byte, 0, h.Size()), secret, label, context, length)
}

func extract(h Hash, salt, ikm []byte) []byte {
	prk, err := hkdf.Extract(hashFunc(h), ikm, salt)
	if err != nil {
		panic("pqkex: " + err.Error())
	}
	return prk
}

func digest(h Hash, parts ...[]byte) []byte {
	d := h.New()
	for _, p := range parts {
		d.Write(p)
	}
	return d.Sum(nil)
}

// macTo appends HMAC-H(key, msg) to dst with a pooled kdf (no HMAC instance allocated).
func macTo(h Hash, dst, key, msg []byte) []byte {
	k := getKDF(h)
	defer k.put()
	return k.mac(dst, key, msg)
}

// handshakeSecrets are the outputs of the handshake key schedule (spec section 5.2).
type handshakeSecrets struct {
	session   []byte // Nh bytes, the resumption secret carried in the ticket
	sessionID []byte // 16 bytes
	confirm   []byte // Nh bytes, HMAC key for the server's confirmation
}

// deriveHandshake computes prk = HKDF-Extract(cb, ikm) and the three ExpandLabel outputs of
// spec 5.2 from it. HKDF-Extract is HMAC(salt, ikm), an empty salt being Nh zero bytes, which
// HMAC's key padding makes the same key as no key; prk is keyed once for the three
// expansions, and the outputs share one allocation.
func deriveHandshake(h Hash, cb, ikm, th []byte) handshakeSecrets {
	k := getKDF(h)
	defer k.put()
	n := k.size
	prk := k.mac(k.out[:0], cb, ikm)
	k.keyed(&k.prk, prk) // put clears both
	out := make([]byte, 0, 2*n+sessionIDSize)
	out = k.expandKeyed(out, &k.prk, "session", th, n)
	out = k.expandKeyed(out, &k.prk, "session id", th, sessionIDSize)
	out = k.expandKeyed(out, &k.prk, "confirm", th, n)
	return handshakeSecrets{
		session:   out[:n:n],
		sessionID: out[n : n+sessionIDSize : n+sessionIDSize],
		confirm:   out[n+sessionIDSize:],
	}
}

// callRoot returns call_root = ExpandLabel(session, "call root", u16 len ‖ server_spiffe_id
// ‖ H(server credential), Nh) (spec 5.2), keyed for the per-call derivations: every call key
// is bound to the server the session was made with. Sessions keep it, so each call's first
// step costs two hash blocks fewer.
func callRoot(h Hash, session []byte, serverID string, serverHash []byte) *hmacKey {
	k := getKDF(h)
	defer k.put()
	srv := appendVec16(make([]byte, 0, 2+len(serverID)+len(serverHash)), []byte(serverID))
	srv = append(srv, serverHash...)
	root := k.expand(make([]byte, 0, h.Size()), session, "call root", srv, h.Size())
	sk := new(hmacKey)
	k.keyed(sk, root)
	clear(root)
	return sk
}

// bindingIDSize is the size of a ticket's binding_id (spec 7.3).
const bindingIDSize = 32

// bindingID returns ExpandLabel-SHA256(cb, "binding id", "", 32): what a ticket of a
// channel-bound session remembers of its TLS connection (spec 7.3).
func bindingID(cb []byte) []byte {
	return expandLabel(crypto.SHA256, cb, "binding id", nil, bindingIDSize)
}

// Directions of a call.
const (
	dirC2S = "c2s"
	dirS2C = "s2c"
)

// rekeySecret advances a direction secret with a fresh KEM shared secret.
func rekeySecret(h Hash, t, ss, ct []byte) []byte {
	return expandLabel(h, extract(h, t, ss), "rekey", digest(h, ct), h.Size())
}

// readRandom fills b from r, or from crypto/rand when r is nil.
func readRandom(r io.Reader, b []byte) error {
	if r == nil {
		r = rand.Reader
	}
	if _, err := io.ReadFull(r, b); err != nil {
		return errInternal
	}
	return nil
}

// direction is the key state of one direction of one call (spec 5.2): the AEAD under the
// direction's current key and the frame sequence. The chaining secret T that in-stream rekeys
// advance is derived only when the first rekey needs it, so a call that never rekeys (every
// unary call) costs one key derivation per direction.
type direction struct {
	hash   Hash
	aead   AEAD
	keys   cipher.AEAD
	seq    uint64    // next sequence number; uint64 so that exhaustion is detectable
	secret []byte    // T_i after the i-th rekey; nil before the first
	call   *callKeys // the call's session, ID, procedure and server nonce, for K0 and T0
	label  string    // dirC2S or dirS2C

	nonceBuf [aeadNonceSize]byte // 0^8 ‖ u32 seq; the first 8 bytes stay zero
}

// callKeys are both directions of one call, derived from the session secret (spec 5.2)
// in one allocation. The s2c direction depends on the server's nonce for the call, so it is
// derived by deriveS2C once that is known (the server draws it, the client reads it from the
// response body).
type callKeys struct {
	c2s, s2c  direction
	session   *hmacKey // the session secret, keyed; shared with the session, never written
	callID    uint64
	procedure string
	nonce     [serverNonceSize]byte // the server nonce, here so that reading it allocates nothing
}

// Labels of the first AEAD key of each direction (spec 5.2).
const (
	keyLabelC2S = dirC2S + " key"
	keyLabelS2C = dirS2C + " key"
)

// init sets ck up for a call and derives its c2s key; ck is part of a larger per-call
// struct (clientCall, serverCall), so that a call allocates once.
func (ck *callKeys) init(h Hash, a AEAD, session *hmacKey, callID uint64, procedure string) error {
	*ck = callKeys{session: session, callID: callID, procedure: procedure}
	ck.c2s = direction{hash: h, aead: a, call: ck, label: dirC2S}
	ck.s2c = direction{hash: h, aead: a, call: ck, label: dirS2C}
	k := getKDF(h)
	defer k.put()
	return ck.c2s.deriveFirst(k)
}

// deriveS2C derives the call's s2c key from the server nonce in ck.nonce:
// K0(s2c) = ExpandLabel(session, "s2c key", call_id ‖ server_nonce ‖ procedure, 32) (spec 5.2).
func (ck *callKeys) deriveS2C() error {
	k := getKDF(ck.s2c.hash)
	defer k.put()
	return ck.s2c.deriveFirst(k)
}

// context appends ctx(d) of spec 5.2 to b: u64 call_id, for s2c the server nonce, then the
// procedure. Only the procedure varies in length, and it comes last.
func (ck *callKeys) context(b []byte, label string) []byte {
	b = binary.BigEndian.AppendUint64(b, ck.callID)
	if label == dirS2C {
		b = append(b, ck.nonce[:]...)
	}
	return append(b, ck.procedure...)
}

// deriveFirst sets d's AEAD to K0(d), straight from the session secret: one HMAC.
func (d *direction) deriveFirst(k *kdf) error {
	var buf [callIDSize + serverNonceSize + 128]byte // on the stack unless the procedure is long
	label := keyLabelC2S
	if d.label == dirS2C {
		label = keyLabelS2C
	}
	key := k.expandKeyed(k.out[:0], d.call.session, label, d.call.context(buf[:0], d.label), d.aead.keySize())
	c, err := d.aead.new(key)
	clear(k.out[:])
	if err != nil {
		return err
	}
	d.keys = c
	return nil
}

// nonce returns the AEAD nonce of frame seq: 0^8 ‖ u32 seq. Every key seals one direction
// of one call execution, so the sequence alone makes nonces unique under it (spec 5.2).
func (d *direction) nonce(seq uint32) []byte {
	binary.BigEndian.PutUint32(d.nonceBuf[aeadNonceSize-4:], seq)
	return d.nonceBuf[:]
}

// advance rekeys d with the shared secret ss of the KEM ciphertext ct:
// T_i = ExpandLabel(HKDF-Extract(T_{i-1}, ss), "rekey", H(ct)) and K_i = ExpandLabel(T_i, "key"),
// where T0 = ExpandLabel(session, label, ctx(d)) is derived here at the first rekey.
func (d *direction) advance(ss, ct []byte) error {
	t := d.secret
	if t == nil {
		t = d.call.chainSecret(d.label)
	}
	secret := rekeySecret(d.hash, t, ss, ct)
	c, err := d.aead.new(expandLabel(d.hash, secret, "key", nil, d.aead.keySize()))
	if err != nil {
		return err
	}
	d.secret, d.keys = secret, c
	return nil
}

// chainSecret returns T0 of the direction label: ExpandLabel(session, label, ctx, Nh).
func (ck *callKeys) chainSecret(label string) []byte {
	k := getKDF(ck.c2s.hash)
	defer k.put()
	var buf [callIDSize + serverNonceSize + 128]byte
	return k.expandKeyed(make([]byte, 0, k.size), ck.session, label, ck.context(buf[:0], label), k.size)
}
