package pki_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/veilrpc/veil/pki"
)

// The CA's SM2 key follows the root rotation steps: prepared with the new root, signing
// from activation on; a CA without one gets none.
func TestSM2KeyRotatesWithTheRoot(t *testing.T) {
	for _, withSM2 := range []bool{false, true} {
		dir := filepath.Join(t.TempDir(), "ca")
		if _, err := pki.InitCA(dir, "example.org"); err != nil {
			t.Fatal(err)
		}
		if withSM2 {
			if err := pki.AddSM2Key(dir); err != nil {
				t.Fatal(err)
			}
		}
		before, err := pki.LoadCA(dir)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pki.PrepareRotation(dir); err != nil {
			t.Fatal(err)
		}
		_, err = os.Stat(filepath.Join(dir, "root-sm2-next.key"))
		if withSM2 != (err == nil) {
			t.Fatalf("SM2 %v: prepared SM2 key present %v", withSM2, err == nil)
		}
		if withSM2 {
			if fi, _ := os.Stat(filepath.Join(dir, "root-sm2-next.key")); fi.Mode().Perm() != 0o600 {
				t.Fatalf("root-sm2-next.key mode %v", fi.Mode())
			}
			prepared, err := pki.LoadCA(dir)
			if err != nil || !prepared.SM2PublicKey().Equal(before.SM2PublicKey()) {
				t.Fatal("the SM2 key changed before activation")
			}
		}
		if _, err := pki.ActivateRotation(dir); err != nil {
			t.Fatal(err)
		}
		after, err := pki.LoadCA(dir)
		if err != nil {
			t.Fatal(err)
		}
		if !withSM2 {
			if after.SM2Signer() != nil {
				t.Fatal("rotation gave a CA without SM2 an SM2 key")
			}
			continue
		}
		if after.SM2Signer() == nil || after.SM2PublicKey().Equal(before.SM2PublicKey()) {
			t.Fatal("activation did not switch the SM2 key")
		}
		for _, f := range []string{"root-sm2-next.key", "root-sm2-next.pub"} {
			if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
				t.Fatalf("%s left after activation", f)
			}
		}
		if fi, _ := os.Stat(filepath.Join(dir, "root-sm2.key")); fi.Mode().Perm() != 0o600 {
			t.Fatalf("root-sm2.key mode %v", fi.Mode())
		}
		if _, err := pki.FinishRotation(dir, time.Now().Add(365*24*time.Hour), false); err != nil {
			t.Fatal(err)
		}
		if final, err := pki.LoadCA(dir); err != nil || !final.SM2PublicKey().Equal(after.SM2PublicKey()) {
			t.Fatal("finish changed the SM2 key")
		}
	}
}
