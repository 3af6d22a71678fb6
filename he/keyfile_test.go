package he_test

import (
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/veilrpc/veil/he"
)

func TestKeyFileRoundTrip(t *testing.T) {
	c, err := he.NewClient(he.ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "analyst.keys")
	if err := c.SaveKeyFile(path); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, %v; want 0600", fi.Mode().Perm(), err)
	}
	loaded, err := he.LoadKeyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// A vector encrypted under the saved public key decrypts with the loaded secret key.
	enc, err := he.NewEncryptor(c.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	v, err := enc.Encrypt([]float64{0.25, -0.5, 1})
	if err != nil {
		t.Fatal(err)
	}
	got, err := loaded.Decrypt(v)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []float64{0.25, -0.5, 1} {
		if math.Abs(got[i]-want) > 1e-6 {
			t.Fatalf("value %d: %v, want %v", i, got[i], want)
		}
	}
	// The wire encoders still refuse the loaded secret key.
	if _, err := loaded.SecretKey().MarshalBinary(); err == nil {
		t.Fatal("the loaded secret key serialized")
	}
}

func TestLoadKeyFileRefusesBadFiles(t *testing.T) {
	dir := t.TempDir()
	c, _ := he.NewClient(he.ParamsN13())
	good := filepath.Join(dir, "good")
	if err := c.SaveKeyFile(good); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(good)
	for name, body := range map[string]string{
		"not pem":        "hello",
		"other block":    strings.Replace(string(data), "VEIL CKKS KEYS", "CERTIFICATE", 2),
		"unknown params": strings.Replace(string(data), "Param-ID: ", "Param-ID: 00", 1),
		"truncated":      string(data[:len(data)/2]) + "\n-----END VEIL CKKS KEYS-----\n",
	} {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := he.LoadKeyFile(p); err == nil {
			t.Errorf("%s: loaded", name)
		}
	}
	if _, err := he.LoadKeyFile(good, he.ParamsN14()); err == nil {
		t.Error("loaded a key file whose parameters were not offered")
	}
}

// TestLoadKeyFileRefusesMismatchedPair: a key file whose public key belongs to another
// secret key (spliced from two files) is refused: data encrypted under that public key
// could never be decrypted with the file's secret key.
func TestLoadKeyFileRefusesMismatchedPair(t *testing.T) {
	dir := t.TempDir()
	var blocks [2]*pem.Block
	for i := range blocks {
		c, _ := he.NewClient(he.ParamsN13())
		p := filepath.Join(dir, fmt.Sprint(i))
		if err := c.SaveKeyFile(p); err != nil {
			t.Fatal(err)
		}
		data, _ := os.ReadFile(p)
		blocks[i], _ = pem.Decode(data)
	}
	n := 4 + binary.BigEndian.Uint32(blocks[0].Bytes)
	spliced := *blocks[0]
	spliced.Bytes = append(append([]byte(nil), blocks[0].Bytes[:n]...), blocks[1].Bytes[n:]...)
	p := filepath.Join(dir, "spliced")
	if err := os.WriteFile(p, pem.EncodeToMemory(&spliced), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := he.LoadKeyFile(p); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("mismatched pair: %v", err)
	}
	if _, err := he.LoadKeyFile(filepath.Join(dir, "0")); err != nil {
		t.Fatalf("matching pair: %v", err)
	}
}
