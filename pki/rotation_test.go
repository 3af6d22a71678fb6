package pki

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestDenylistJSON(t *testing.T) {
	d, err := NewDenylist([]string{"00FF", "0x10"}, []string{"spiffe://example.org/b", "spiffe://example.org/a"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := d.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != `{"serials":["10","ff"],"ids":["spiffe://example.org/a","spiffe://example.org/b"]}` {
		t.Fatalf("JSON %s", b)
	}
	var back Denylist
	if err := back.UnmarshalJSON(b); err != nil || back.Len() != 4 {
		t.Fatalf("round trip: %v %d", err, back.Len())
	}
	for _, bad := range []string{`{"serials":["xyz"]}`, `{"ids":["http://x"]}`, `[`} {
		if err := (&Denylist{}).UnmarshalJSON([]byte(bad)); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
	var nilList *Denylist
	if nilList.Check([]*x509.Certificate{{}}) != nil || nilList.Len() != 0 {
		t.Fatal("nil denylist denies")
	}
}

func TestRootRotationSteps(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := InitCA(dir, "example.org"); err != nil {
		t.Fatal(err)
	}
	old, _ := LoadCA(dir)
	if _, err := ActivateRotation(dir); err == nil {
		t.Fatal("activate without prepare")
	}
	if _, err := FinishRotation(dir, time.Now(), false); err == nil {
		t.Fatal("finish without a rotation")
	}
	id := spiffeid.RequireFromString("spiffe://example.org/w")
	if err := old.IssueFiles(id, filepath.Join(t.TempDir(), "w"), time.Hour); err != nil {
		t.Fatal(err)
	}
	next, err := PrepareRotation(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := PrepareRotation(dir); err == nil {
		t.Fatal("prepared twice")
	}
	c, _ := LoadCA(dir)
	if st, _ := c.Rotation(); st.Phase != RotationPrepared || !c.Root().Equal(old.Root()) || len(c.Bundle()) != 2 {
		t.Fatalf("prepared: phase %s, %d roots", st.Phase, len(c.Bundle()))
	}
	if fi, err := os.Stat(filepath.Join(dir, caNextKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("next.key: %v", err)
	}
	if _, err := FinishRotation(dir, time.Now(), false); err == nil {
		t.Fatal("finish before activate")
	}
	if _, err := ActivateRotation(dir); err != nil {
		t.Fatal(err)
	}
	c, err = LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	st, _ := c.Rotation()
	if st.Phase != RotationActivated || !c.Root().Equal(next) || !c.Bundle()[0].Equal(next) || len(c.Bundle()) != 2 {
		t.Fatalf("activated: phase %s", st.Phase)
	}
	// The old root signed a one-hour leaf: finishing now would strand it.
	if until := time.Until(st.RetiringUntil); until < 59*time.Minute || until > time.Hour {
		t.Fatalf("retiring until %s", st.RetiringUntil)
	}
	if _, err := FinishRotation(dir, time.Now(), false); err == nil || !strings.Contains(err.Error(), "valid until") {
		t.Fatalf("finish while old leaves are valid: %v", err)
	}
	dropped, err := FinishRotation(dir, time.Now().Add(2*time.Hour), false)
	if err != nil || len(dropped) != 1 || !dropped[0].Equal(old.Root()) {
		t.Fatalf("finish: %v", err)
	}
	c, _ = LoadCA(dir)
	if st, _ := c.Rotation(); st.Phase != RotationNone || len(c.Bundle()) != 1 || !c.Root().Equal(next) {
		t.Fatalf("finished: phase %s", st.Phase)
	}
	// Leaves now come from the new root; the ML-DSA key is unchanged.
	chain, err := c.Issue(id, &old.key.PublicKey, time.Minute)
	if err != nil || chain[0].CheckSignatureFrom(next) != nil {
		t.Fatalf("issue after rotation: %v", err)
	}
	if !c.PQPublicKey().Equal(old.PQPublicKey()) {
		t.Fatal("ML-DSA key changed")
	}
}

func TestRevokeAndStale(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	c, err := InitCA(dir, "example.org")
	if err != nil {
		t.Fatal(err)
	}
	if c.Stale() {
		t.Fatal("fresh CA is stale")
	}
	time.Sleep(10 * time.Millisecond) // distinct modification times
	if _, err := Revoke(dir, []string{"abc"}, []string{"spiffe://example.org/bad"}); err != nil {
		t.Fatal(err)
	}
	if !c.Stale() {
		t.Fatal("a revocation did not make the CA stale")
	}
	c2, _ := LoadCA(dir)
	if got := c2.Denylist().Serials(); len(got) != 1 || got[0] != "abc" || c2.Sequence() <= c.Sequence() {
		t.Fatalf("denylist %v, sequence %d -> %d", got, c.Sequence(), c2.Sequence())
	}
	if _, err := Revoke(dir, []string{"not hex"}, nil); err == nil {
		t.Fatal("bad serial accepted")
	}
}

func TestIntermediate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := InitCA(dir, "example.org"); err != nil {
		t.Fatal(err)
	}
	inter, err := CreateIntermediate(dir, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, caInterKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("intermediate.key: %v", err)
	}
	c, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Intermediate().Equal(inter) || !inter.IsCA || !inter.MaxPathLenZero {
		t.Fatal("intermediate not loaded")
	}
	// Leaves carry the intermediate; peers trust only the root.
	server := c.testSource(t, "spiffe://example.org/server", time.Hour)
	client := c.testSource(t, "spiffe://example.org/client", time.Hour)
	if n := len(server.SVID.Certificates); n != 2 || !server.SVID.Certificates[1].Equal(inter) {
		t.Fatalf("chain of %d certificates", n)
	}
	if err := handshake(t, server, client); err != nil {
		t.Fatalf("handshake through an intermediate: %v", err)
	}
	// A root rotation re-creates the intermediate under the new root.
	if _, err := PrepareRotation(dir); err != nil {
		t.Fatal(err)
	}
	next, err := ActivateRotation(dir)
	if err != nil {
		t.Fatal(err)
	}
	c, err = LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if c.Intermediate().CheckSignatureFrom(next) != nil || c.Intermediate().Equal(inter) {
		t.Fatal("intermediate not re-created under the new root")
	}
	if d := c.Intermediate().NotAfter.Sub(inter.NotAfter); d < -time.Second || d > time.Second {
		t.Fatalf("intermediate lifetime changed by %s", d)
	}
	renewed := c.testSource(t, "spiffe://example.org/server", time.Hour)
	if err := handshake(t, renewed, client); err == nil {
		t.Fatal("a client with only the old root accepted the new chain")
	}
}

// FuzzDenylistJSON: denylist files and bundles come from other processes; decoding must
// not panic, and what decodes must encode and decode to the same set.
func FuzzDenylistJSON(f *testing.F) {
	f.Add([]byte(`{"serials":["ff"],"ids":["spiffe://example.org/a"]}`))
	f.Add([]byte(`{"serials":["0x00"]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var d Denylist
		if err := d.UnmarshalJSON(b); err != nil {
			return
		}
		out, err := d.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		var back Denylist
		if err := back.UnmarshalJSON(out); err != nil || back.Len() != d.Len() {
			t.Fatalf("round trip of %s: %v", out, err)
		}
	})
}
