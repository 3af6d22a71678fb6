package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/emmansun/gmsm/sm2"

	"github.com/veilrpc/veil/internal/atomicfile"
)

// Files of the CA's SM2 key, which signs the classical half of ShangMi sealing credentials
// (docs/pqkex.md section 3.1) beside the ML-DSA-65 key. Go's TLS has no SM2 certificates, so
// it is a key of its own, not the X.509 root's.
const (
	caSM2KeyFile = "root-sm2.key" // PEM "SM2 PRIVATE KEY": the 32-byte scalar, 0600
	caSM2PubFile = "root-sm2.pub" // PEM "SM2 PUBLIC KEY": the uncompressed point
)

// AddSM2Key gives the CA in dir an SM2 signing key for ShangMi sealing credentials
// (`veil ca init --sm2`). It refuses to replace an existing one. The key is written 0600,
// atomically.
func AddSM2Key(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, caKeyFile)); err != nil {
		return fmt.Errorf("pki: no CA in %s", dir)
	}
	if _, err := os.Stat(filepath.Join(dir, caSM2KeyFile)); err == nil {
		return fmt.Errorf("pki: the CA in %s already has an SM2 key", dir)
	}
	return writeNewSM2Key(dir, caSM2PubFile, caSM2KeyFile)
}

// writeNewSM2Key generates an SM2 key and writes its public half (0644) and then its
// private half (0600), each atomically: a CA directory with the private key has the
// public one.
func writeNewSM2Key(dir, pubFile, keyFile string) error {
	key, err := sm2.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("pki: SM2 key: %w", err)
	}
	priv, pub, err := sm2KeyBytes(key)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(dir, pubFile), pem.EncodeToMemory(&pem.Block{Type: "SM2 PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, keyFile), pem.EncodeToMemory(&pem.Block{Type: "SM2 PRIVATE KEY", Bytes: priv}), 0o600); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return nil
}

func sm2KeyBytes(key *sm2.PrivateKey) (priv, pub []byte, err error) {
	k, err := key.ECDH()
	if err != nil {
		return nil, nil, fmt.Errorf("pki: SM2 key: %w", err)
	}
	return k.Bytes(), k.PublicKey().Bytes(), nil
}

// loadSM2 reads the CA's SM2 key if it has one.
func (c *CA) loadSM2() error {
	b, err := os.ReadFile(filepath.Join(c.dir, caSM2KeyFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "SM2 PRIVATE KEY" {
		return fmt.Errorf("pki: %s: not an SM2 private key", caSM2KeyFile)
	}
	key, err := sm2.NewPrivateKey(block.Bytes)
	if err != nil {
		return fmt.Errorf("pki: %s: %w", caSM2KeyFile, err)
	}
	c.sm2Key = key
	return nil
}

// SM2Signer is the CA's SM2 key, which certifies the classical half of ShangMi sealing
// credentials (pqkex.IssueCredential with pqkex.SM2MLKEM768), or nil when the CA has none
// (see AddSM2Key).
func (c *CA) SM2Signer() crypto.Signer {
	if c.sm2Key == nil {
		return nil
	}
	return c.sm2Key
}

// SM2PublicKey is the CA's SM2 public key (pqkex.Roots.SM2), or nil.
func (c *CA) SM2PublicKey() *ecdsa.PublicKey {
	if c.sm2Key == nil {
		return nil
	}
	return &c.sm2Key.PublicKey
}

// SM2PublicKeyBytes is the CA's SM2 public key as an uncompressed point (what root-sm2.pub
// holds and pqkex.ParseSM2PublicKey reads), or nil.
func (c *CA) SM2PublicKeyBytes() []byte {
	if c.sm2Key == nil {
		return nil
	}
	_, pub, err := sm2KeyBytes(c.sm2Key)
	if err != nil {
		return nil
	}
	return pub
}

// Files of the SM2 key prepared by a root rotation (PrepareRotation), which ActivateRotation
// makes the signing SM2 key together with the new root.
const (
	caSM2NextKeyFile = "root-sm2-next.key"
	caSM2NextPubFile = "root-sm2-next.pub"
)

// prepareSM2 is PrepareRotation's step for a CA with an SM2 key: a new SM2 key, written
// beside the current one, 0600, atomically.
func prepareSM2(dir string, c *CA) error {
	if c.sm2Key == nil {
		return nil
	}
	return writeNewSM2Key(dir, caSM2NextPubFile, caSM2NextKeyFile)
}

// activateSM2 is ActivateRotation's step: the prepared SM2 key, if any, becomes the signing
// one (the key first, so that running the step again after a crash completes it).
func activateSM2(dir string) error {
	keyPEM, err := os.ReadFile(filepath.Join(dir, caSM2NextKeyFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	pubPEM, err := os.ReadFile(filepath.Join(dir, caSM2NextPubFile))
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil || block.Type != "SM2 PRIVATE KEY" {
		return fmt.Errorf("pki: %s: not an SM2 private key", caSM2NextKeyFile)
	}
	key, err := sm2.NewPrivateKey(block.Bytes)
	if err != nil {
		return fmt.Errorf("pki: %s: %w", caSM2NextKeyFile, err)
	}
	_, pub, err := sm2KeyBytes(key)
	if err != nil {
		return err
	}
	if pb, _ := pem.Decode(pubPEM); pb == nil || string(pb.Bytes) != string(pub) {
		return fmt.Errorf("pki: %s does not match %s", caSM2NextPubFile, caSM2NextKeyFile)
	}
	if err := atomicfile.Write(filepath.Join(dir, caSM2KeyFile), keyPEM, 0o600); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, caSM2PubFile), pubPEM, 0o644); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	for _, f := range []string{caSM2NextKeyFile, caSM2NextPubFile} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("pki: %w", err)
		}
	}
	return nil
}
