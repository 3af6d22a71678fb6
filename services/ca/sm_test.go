package ca_test

import (
	"context"
	"testing"
	"time"

	"connectrpc.com/connect"

	cav1 "github.com/veilrpc/veil/gen/veil/ca/v1"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
)

// The online CA certifies ShangMi static keys with its SM2 key, and hands out the SM2 root
// with the credential; without an SM2 key it refuses them.
func TestJoinCertifiesShangMiStaticKey(t *testing.T) {
	dir := newCADir(t)
	e := startCA(t, dir, "127.0.0.1:0")
	boot := e.bootstrapClient(t)
	id := "spiffe://example.org/sealed"
	suite := pqkex.SM2MLKEM768()
	pub, _, err := pqkex.GenerateKey(suite, nil)
	if err != nil {
		t.Fatal(err)
	}
	join := func() (*connect.Response[cav1.JoinResponse], error) {
		return boot.Join(context.Background(), connect.NewRequest(&cav1.JoinRequest{Token: e.token(t, id), Csr: csrFor(t, id), PqStaticKey: pub, PqSuite: suite.Name()}))
	}
	_, err = join()
	wantRefusal(t, err, connect.CodeInvalidArgument, "bad_pq_key")

	if err := pki.AddSM2Key(dir); err != nil {
		t.Fatal(err)
	}
	res, err := join() // the CA rereads its directory when it changes
	if err != nil {
		t.Fatal(err)
	}
	issued := res.Msg.GetIssued()
	cred, err := pqkex.ParseCredential(issued.GetPqCredential())
	if err != nil {
		t.Fatal(err)
	}
	root, err := pki.LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	sm2Root, err := pqkex.ParseSM2PublicKey(issued.GetPqSm2Root())
	if err != nil || !root.SM2PublicKey().Equal(sm2Root) {
		t.Fatalf("pq_sm2_root is not the CA's SM2 key (%v)", err)
	}
	if cred.Suite() != suite {
		t.Fatalf("credential of %s", cred.Suite().Name())
	}
	if err := (pqkex.Roots{PQ: root.PQPublicKey(), SM2: sm2Root}).Verify(cred, time.Now()); err != nil {
		t.Fatalf("credential does not verify with the SM2 root: %v", err)
	}
	if err := (pqkex.Roots{PQ: root.PQPublicKey(), Classical: root.Root().PublicKey}).Verify(cred, time.Now()); err == nil {
		t.Fatal("a ShangMi credential verified without the SM2 root")
	}
}
