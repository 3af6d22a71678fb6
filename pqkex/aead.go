package pqkex

import (
	"crypto/aes"
	"crypto/cipher"

	"github.com/emmansun/gmsm/sm4"
	"golang.org/x/crypto/chacha20poly1305"
)

// AEAD identifies the AEAD that seals frames. The zero value is AES-256-GCM.
type AEAD uint16

// Supported AEADs. All take 12-byte nonces; AES-256-GCM and ChaCha20-Poly1305 take 32-byte
// keys, SM4-GCM (only with the ShangMi suite, spec 3.1) 16-byte keys.
const (
	AES256GCM        AEAD = 0x0001
	ChaCha20Poly1305 AEAD = 0x0002
	SM4GCM           AEAD = 0x0003
)

func (a AEAD) id() uint16 {
	if a == 0 {
		return uint16(AES256GCM)
	}
	return uint16(a)
}

func (a AEAD) supported() bool {
	return a.id() == uint16(AES256GCM) || a.id() == uint16(ChaCha20Poly1305) || a.id() == uint16(SM4GCM)
}

// keySize is the AEAD's key size: 16 for SM4-GCM, 32 for the others.
func (a AEAD) keySize() int {
	if a.id() == uint16(SM4GCM) {
		return sm4KeySize
	}
	return aeadKeySize
}

// String returns the AEAD's name.
func (a AEAD) String() string {
	switch a.id() {
	case uint16(AES256GCM):
		return "AES-256-GCM"
	case uint16(ChaCha20Poly1305):
		return "ChaCha20-Poly1305"
	case uint16(SM4GCM):
		return "SM4-GCM"
	default:
		return "unknown"
	}
}

const (
	aeadKeySize   = 32
	sm4KeySize    = 16
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
	case uint16(SM4GCM):
		b, err := sm4.NewCipher(key)
		if err != nil {
			return nil, errInternal
		}
		return cipher.NewGCM(b)
	default:
		return nil, errUnsupported
	}
}
