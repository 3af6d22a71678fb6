package pqkex

import (
	"crypto"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"encoding/binary"
	"hash"
	"io"
)

// labelPrefix separates pqkex v1 from every other use of the same secrets.
const labelPrefix = "veil-pqkex-v1 "

// exporterLabel is the TLS exporter label used for channel binding.
const exporterLabel = "EXPORTER-veil-pqkex-v1"

func hashFunc(h crypto.Hash) func() hash.Hash { return h.New }

// expander computes HKDF-Expand with TLS 1.3 style labels (u16 L, u8-prefixed label,
// u16-prefixed context) under one secret. Every pqkex output is at most one hash block long,
// so HKDF-Expand is a single HMAC over info ‖ 0x01; the HMAC keyed with the secret is reused
// for every label derived from it.
type expander struct {
	m    hash.Hash
	size int
	info []byte
}

func newExpander(h crypto.Hash, secret []byte) *expander {
	return &expander{m: hmac.New(hashFunc(h), secret), size: h.Size()}
}

func (e *expander) expand(label string, context []byte, length int) []byte {
	if length > e.size {
		panic("pqkex: expandLabel output longer than one hash block") // programmer error
	}
	full := labelPrefix + label
	info := e.info[:0]
	info = binary.BigEndian.AppendUint16(info, uint16(length))
	info = append(info, byte(len(full)))
	info = append(info, full...)
	info = binary.BigEndian.AppendUint16(info, uint16(len(context)))
	info = append(info, context...)
	info = append(info, 1) // HKDF-Expand counter of the first (only) block
	e.info = info
	e.m.Reset()
	e.m.Write(info)
	return e.m.Sum(nil)[:length]
}

// expandLabel is HKDF-Expand(secret, label info, length) for length <= Nh.
func expandLabel(h crypto.Hash, secret []byte, label string, context []byte, length int) []byte {
	return newExpander(h, secret).expand(label, context, length)
}

func extract(h crypto.Hash, salt, ikm []byte) []byte {
	prk, err := hkdf.Extract(hashFunc(h), ikm, salt)
	if err != nil {
		panic("pqkex: " + err.Error())
	}
	return prk
}

func digest(h crypto.Hash, parts ...[]byte) []byte {
	d := h.New()
	for _, p := range parts {
		d.Write(p)
	}
	return d.Sum(nil)
}

func mac(h crypto.Hash, key []byte, msg []byte) []byte {
	m := hmac.New(hashFunc(h), key)
	m.Write(msg)
	return m.Sum(nil)
}

// handshakeSecrets are the outputs of the handshake key schedule (spec section 5.2).
type handshakeSecrets struct {
	session   []byte // Nh bytes, the resumption secret carried in the ticket
	sessionID []byte // 16 bytes
	confirm   []byte // Nh bytes, HMAC key for the server's confirmation
}

func deriveHandshake(h crypto.Hash, cb, ikm, th []byte) handshakeSecrets {
	e := newExpander(h, extract(h, cb, ikm))
	return handshakeSecrets{
		session:   e.expand("session", th, h.Size()),
		sessionID: e.expand("session id", th, 16),
		confirm:   e.expand("confirm", th, h.Size()),
	}
}

// callSecret derives the secret of one call from the session secret, the call ID and the
// procedure (request path), so a sealed call cannot be replayed against another procedure.
func callSecret(h crypto.Hash, session []byte, callID uint64, procedure string) []byte {
	ctx := binary.BigEndian.AppendUint64(nil, callID)
	ctx = append(ctx, procedure...)
	return expandLabel(h, session, "call", ctx, h.Size())
}

// Directions of a call.
const (
	dirC2S = "c2s"
	dirS2C = "s2c"
)

// directionSecrets derives the c2s and s2c secrets of a call.
func directionSecrets(h crypto.Hash, call []byte) (c2s, s2c []byte) {
	e := newExpander(h, call)
	return e.expand(dirC2S, nil, h.Size()), e.expand(dirS2C, nil, h.Size())
}

// rekeySecret advances a direction secret with a fresh KEM shared secret.
func rekeySecret(h crypto.Hash, t, ss, ct []byte) []byte {
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
