package pki_test

import (
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/transport"
)

// A CA in a directory issues a workload identity in the cert-manager layout, which
// package transport loads as a Source.
func ExampleCA_IssueFiles() {
	dir, err := os.MkdirTemp("", "veil-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		log.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://example.org/echo")
	out := filepath.Join(dir, "echo")
	if err := ca.IssueFiles(id, out, time.Hour, pki.WithDNSNames("echo.example.org")); err != nil {
		log.Fatal(err)
	}
	src, err := transport.LoadFiles(out)
	if err != nil {
		log.Fatal(err)
	}
	svid, err := src.GetX509SVID()
	if err != nil {
		log.Fatal(err)
	}
	leaf := svid.Certificates[0]
	fmt.Println(svid.ID, leaf.DNSNames, leaf.CheckSignatureFrom(ca.Root()) == nil)
	// Output:
	// spiffe://example.org/echo [echo.example.org] true
}

// A root rotates in three steps; finish refuses while a leaf the old root signed is
// still valid.
func ExamplePrepareRotation() {
	dir, err := os.MkdirTemp("", "veil-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	caDir := filepath.Join(dir, "ca")
	ca, err := pki.InitCA(caDir, "example.org")
	if err != nil {
		log.Fatal(err)
	}
	if err := ca.IssueFiles(spiffeid.RequireFromString("spiffe://example.org/w"), filepath.Join(dir, "w"), time.Hour); err != nil {
		log.Fatal(err)
	}
	phase := func() pki.RotationPhase {
		c, err := pki.LoadCA(caDir)
		if err != nil {
			log.Fatal(err)
		}
		st, err := c.Rotation()
		if err != nil {
			log.Fatal(err)
		}
		return st.Phase
	}
	if _, err := pki.PrepareRotation(caDir); err != nil {
		log.Fatal(err)
	}
	fmt.Println(phase())
	if _, err := pki.ActivateRotation(caDir); err != nil {
		log.Fatal(err)
	}
	fmt.Println(phase())
	if _, err := pki.FinishRotation(caDir, time.Now(), false); err != nil {
		fmt.Println("finish now: refused")
	}
	if _, err := pki.FinishRotation(caDir, time.Now().Add(2*time.Hour), false); err != nil {
		log.Fatal(err)
	}
	fmt.Println(phase())
	// Output:
	// prepared
	// activated
	// finish now: refused
	// none
}
