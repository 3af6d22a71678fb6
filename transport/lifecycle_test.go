package transport

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// denySource is a StaticSource with a denylist that can change.
type denySource struct {
	StaticSource
	deny atomic.Pointer[Denylist]
}

func (d *denySource) GetDenylist() *Denylist { return d.deny.Load() }

func TestDenylistRefusesIncludingResumedSessions(t *testing.T) {
	ca := newTestCA(t, "example.org")
	server := &denySource{StaticSource: ca.testSource(t, "spiffe://example.org/server", time.Hour)}
	server.deny.Store(&Denylist{})
	client := ca.testSource(t, "spiffe://example.org/client", time.Hour)
	var obs recorder
	addr := serve(t, ServerConfig(server, WithObserver(&obs)))
	cfg := ClientConfig(client, WithAuthorizer(AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/server"))))
	if _, err := dial(addr, cfg); err != nil {
		t.Fatal(err)
	}
	cs, err := dial(addr, cfg)
	if err != nil || !cs.DidResume {
		t.Fatalf("second connection: resumed=%v err=%v", cs.DidResume, err)
	}
	serial := client.SVID.Certificates[0].SerialNumber.Text(16)
	d, err := NewDenylist([]string{"0x" + strings.ToUpper(serial)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	server.deny.Store(d)
	// The client resumes its session; VerifyConnection runs again and refuses it.
	if _, err := dial(addr, cfg); err == nil {
		t.Fatal("revoked serial accepted on a resumed session")
	}
	if obs.lastReason() != ReasonRevoked {
		t.Fatalf("reason %q, want %q", obs.lastReason(), ReasonRevoked)
	}
	d, _ = NewDenylist(nil, []string{"spiffe://example.org/client"})
	server.deny.Store(d)
	other := ca.testSource(t, "spiffe://example.org/client", time.Hour) // a new leaf, same ID
	if _, err := dial(addr, ClientConfig(other, WithAuthorizer(AuthorizeAny()))); err == nil || obs.lastReason() != ReasonRevoked {
		t.Fatalf("revoked ID accepted: %v (%s)", err, obs.lastReason())
	}
	server.deny.Store(&Denylist{})
	if _, err := dial(addr, ClientConfig(other, WithAuthorizer(AuthorizeAny()))); err != nil {
		t.Fatalf("after the denylist is emptied: %v", err)
	}
}

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

// fakeIssuer is an Issuer over a local CA whose renewals can be made to fail.
type fakeIssuer struct {
	ca     *CA
	ttl    time.Duration
	mu     sync.Mutex
	down   bool
	renews int
}

func (f *fakeIssuer) issue(csr []byte) (*Issued, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down {
		return nil, errors.New("CA unreachable")
	}
	req, err := x509.ParseCertificateRequest(csr)
	if err != nil {
		return nil, err
	}
	id, _ := spiffeid.FromURI(req.URIs[0])
	chain, err := f.ca.Issue(id, req.PublicKey, f.ttl)
	if err != nil {
		return nil, err
	}
	return &Issued{Chain: chain, Trust: Trust{TrustDomain: f.ca.td, Roots: f.ca.Bundle(), Denylist: f.ca.Denylist()}}, nil
}

func (f *fakeIssuer) Join(_ context.Context, csr []byte, _ time.Duration) (*Issued, error) {
	return f.issue(csr)
}

func (f *fakeIssuer) Renew(_ context.Context, _ Source, csr []byte, _ time.Duration) (*Issued, error) {
	is, err := f.issue(csr)
	if err == nil {
		f.mu.Lock()
		f.renews++
		f.mu.Unlock()
	}
	return is, err
}

func (f *fakeIssuer) Trust(context.Context, Source) (*Trust, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down {
		return nil, errors.New("CA unreachable")
	}
	return &Trust{TrustDomain: f.ca.td, Roots: f.ca.Bundle(), Denylist: f.ca.Denylist()}, nil
}

func (f *fakeIssuer) setDown(down bool) {
	f.mu.Lock()
	f.down = down
	f.mu.Unlock()
}

func TestRenewingSourceRenewsRetriesAndDegrades(t *testing.T) {
	ca := newTestCA(t, "example.org")
	f := &fakeIssuer{ca: ca, ttl: 3 * time.Second}
	id := spiffeid.RequireFromString("spiffe://example.org/w")
	src, err := NewRenewingSource(context.Background(), f, id, WithCertTTL(3*time.Second),
		WithRetryBackoff(20*time.Millisecond, 100*time.Millisecond), WithDegradeBelow(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	first, _ := src.GetX509SVID()
	st := src.Status()
	// Renewal is scheduled at two thirds of the lifetime.
	if lead := st.NotAfter.Sub(st.NextRenewal); lead < 600*time.Millisecond || lead > 1100*time.Millisecond { // NotAfter has whole seconds
		t.Fatalf("next renewal %s before expiry, want a third of the lifetime", lead)
	}
	waitUntil(t, 5*time.Second, func() bool { return src.Status().Renewals >= 1 })
	now, _ := src.GetX509SVID()
	if now.Certificates[0].Equal(first.Certificates[0]) || now.PrivateKey.(*ecdsa.PrivateKey).Equal(first.PrivateKey) {
		t.Fatal("renewal did not replace the certificate and key")
	}
	f.setDown(true)
	waitUntil(t, 5*time.Second, func() bool { st := src.Status(); return st.Failures >= 2 && !st.Healthy })
	st = src.Status()
	if !time.Now().Before(st.NotAfter) || st.LastError == "" {
		t.Fatalf("degraded at or after expiry: %+v", st)
	}
	if cur, _ := src.GetX509SVID(); !cur.Certificates[0].Equal(now.Certificates[0]) {
		t.Fatal("the current certificate was dropped while the CA is down")
	}
	f.setDown(false)
	waitUntil(t, 5*time.Second, func() bool { return src.Status().Healthy })
	if st := src.Status(); st.LastError != "" || st.Renewals < 2 {
		t.Fatalf("after recovery: %+v", st)
	}
}

func TestRenewingSourceOptions(t *testing.T) {
	ca := newTestCA(t, "example.org")
	f := &fakeIssuer{ca: ca, ttl: time.Hour}
	id := spiffeid.RequireFromString("spiffe://example.org/w")
	src, err := NewRenewingSource(context.Background(), f, id, WithCertTTL(time.Hour), WithRenewBefore(10*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	st := src.Status()
	if lead := st.NotAfter.Sub(st.NextRenewal); lead < 9*time.Minute || lead > 11*time.Minute {
		t.Fatalf("renew-before 10m scheduled %s before expiry", lead)
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	for _, opts := range [][]RenewOption{
		{WithCertTTL(time.Minute), WithRenewBefore(time.Minute)},
		{WithRenewAt(1.5)},
		{WithCertTTL(-time.Second)},
		{WithRetryBackoff(time.Second, time.Millisecond)},
	} {
		if _, err := NewRenewingSource(context.Background(), f, id, opts...); err == nil {
			t.Error("bad options accepted")
		}
	}
	f.setDown(true)
	if _, err := NewRenewingSource(context.Background(), f, id); err == nil || !strings.Contains(err.Error(), "join") {
		t.Fatalf("join failure: %v", err)
	}
}

func waitUntil(t *testing.T, limit time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(10 * time.Millisecond)
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
	addr := serve(t, ServerConfig(server))
	if _, err := dial(addr, ClientConfig(client, WithAuthorizer(AuthorizeAny()))); err != nil {
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
	if _, err := dial(serve(t, ServerConfig(renewed)), ClientConfig(client, WithAuthorizer(AuthorizeAny()))); err == nil {
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
