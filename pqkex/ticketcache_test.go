package pqkex

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"
	"time"
)

func TestTicketCache(t *testing.T) {
	k1, _ := GenerateTicketKey(1, nil)
	k2, _ := GenerateTicketKey(2, nil)
	k3, _ := GenerateTicketKey(3, nil)
	now := time.Unix(1_800_000_000, 0)
	keys, err := NewTicketKeySet(time.Hour, func() time.Time { return now }, k1)
	if err != nil {
		t.Fatal(err)
	}
	self := &Credential{spiffeID: katServerID}
	st := &ticketState{suite: X25519MLKEM768(), aead: AES256GCM, flags: flagBinding | flagPQOnly,
		sessionID: make([]byte, sessionIDSize), secret: make([]byte, 32), issued: unixSeconds(now),
		expiry: unixSeconds(now.Add(time.Minute)), clientID: "spiffe://example.org/c",
		serverHash: make([]byte, 32), bindingID: make([]byte, bindingIDSize),
		clientPK: make([]byte, X25519MLKEM768().PublicKeySize())}
	raw, err := keys.seal(nil, self.spiffeID, st.marshal(), now)
	if err != nil {
		t.Fatal(err)
	}
	header := base64.RawURLEncoding.EncodeToString(raw)
	var cache ticketCache
	for i := range 2 { // opened, then from the cache
		got, err := keys.openTicketHeader(&cache, header, self, now)
		if err != nil || string(got.marshal()) != string(st.marshal()) {
			t.Fatalf("open %d: %v", i, err)
		}
	}
	if len(cache.byHeader) != 1 || len(cache.bySID) != 1 {
		t.Fatalf("%d, %d cached tickets, want 1", len(cache.byHeader), len(cache.bySID))
	}
	// The short form finds the session by ID; unknown or malformed IDs are refused.
	sid := base64.RawURLEncoding.EncodeToString(st.sessionID)
	if got, err := keys.openSessionHeader(&cache, sid, now); err != nil || got.secret == nil {
		t.Fatalf("session by ID: %v", err)
	}
	other := base64.RawURLEncoding.EncodeToString(make([]byte, 15)) + "AA"[:1]
	for h, want := range map[string]error{
		base64.RawURLEncoding.EncodeToString([]byte("0123456789abcdef")): errUnknownSession,
		other: errMalformed, "": errMalformed, sid + "A": errMalformed, "!" + sid[1:]: errMalformed,
	} {
		if _, err := keys.openSessionHeader(&cache, h, now); !errors.Is(err, want) {
			t.Errorf("session header %q: %v, want %v", h, err, want)
		}
	}
	if _, err := keys.openSessionHeader(&cache, sid, now.Add(time.Minute)); !errors.Is(err, errTicketExpired) {
		t.Fatalf("expired session by ID: %v", err)
	}
	// Expiry is checked on every use.
	if _, err := keys.openTicketHeader(&cache, header, self, now.Add(time.Minute)); !errors.Is(err, errTicketExpired) {
		t.Fatalf("expired cached ticket: %v", err)
	}
	// After a rotation the cached session stays usable while its ticket's key is the
	// previous one, and is refused once that key has left the set.
	if err := keys.Rotate(k2); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.openSessionHeader(&cache, sid, now); err != nil {
		t.Fatalf("session by ID, ticket under the previous key: %v", err)
	}
	if _, err := keys.openTicketHeader(&cache, header, self, now); err != nil {
		t.Fatalf("ticket under the previous key: %v", err)
	}
	if err := keys.Rotate(k3); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.openTicketHeader(&cache, header, self, now); !errors.Is(err, errUnknownTicket) {
		t.Fatalf("cached ticket whose key left the set: %v", err)
	}
	if _, err := keys.openSessionHeader(&cache, sid, now); !errors.Is(err, errUnknownSession) {
		t.Fatalf("session by ID whose ticket key left the set: %v", err)
	}
	// A later key that reuses the ID of the ticket's key is another key.
	k1again, _ := GenerateTicketKey(1, nil)
	if err := keys.Rotate(k1again); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.openSessionHeader(&cache, sid, now); !errors.Is(err, errUnknownSession) {
		t.Fatalf("session by ID after its key's ID was reused: %v", err)
	}
	if _, err := keys.openTicketHeader(&cache, header, self, now); !errors.Is(err, errUnknownTicket) {
		t.Fatalf("ticket after its key's ID was reused: %v", err)
	}
	// A header that does not open is never cached.
	if _, err := keys.openTicketHeader(&cache, "!", self, now); !errors.Is(err, errMalformed) {
		t.Fatalf("bad base64: %v", err)
	}
	// The cache stays bounded.
	for i := range maxCachedTickets + 10 {
		s := &ticketState{suite: st.suite, expiry: st.expiry, sessionID: binary.BigEndian.AppendUint64(make([]byte, 8), uint64(i))}
		cache.put(keys, fmt.Sprint(i), s, 0, keys.gen.Load(), unixSeconds(now))
	}
	if n, m := len(cache.byHeader), len(cache.bySID); n > maxCachedTickets || m > maxCachedTickets {
		t.Fatalf("%d, %d cached tickets, bound %d", n, m, maxCachedTickets)
	}
}
