package pqkex

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"syscall"
	"testing"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
)

// testIssuer is a CA for internal tests: an ML-DSA-65 and an Ed25519 key.
type testIssuer struct {
	pq    *mldsa65.PrivateKey
	cl    ed25519.PrivateKey
	roots Roots
}

func newTestIssuer(t testing.TB) *testIssuer {
	t.Helper()
	pqPub, pqCA, err := mldsa65.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	clPub, clCA, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &testIssuer{pq: pqCA, cl: clCA, roots: Roots{PQ: pqPub, Classical: clPub}}
}

// identity issues a credential for a new static key of suite and returns the identity.
func (ca *testIssuer) identity(t testing.TB, suite Scheme, id string, notBefore, notAfter time.Time) *Identity {
	t.Helper()
	pub, priv, err := GenerateKey(suite, nil)
	if err != nil {
		t.Fatal(err)
	}
	cred, err := IssueCredential(ca.pq, ca.cl, suite, id, notBefore, notAfter, pub)
	if err != nil {
		t.Fatal(err)
	}
	ident, err := NewIdentity(cred, priv)
	if err != nil {
		t.Fatal(err)
	}
	return ident
}

// handshakeParties makes a CA, a server and a client identity of suite, valid around now.
func handshakeParties(t testing.TB, suite Scheme, now time.Time) (roots Roots, server, client *Identity) {
	t.Helper()
	ca := newTestIssuer(t)
	nb, na := now.Add(-time.Hour), now.Add(24*time.Hour)
	return ca.roots, ca.identity(t, suite, "spiffe://example.org/server", nb, na), ca.identity(t, suite, "spiffe://example.org/client", nb, na)
}

// processCPU returns the process's user+system CPU time: on a shared machine it counts
// only what this process ran, unlike ns/op (wall time).
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkHandshakeParts splits a channel-bound pqkex handshake on a post-quantum TLS
// connection (the session setup of docs/pqkex.md section 11) into its steps, each on its
// own, so that the cost account of section 11 can be checked: the ML-KEM-768 operations,
// the client's hello, the server's parsing and credential lookup, its reply (with the
// ticket) and the client's finish.
func BenchmarkHandshakeParts(b *testing.B) {
	suite := X25519MLKEM768()
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	roots, server, client := handshakeParties(b, suite, now)
	keys, err := NewTicketKeySet(time.Hour, func() time.Time { return now }, TicketKey{ID: 1})
	if err != nil {
		b.Fatal(err)
	}
	flags := clientFlags(true, true)
	cb := make([]byte, 32)
	k := innerKEM(suite, flags)
	var creds credCache
	if _, err := creds.verify(roots, client.cred.raw, now); err != nil {
		b.Fatal(err)
	}
	issue := func(ch *clientHello, peer *Credential) ticketIssuer {
		return func(sec handshakeSecrets) ([]byte, uint64, error) {
			st := &ticketState{suite: ch.suite, aead: ch.aead, flags: ch.flags, sessionID: sec.sessionID, secret: sec.session,
				issued: unixSeconds(now), expiry: unixSeconds(now.Add(time.Hour)), serverHash: server.cred.hash,
				clientID: peer.spiffeID, clientPK: peer.publicKey, bindingID: bindingID(cb)}
			t, err := keys.seal(nil, server.cred.spiffeID, st.marshal(), now)
			return t, st.expiry, err
		}
	}
	hs, err := startClient(nil, client, server.cred, AES256GCM, flags)
	if err != nil {
		b.Fatal(err)
	}
	ch, err := parseClientHello(hs.raw)
	if err != nil {
		b.Fatal(err)
	}
	peer, err := creds.verify(roots, ch.credential, now)
	if err != nil {
		b.Fatal(err)
	}
	sh, _, err := respond(nil, ch, server, peer, cb, issue(ch, peer))
	if err != nil {
		b.Fatal(err)
	}
	serverPK, err := staticPublic(k, server.cred)
	if err != nil {
		b.Fatal(err)
	}
	ct, _, err := k.Encapsulate(serverPK)
	if err != nil {
		b.Fatal(err)
	}
	steps := []struct {
		name string
		f    func() error
	}{
		{"mlkem768-encapsulate", func() error { _, _, err := k.Encapsulate(serverPK); return err }},
		{"mlkem768-decapsulate", func() error { _, err := k.Decapsulate(server.pqPriv, ct); return err }},
		{"client-start", func() error { _, err := startClient(nil, client, server.cred, AES256GCM, flags); return err }},
		{"server-parse-hello", func() error { _, err := parseClientHello(hs.raw); return err }},
		{"server-credential-lookup", func() error { _, err := creds.verify(roots, ch.credential, now); return err }},
		{"server-respond", func() error { _, _, err := respond(nil, ch, server, peer, cb, issue(ch, peer)); return err }},
		{"server-ticket", func() error {
			_, _, err := issue(ch, peer)(handshakeSecrets{session: make([]byte, 32), sessionID: make([]byte, 16)})
			return err
		}},
		{"client-finish", func() error { _, err := hs.finish(sh, cb); return err }},
		{"client-call-root", func() error {
			callRoot(suite.Hash(), make([]byte, 32), server.cred.spiffeID, server.cred.hash)
			return nil
		}},
	}
	for _, s := range steps {
		b.Run(s.name, func(b *testing.B) {
			b.ReportAllocs()
			start := processCPU(b)
			for range b.N {
				if err := s.f(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(processCPU(b)-start)/float64(b.N), "cpu-ns/op")
		})
	}
}

// TestHandshakeAllocations bounds the allocations of a channel-bound handshake on a
// post-quantum TLS connection, both sides in memory (the client's hello, the server's
// parsing, credential lookup and reply with its ticket, the client's finish): 42 since
// issue 21 (80 before: re-encoded transcript messages, a SHA-256 of the client credential
// per handshake, unsized buffers, an HMAC instance per key-schedule step).
func TestHandshakeAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	suite := X25519MLKEM768()
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	roots, server, client := handshakeParties(t, suite, now)
	keys, err := NewTicketKeySet(time.Hour, func() time.Time { return now }, TicketKey{ID: 1})
	if err != nil {
		t.Fatal(err)
	}
	var creds credCache
	cb := make([]byte, 32)
	handshake := func() {
		hs, err := startClient(nil, client, server.cred, AES256GCM, clientFlags(true, true))
		if err != nil {
			t.Fatal(err)
		}
		ch, err := parseClientHello(hs.raw)
		if err != nil {
			t.Fatal(err)
		}
		peer, err := creds.verify(roots, ch.credential, now)
		if err != nil {
			t.Fatal(err)
		}
		sh, sec, err := respond(nil, ch, server, peer, cb, func(sec handshakeSecrets) ([]byte, uint64, error) {
			st := &ticketState{suite: ch.suite, aead: ch.aead, flags: ch.flags, sessionID: sec.sessionID, secret: sec.session,
				issued: unixSeconds(now), expiry: unixSeconds(now.Add(time.Hour)), serverHash: server.cred.hash,
				clientID: peer.spiffeID, clientPK: peer.publicKey, bindingID: bindingID(cb)}
			tk, err := keys.seal(nil, server.cred.spiffeID, st.marshal(), now)
			return tk, st.expiry, err
		})
		if err != nil {
			t.Fatal(err)
		}
		res, err := hs.finish(sh, cb)
		if err != nil || !bytes.Equal(res.secrets.session, sec.session) {
			t.Fatalf("handshake: %v", err)
		}
	}
	handshake() // the credential verified and cached, the static key parsed
	allocs := testing.AllocsPerRun(50, handshake)
	if allocs > 48 {
		t.Fatalf("%v allocations per handshake, want at most 48", allocs)
	}
	t.Logf("%v allocations per handshake", allocs)
}
