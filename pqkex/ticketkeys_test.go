package pqkex

import (
	"bytes"
	"crypto/sha512"
	"encoding/base64"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// testClock is a clock the test moves.
type testClock struct{ t time.Time }

func (c *testClock) now() time.Time { return c.t }

func testTicket(t *testing.T, keys *TicketKeys, serverID, clientID string, now time.Time) []byte {
	t.Helper()
	st := &ticketState{suite: X25519MLKEM768(), aead: AES256GCM, sessionID: make([]byte, sessionIDSize),
		secret: make([]byte, 32), issued: unixSeconds(now), expiry: unixSeconds(now.Add(3 * time.Hour)), // longer than any key lives: only erasure refuses it
		serverHash: make([]byte, 32), clientID: clientID, clientPK: make([]byte, X25519MLKEM768().PublicKeySize())}
	raw, err := keys.seal(nil, serverID, st.marshal(), now)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// TestTicketKeyErasure: after a rotation the previous key opens tickets for one period and is
// then erased (its secret overwritten), driven by the key set's clock; its tickets are then
// refused (spec 7.2).
func TestTicketKeyErasure(t *testing.T) {
	clk := &testClock{t: time.Unix(1_800_000_000, 0)}
	k1, _ := GenerateTicketKey(1, nil)
	k2, _ := GenerateTicketKey(2, nil)
	keys, err := NewTicketKeySet(time.Hour, clk.now, k1)
	if err != nil {
		t.Fatal(err)
	}
	ticket := testTicket(t, keys, katServerID, "spiffe://example.org/c", clk.t)
	old := keys.current
	clk.t = clk.t.Add(30 * time.Minute)
	if err := keys.Rotate(k2); err != nil {
		t.Fatal(err)
	}
	clk.t = clk.t.Add(time.Hour - time.Second)
	if _, err := keys.openTicket(ticket, katServerID, clk.t); err != nil || !keys.Has(1) {
		t.Fatalf("within the previous key's period: %v, Has(1) = %v", err, keys.Has(1))
	}
	clk.t = clk.t.Add(time.Second)
	if keys.Has(1) {
		t.Fatal("the previous key is still held after its period")
	}
	if old.secret != [32]byte{} {
		t.Fatal("the erased key's secret was not overwritten")
	}
	if _, err := keys.openTicket(ticket, katServerID, clk.t); !errors.Is(err, errUnknownTicket) {
		t.Fatalf("ticket under an erased key: %v, want unknown_ticket", err)
	}
}

// TestRotatingTicketKeys: a server's own key set draws a new key every period and erases the
// old one a period later; the server caps tickets at the period.
func TestRotatingTicketKeys(t *testing.T) {
	clk := &testClock{t: time.Unix(1_800_000_000, 0)}
	keys, err := NewRotatingTicketKeys(10*time.Minute, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	first := keys.CurrentID()
	ticket := testTicket(t, keys, katServerID, "spiffe://example.org/c", clk.t)
	clk.t = clk.t.Add(10 * time.Minute)
	if keys.CurrentID() == first || !keys.Has(first) {
		t.Fatalf("after one period: current %d (first %d), first held %v", keys.CurrentID(), first, keys.Has(first))
	}
	clk.t = clk.t.Add(10 * time.Minute)
	if keys.Has(first) {
		t.Fatal("the first key outlived two periods")
	}
	if _, err := keys.openTicket(ticket, katServerID, clk.t); !errors.Is(err, errUnknownTicket) {
		t.Fatalf("ticket under an erased key: %v", err)
	}
}

// TestTicketsPerTicketKey: every ticket has its own key (random salt, fixed nonce): two
// tickets of one plaintext differ everywhere after the key ID.
func TestTicketsPerTicketKey(t *testing.T) {
	k, _ := GenerateTicketKey(1, nil)
	keys, err := NewTicketKeys(k)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	a, b := testTicket(t, keys, katServerID, "spiffe://example.org/c", now), testTicket(t, keys, katServerID, "spiffe://example.org/c", now)
	if bytes.Equal(a[4:20], b[4:20]) || bytes.Equal(a[20:], b[20:]) {
		t.Fatal("two tickets share a salt or a ciphertext")
	}
}

// TestMintedTicketRefusedByOtherServices: a compromised service holds its own ticket keys
// and mints a ticket naming an identity it wants (an administrator) for every other service.
// No other service opens it, under its own keys, so no handler runs and rpc's policy, which
// sits behind the pqkex handler, never authorizes the identity (spec 7.1). A ticket minted
// under a shared secret for the compromised service's own ID is refused by the others too
// (the server binding).
func TestMintedTicketRefusedByOtherServices(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	const admin = "spiffe://example.org/admin"
	services := []string{"spiffe://example.org/a", "spiffe://example.org/b", "spiffe://example.org/c"}
	compromisedKey, _ := GenerateTicketKey(1, nil)
	compromised, _ := NewTicketKeys(compromisedKey)
	for _, svc := range services {
		k, _ := GenerateTicketKey(1, nil)
		own, _ := NewTicketKeys(k)
		shared, _ := NewTicketKeys(compromisedKey) // a deployment that (wrongly) shares a secret
		for name, tc := range map[string]struct {
			keys   *TicketKeys
			ticket []byte
		}{
			"minted for the service, under the compromised service's keys": {own, testTicket(t, compromised, svc, admin, now)},
			"minted for the compromised service, under a shared secret":    {shared, testTicket(t, compromised, "spiffe://example.org/compromised", admin, now)},
		} {
			var ran bool
			s := &Server{cfg: newConfig(), m: newMetrics(nil)}
			s.cfg.tickets = tc.keys
			s.cfg.identity = identityStub(svc)
			s.cfg.now = func() time.Time { return now }
			s.sc = s.m.forSide(sideServer)
			h := s.Handler(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { ran = true }))
			req := httptest.NewRequest(http.MethodPost, "/svc.v1.Admin/Do", bytes.NewReader(make([]byte, 64)))
			req.Header.Set(headerTicket, base64.RawURLEncoding.EncodeToString(tc.ticket))
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if ran || rec.Header().Get(headerError) != string(reasonUnknownTicket) {
				t.Errorf("%s, %s: handler ran %v, Veil-Pqkex-Error %q, want unknown_ticket", svc, name, ran, rec.Header().Get(headerError))
			}
		}
	}
}

// identityStub is an IdentitySource whose identity has only a credential with a SPIFFE ID:
// enough for a server to open (or refuse) tickets.
type identityStub string

func (s identityStub) GetIdentity() (*Identity, error) {
	return &Identity{cred: &Credential{spiffeID: string(s), suite: X25519MLKEM768()}}, nil
}

// TestX448NeverUsesTLSHalves: the X448 suite never leaves its classical half (bit 1) or its
// ephemeral (bit 2) to the TLS connection (spec 5.3): a client never offers it, a server
// refuses it as malformed, and channel-bound clients send flags 0x01.
func TestX448NeverUsesTLSHalves(t *testing.T) {
	for _, v := range loadKAT(t) {
		if v.Suite != X448MLKEM1024().Name() {
			continue
		}
		for _, f := range []uint8{flagBinding | flagPQOnly, flagBinding | flagPQOnly | flagTLSEphemeral} {
			hello := append([]byte(nil), v.ClientHello...)
			// version, type, the offered versions and suites (spec 5.1), suite, AEAD, flags.
			off := 2 + 1 + int(hello[2])
			off += 1 + 2*int(hello[off]) + 4
			hello[off] = f
			if _, err := parseClientHello(hello); !errors.Is(err, errMalformed) {
				t.Errorf("X448 hello with flags %#x: %v, want malformed", f, err)
			}
			if suiteFlags(X448MLKEM1024(), clientFlags(true, true)) != flagBinding {
				t.Errorf("channel-bound X448 client flags = %#x", suiteFlags(X448MLKEM1024(), clientFlags(true, true)))
			}
		}
	}
}

// TestSHA512SuiteBindsWithSHA512: in the SHA-512 suite the transcript and srv hold SHA-512
// hashes of both credentials (spec 5.2), not their SHA-256 names.
func TestSHA512SuiteBindsWithSHA512(t *testing.T) {
	for _, v := range loadKAT(t) {
		if v.Suite != X448MLKEM1024().Name() {
			continue
		}
		ch, err := parseClientHello(v.ClientHello)
		if err != nil {
			t.Fatal(err)
		}
		cs, ss := sha512.Sum512(v.ClientCredential), sha512.Sum512(v.ServerCredential)
		tr := ch.transcriptHello(cs[:], ss[:])
		if !bytes.Contains(tr, cs[:]) || !bytes.Contains(tr, ss[:]) || bytes.Contains(tr, ch.serverDigest[:]) {
			t.Fatal("CH' does not carry the SHA-512 hashes of both credentials in place of their names")
		}
		cred, err := ParseCredential(v.ServerCredential)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(cred.hash, ss[:]) {
			t.Fatal("the server credential's hash is not its SHA-512")
		}
		if !bytes.Equal(katServerHash(v), ss[:]) {
			t.Fatal("the vectors' srv does not use SHA-512")
		}
	}
}
