package he

import (
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"math"
	"os"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"

	"github.com/veilrpc/veil/internal/atomicfile"
)

// A key file keeps a client's secret and public key on the owner's disk so that a later
// process of the same owner (the analyst who decrypts a study's result, say) can use
// them. It is the one form in which a secret key leaves memory, and only into a local
// file written 0600 atomically (temporary file in the same directory, fsync, rename,
// fsync of the directory): there is no function that puts a secret key into a message
// or a writer. The file is not encrypted: its permissions (and the disk's encryption)
// are its only protection. LoadKeyFile checks that the public key belongs to the
// secret key. Format: one PEM block "VEIL CKKS KEYS" with a Param-ID header and
// the body u32 len ‖ secret key ‖ public key (lattigo's binary encodings).
const keyFileType = "VEIL CKKS KEYS"

// SaveKeyFile writes the client's keys to path (mode 0600, atomically).
func (c *Client) SaveKeyFile(path string) (err error) {
	defer recoverInto(&err, "key file")
	sk, err := c.sk.sk.MarshalBinary()
	if err != nil {
		return fmt.Errorf("he: key file: %w", err)
	}
	pk, err := c.pk.pk.MarshalBinary()
	if err != nil {
		return fmt.Errorf("he: key file: %w", err)
	}
	body := binary.BigEndian.AppendUint32(nil, uint32(len(sk)))
	body = append(append(body, sk...), pk...)
	block := &pem.Block{Type: keyFileType, Headers: map[string]string{"Param-ID": string(c.params.ID())}, Bytes: body}
	data := pem.EncodeToMemory(block)
	clear(body)
	clear(sk)
	if err := atomicfile.Write(path, data, 0o600); err != nil {
		return fmt.Errorf("he: key file: %w", err)
	}
	return nil
}

// LoadKeyFile reads a key file written by SaveKeyFile. Its parameters must be among
// params (default: Presets()).
func LoadKeyFile(path string, params ...*Parameters) (c *Client, err error) {
	defer recoverInto(&err, "key file")
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("he: key file: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != keyFileType {
		return nil, fmt.Errorf("he: key file %s: not a %s PEM block", path, keyFileType)
	}
	if len(params) == 0 {
		params = Presets()
	}
	var p *Parameters
	for _, cand := range params {
		if string(cand.ID()) == block.Headers["Param-ID"] {
			p = cand
		}
	}
	if p == nil {
		return nil, fmt.Errorf("he: key file %s: unknown parameters %q", path, block.Headers["Param-ID"])
	}
	b := block.Bytes
	if len(b) < 4 || uint64(binary.BigEndian.Uint32(b)) > uint64(len(b)-4) {
		return nil, fmt.Errorf("he: key file %s: truncated", path)
	}
	n := binary.BigEndian.Uint32(b)
	sk, pk := rlwe.NewSecretKey(p.p), rlwe.NewPublicKey(p.p)
	if err := sk.UnmarshalBinary(b[4 : 4+n]); err != nil {
		return nil, fmt.Errorf("he: key file %s: secret key: %w", path, err)
	}
	if err := pk.UnmarshalBinary(b[4+n:]); err != nil {
		return nil, fmt.Errorf("he: key file %s: public key: %w", path, err)
	}
	c = newClient(p, sk, pk)
	if !c.pairMatches() {
		return nil, fmt.Errorf("he: key file %s: the public key does not match the secret key", path)
	}
	return c, nil
}

// pairMatches encrypts known values under the public key and decrypts them with the
// secret key: with a public key of another secret key the result is noise of the
// size of the modulus, far from the values.
func (c *Client) pairMatches() bool {
	enc, err := NewEncryptor(c.pk)
	if err != nil {
		return false
	}
	want := []float64{1, -2, 3, 0.5}
	v, err := enc.Encrypt(want)
	if err != nil {
		return false
	}
	got, err := c.Decrypt(v)
	if err != nil {
		return false
	}
	for i := range want {
		if math.Abs(got[i]-want[i]) > 1e-3 {
			return false
		}
	}
	return true
}
