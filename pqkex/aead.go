package pqkex

import (
	"crypto/aes"
	"crypto/cipher"

	"golang.org/x/crypto/chacha20poly1305"
)

// AEAD identifies the AEAD that seals frames. The zero value is AES-256-GCM.
type AEAD uint16

// Supported AEADs. Both take 32-byte keys and 12-byte nonces.
const (
	AES256GCM        AEAD = 0x0001
	ChaCha20Poly1305 AEAD = 0x0002
)

func (a AEAD) id() uint16 {
	if a == 0 {
		return uint16(AES256GCM)
	}
	return uint16(a)
}

func (a AEAD) supported() bool {
	return a.id() == uint16(AES256GCM) || a.id() == uint16(ChaCha20Poly1305)
}

// String returns the AEAD's name.
func (a AEAD) String() string {
	switch a.id() {
	case uint16(AES256GCM):
		return "AES-256-GCM"
	case uint16(ChaCha20Poly1305):
		return "ChaCha20-Poly1305"
	default:
		return "unknown"
	}
}

const (
	aeadKeySize   = 32
	aeadNonceSize = 12
	aeadTagSize   = 16
)

func (a AEAD) new(key []byte) (cipher.AEAD, error) {
	switch a.id() {
	case uint16(AES256GCM):
		b, err := aes.NewCipher(key)
		if err != nil {
			return nil, errInternal
		}
		return cipher.NewGCM(b)
	case uint16(ChaCha20Poly1305):
		return chacha20poly1305.New(key)
	default:
		return nil, errUnsupported
	}
}
