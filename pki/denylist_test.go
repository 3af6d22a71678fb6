package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestDenylistCheck: serials match in any hexadecimal spelling, IDs match the leaf's
// SPIFFE ID, and a leaf on neither list passes.
func TestDenylistCheck(t *testing.T) {
	ca := newTestCA(t, "example.org")
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	chain, err := ca.Issue(spiffeid.RequireFromString("spiffe://example.org/client"), &key.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, err := ca.Issue(spiffeid.RequireFromString("spiffe://example.org/other"), &key.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	bySerial, err := NewDenylist([]string{"0x" + strings.ToUpper(chain[0].SerialNumber.Text(16))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	byID, err := NewDenylist(nil, []string{"spiffe://example.org/client"})
	if err != nil {
		t.Fatal(err)
	}
	for name, d := range map[string]*Denylist{"serial": bySerial, "ID": byID} {
		if err := d.Check(chain); err == nil {
			t.Errorf("denied %s accepted", name)
		}
		if err := d.Check(other); err != nil {
			t.Errorf("%s denylist refuses another leaf: %v", name, err)
		}
	}
}
