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

// expandLabel is HKDF-Expand with a TLS 1.3 style info: u16 L, u8-prefixed label,
// u16-prefixed context.
func expandLabel(h crypto.Hash, secret []byte, label string, context []byte, length int) []byte {
	full := labelPrefix + label
	info := make([]byte, 0, 2+1+len(full)+2+len(context))
	info = binary.BigEndian.AppendUint16(info, uint16(length))
	info = append(info, byte(len(full)))
	info = append(info, full...)
	info = binary.BigEndian.AppendUint16(info, uint16(len(context)))
	info = append(info, context...)
	out, err := hkdf.Expand(hashFunc(h), secret, string(info), length)
	if err != nil {
		// Only reachable for lengths above 255*Nh, which pqkex never asks for.
		panic("pqkex: " + err.Error())
	}
	return out
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
	prk := extract(h, cb, ikm)
	return handshakeSecrets{
		session:   expandLabel(h, prk, "session", th, h.Size()),
		sessionID: expandLabel(h, prk, "session id", th, 16),
		confirm:   expandLabel(h, prk, "confirm", th, h.Size()),
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

func directionSecret(h crypto.Hash, call []byte, dir string) []byte {
	return expandLabel(h, call, dir, nil, h.Size())
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
