package rpc_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// smSealingDir issues an X.509 identity and a ShangMi sealing identity for id.
func smSealingDir(t *testing.T, ca *pki.CA, dir, id string) string {
	t.Helper()
	out := filepath.Join(dir, "sm-"+strings.NewReplacer("spiffe://", "", "/", "_").Replace(id))
	sid := spiffeid.RequireFromString(id)
	if err := ca.IssueFiles(sid, out, time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := rpc.IssueSealingIdentity(ca, sid, out, time.Hour, pqkex.SM2MLKEM768()); err != nil {
		t.Fatal(err)
	}
	return out
}

// A CA with an SM2 key issues ShangMi sealing identities; a ShangMi-only server and client
// made from those files seal every kind of call over every protocol.
func TestShangMiSealedCallsAllProtocols(t *testing.T) {
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	if _, err := pki.InitCA(caDir, "example.org"); err != nil {
		t.Fatal(err)
	}
	ca, err := pki.LoadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	sid := spiffeid.RequireFromString(serverID)
	if err := rpc.IssueSealingIdentity(ca, sid, filepath.Join(dir, "nosm"), time.Hour, pqkex.SM2MLKEM768()); err == nil || !strings.Contains(err.Error(), "SM2") {
		t.Fatalf("a CA without an SM2 key issued a ShangMi identity: %v", err)
	}
	if err := pki.AddSM2Key(caDir); err != nil {
		t.Fatal(err)
	}
	if err := pki.AddSM2Key(caDir); err == nil {
		t.Fatal("AddSM2Key replaced the CA's SM2 key")
	}
	if fi, err := os.Stat(filepath.Join(caDir, "root-sm2.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("root-sm2.key: %v %v", fi, err)
	}
	if ca, err = pki.LoadCA(caDir); err != nil || ca.SM2Signer() == nil {
		t.Fatalf("LoadCA: SM2 key not loaded: %v", err)
	}

	id, roots, err := rpc.LoadSealingIdentity(smSealingDir(t, ca, dir, serverID))
	if err != nil {
		t.Fatal(err)
	}
	if id.Credential().Suite() != pqkex.SM2MLKEM768() || roots.SM2 == nil {
		t.Fatalf("sealing identity of %s, SM2 root %v", id.Credential().Suite().Name(), roots.SM2)
	}
	s, err := pqkex.NewServer(pqkex.WithIdentity(id), pqkex.WithRoots(roots), pqkex.RequireSuites(pqkex.SM2MLKEM768()))
	if err != nil {
		t.Fatal(err)
	}
	e := startWith(t, dir, ca, rpc.WithSealing(s))

	d := smSealingDir(t, ca, dir, clientID)
	cid, croots, err := rpc.LoadSealingIdentity(d)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := pqkex.NewClient(pqkex.WithIdentity(cid), pqkex.WithRoots(croots), pqkex.WithAuthorizer(pqkex.AuthorizeID(serverID)),
		pqkex.RequireSuites(pqkex.SM2MLKEM768()), pqkex.WithChannelBinding())
	if err != nil {
		t.Fatal(err)
	}
	src, err := transport.LoadFiles(d)
	if err != nil {
		t.Fatal(err)
	}
	hc := rpc.NewHTTPClient(src, transport.AuthorizeID(sid), rpc.WithClientSealing(pc))
	sealedCallsAllProtocols(t, e, hc, clientID+" X25519MLKEM768 pq=true sealed=true bound=true")
}
