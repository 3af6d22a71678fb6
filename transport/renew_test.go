package transport

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"math/big"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// denySource is a StaticSource with a denylist that can change.
type denySource struct {
	StaticSource
	deny atomic.Pointer[serialDenylist]
}

func (d *denySource) GetDenylist() Denylist {
	if l := d.deny.Load(); l != nil {
		return l
	}
	return nil
}

// serialDenylist denies leaves by serial number and by SPIFFE ID (package pki's
// Denylist is the real one).
type serialDenylist struct {
	serial *big.Int
	id     spiffeid.ID
}

func (d *serialDenylist) Check(chain []*x509.Certificate) error {
	if d.serial != nil && chain[0].SerialNumber.Cmp(d.serial) == 0 {
		return errors.New("serial revoked")
	}
	if id, err := x509svid.IDFromCert(chain[0]); err == nil && id == d.id {
		return errors.New("ID revoked")
	}
	return nil
}

func TestDenylistRefusesIncludingResumedSessions(t *testing.T) {
	ca := newTestCA(t, "example.org")
	server := &denySource{StaticSource: ca.testSource(t, "spiffe://example.org/server", time.Hour)}
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
	server.deny.Store(&serialDenylist{serial: client.SVID.Certificates[0].SerialNumber})
	// The client resumes its session; VerifyConnection runs again and refuses it.
	if _, err := dial(addr, cfg); err == nil {
		t.Fatal("revoked serial accepted on a resumed session")
	}
	if obs.lastReason() != ReasonRevoked {
		t.Fatalf("reason %q, want %q", obs.lastReason(), ReasonRevoked)
	}
	server.deny.Store(&serialDenylist{id: spiffeid.RequireFromString("spiffe://example.org/client")})
	other := ca.testSource(t, "spiffe://example.org/client", time.Hour) // a new leaf, same ID
	if _, err := dial(addr, ClientConfig(other, WithAuthorizer(AuthorizeAny()))); err == nil || obs.lastReason() != ReasonRevoked {
		t.Fatalf("revoked ID accepted: %v (%s)", err, obs.lastReason())
	}
	server.deny.Store(nil)
	if _, err := dial(addr, ClientConfig(other, WithAuthorizer(AuthorizeAny()))); err != nil {
		t.Fatalf("after the denylist is emptied: %v", err)
	}
}

// fakeIssuer is an Issuer over a local CA whose renewals can be made to fail.
type fakeIssuer struct {
	ca     *testCA
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
	return &Issued{Chain: chain, Trust: Trust{TrustDomain: f.ca.td, Roots: f.ca.Bundle()}}, nil
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
	return &Trust{TrustDomain: f.ca.td, Roots: f.ca.Bundle()}, nil
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

// TestRenewalRetryBeforeExpiry: an attempt may wait on a slow CA for most of the life
// left, and the retry after it always comes before expiry, whatever the backoff (an
// expired certificate cannot authenticate a renewal).
func TestRenewalRetryBeforeExpiry(t *testing.T) {
	for _, left := range []time.Duration{500 * time.Millisecond, 3 * time.Second, 10 * time.Second, 33 * time.Second, time.Hour} {
		timeout := attemptTimeout(left)
		if timeout > 30*time.Second || (left > time.Second && timeout >= left) {
			t.Fatalf("left %s: attempt timeout %s", left, timeout)
		}
		if left > 8*time.Second && timeout < min(30*time.Second, left*3/4) {
			t.Fatalf("left %s: attempt timeout %s gives up on a slow CA while more than a quarter of the life left remains", left, timeout)
		}
		after := left - timeout // what is left when the attempt gives up
		for _, backoff := range []time.Duration{time.Millisecond, time.Second, time.Minute} {
			if after > 0 {
				if w := retryWait(jitter(backoff), after); w >= after {
					t.Fatalf("left %s, backoff %s: retry after %s, with %s left", left, backoff, w, after)
				}
			}
		}
	}
	if w := retryWait(time.Second, 0); w != time.Second {
		t.Fatalf("expired: retry after %s, want the backoff", w)
	}
}
