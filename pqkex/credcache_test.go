package pqkex

import (
	"bytes"
	"errors"
	"fmt"
	"hash/maphash"
	"testing"
	"testing/iotest"
	"time"
)

// TestCredentialCache checks the cache of verified peer credentials (credCache): a
// credential verifies once and is then served as the same parsed value; a credential
// re-issued under the same SPIFFE ID (other bytes) is verified on its own, and one the roots
// did not sign is refused even while a credential of its SPIFFE ID is cached; a cached
// credential is refused outside its validity period.
func TestCredentialCache(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	ca, other := newTestIssuer(t), newTestIssuer(t)
	const id = "spiffe://example.org/client"
	nb, na := now.Add(-time.Hour), now.Add(time.Hour)
	first := ca.identity(t, X25519MLKEM768(), id, nb, na).cred.raw
	var cc credCache
	a, err := cc.verify(ca.roots, first, now)
	if err != nil {
		t.Fatal(err)
	}
	b, err := cc.verify(ca.roots, append([]byte(nil), first...), now)
	if err != nil || b != a {
		t.Fatalf("second lookup: %v, same credential %v; want the cached one", err, b == a)
	}

	// Re-issued with another key, same SPIFFE ID: not the cached credential.
	second := ca.identity(t, X25519MLKEM768(), id, nb, na).cred.raw
	c, err := cc.verify(ca.roots, second, now)
	if err != nil || c == a || string(c.raw) != string(second) || string(c.publicKey) == string(a.publicKey) {
		t.Fatalf("re-issued credential: %v, served the first: %v", err, c == a)
	}
	// Same SPIFFE ID, signed by another CA: refused, whatever is cached.
	forged := other.identity(t, X25519MLKEM768(), id, nb, na).cred.raw
	if _, err := cc.verify(ca.roots, forged, now); !errors.Is(err, errCredential) {
		t.Fatalf("credential of another CA: %v, want %v", err, errCredential)
	}
	// One flipped byte of a cached credential: verified on its own, and refused.
	tampered := append([]byte(nil), first...)
	tampered[len(tampered)-1] ^= 1
	if _, err := cc.verify(ca.roots, tampered, now); err == nil {
		t.Fatal("a tampered copy of a cached credential verified")
	}

	// Outside the validity period, a cached credential is refused.
	for _, at := range []time.Time{na, na.Add(time.Hour), nb.Add(-time.Second)} {
		if _, err := cc.verify(ca.roots, first, at); !errors.Is(err, errCredentialTime) {
			t.Fatalf("cached credential at %v: %v, want %v", at, err, errCredentialTime)
		}
	}
	if got := cc.len(); got != 2 {
		t.Fatalf("%d cached credentials, want 2", got)
	}
}

// TestCredentialCacheCollision checks that an entry under the same cache key but with other
// bytes (a maphash collision, forced here) is never served: the credential is verified and
// takes the entry.
func TestCredentialCacheCollision(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	ca := newTestIssuer(t)
	x := ca.identity(t, X25519MLKEM768(), "spiffe://example.org/x", now.Add(-time.Hour), now.Add(time.Hour)).cred
	y := ca.identity(t, X25519MLKEM768(), "spiffe://example.org/y", now.Add(-time.Hour), now.Add(time.Hour)).cred
	var cc credCache
	if _, err := cc.verify(ca.roots, x.raw, now); err != nil {
		t.Fatal(err)
	}
	cc.m[maphash.Bytes(cc.seed, y.raw)] = x // y's key now names x
	got, err := cc.verify(ca.roots, y.raw, now)
	if err != nil || got.spiffeID != y.spiffeID || string(got.raw) != string(y.raw) {
		t.Fatalf("collision: %v, got %q, want %q", err, got.spiffeID, y.spiffeID)
	}
}

// TestCredentialCacheBound checks that the cache stays within maxCachedCredentials: when
// full, it drops the expired credentials first, and only if that is not enough arbitrary
// ones, down to three quarters of the bound.
func TestCredentialCacheBound(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	ca := newTestIssuer(t)
	fresh := ca.identity(t, X25519MLKEM768(), "spiffe://example.org/new", now.Add(-time.Hour), now.Add(time.Hour)).cred.raw
	live := &Credential{notBefore: now.Add(-time.Hour), notAfter: now.Add(time.Hour)}
	expired := &Credential{notBefore: now.Add(-2 * time.Hour), notAfter: now.Add(-time.Hour)}

	fill := func(cc *credCache, expiredShare int) {
		cc.m = make(map[uint64]*Credential, maxCachedCredentials)
		cc.seed = maphash.MakeSeed()
		for i := range maxCachedCredentials {
			c := live
			if i%expiredShare == 0 {
				c = expired
			}
			cc.m[uint64(i)+1<<40] = c // keys maphash would give with negligible probability
		}
	}

	// Half the entries expired: they go, and every live one stays.
	var cc credCache
	fill(&cc, 2)
	if _, err := cc.verify(ca.roots, fresh, now); err != nil {
		t.Fatal(err)
	}
	lives := 0
	for _, c := range cc.m {
		if c == expired {
			t.Fatal("an expired credential stayed in a full cache")
		}
		if c == live {
			lives++
		}
	}
	if lives != maxCachedCredentials/2 || cc.len() != maxCachedCredentials/2+1 {
		t.Fatalf("%d live of %d entries, want %d of %d", lives, cc.len(), maxCachedCredentials/2, maxCachedCredentials/2+1)
	}

	// None expired: arbitrary ones go, down to three quarters, and the new one is cached.
	fill(&cc, maxCachedCredentials+1) // only entry 0 expired
	c, err := cc.verify(ca.roots, fresh, now)
	if err != nil {
		t.Fatal(err)
	}
	if n := cc.len(); n > maxCachedCredentials*3/4 || n < maxCachedCredentials/2 {
		t.Fatalf("%d entries after making room, want at most %d", n, maxCachedCredentials*3/4)
	}
	if again, err := cc.verify(ca.roots, fresh, now); err != nil || again != c {
		t.Fatalf("the new credential is not cached: %v", err)
	}
}

// TestReadHandshakeBody checks the reading of handshake messages: a body of its declared
// length, or of no declared length within the limit, is read whole; one shorter or longer
// than declared, or over the limit, is malformed.
func TestReadHandshakeBody(t *testing.T) {
	body := bytes.Repeat([]byte{7}, 6700)
	long := bytes.Repeat([]byte{9}, handshakeBodyPrealloc+3000)
	for _, c := range []struct {
		name     string
		body     []byte
		declared int64
		ok       bool
	}{
		{"declared", body, int64(len(body)), true},
		{"undeclared", body, -1, true},
		{"empty", nil, 0, true},
		{"shorter than declared", body, int64(len(body)) + 1, false},
		{"longer than declared", body, int64(len(body)) - 1, false},
		{"declared over the limit", make([]byte, maxHandshakeBody+1), maxHandshakeBody + 1, false},
		{"undeclared over the limit", make([]byte, maxHandshakeBody+1), -1, false},
		{"at the limit", make([]byte, maxHandshakeBody), -1, true},
		{"declared at the limit", make([]byte, maxHandshakeBody), maxHandshakeBody, true},
		{"declared, over the reservation", long, int64(len(long)), true},
		{"over the reservation, shorter than declared", long, int64(len(long)) + 1, false},
		{"over the reservation, longer than declared", long, int64(len(long)) - 1, false},
	} {
		got, err := readHandshakeBody(bytes.NewReader(c.body), c.declared)
		if c.ok && (err != nil || !bytes.Equal(got, c.body)) {
			t.Errorf("%s: %v, %d bytes", c.name, err, len(got))
		}
		if !c.ok && !errors.Is(err, errMalformed) {
			t.Errorf("%s: %v, want %v", c.name, err, errMalformed)
		}
	}
	if _, err := readHandshakeBody(iotest.ErrReader(errors.New("broken")), 10); err == nil || errors.Is(err, errMalformed) {
		t.Errorf("read error: %v, want it passed on", err)
	}
}

// stallReader is a request body whose peer declared a length and then sent nothing: it
// records the largest buffer a Read was given before failing.
type stallReader struct{ largest int }

func (r *stallReader) Read(p []byte) (int, error) {
	r.largest = max(r.largest, len(p))
	return 0, errors.New("stream reset")
}

// TestReadHandshakeBodyReservesWhatArrives: a declared length is a claim, not data. A
// peer that declares the limit and sends nothing (a stalled HTTP/2 stream costs it a few
// header bytes, and a connection carries hundreds) must not make the server reserve the
// limit for it; at most what a valid handshake message needs.
func TestReadHandshakeBodyReservesWhatArrives(t *testing.T) {
	var r stallReader
	if _, err := readHandshakeBody(&r, maxHandshakeBody); err == nil {
		t.Fatal("a stalled body was read")
	}
	if r.largest > handshakeBodyPrealloc {
		t.Fatalf("%d bytes reserved for a body that sent none, want at most %d", r.largest, handshakeBodyPrealloc)
	}

	// The largest valid messages (the X448 suite, a SPIFFE ID of the most bytes allowed,
	// its own ephemeral) still fit the reservation, with room for a longer classical
	// signature (ECDSA P-384 rather than Ed25519) and every suite offered.
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	ca := newTestIssuer(t)
	suite := X448MLKEM1024()
	long := "spiffe://example.org/" + string(bytes.Repeat([]byte{'a'}, maxSPIFFEID-len("spiffe://example.org/")))
	nb, na := now.Add(-time.Hour), now.Add(time.Hour)
	server, client := ca.identity(t, suite, long, nb, na), ca.identity(t, suite, long, nb, na)
	keys, err := NewTicketKeySet(time.Hour, func() time.Time { return now }, TicketKey{ID: 1})
	if err != nil {
		t.Fatal(err)
	}
	hs, err := startClient(nil, client, server.cred, AES256GCM, 0)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := parseClientHello(hs.raw)
	if err != nil {
		t.Fatal(err)
	}
	issue := func(sec handshakeSecrets) ([]byte, uint64, error) {
		st := &ticketState{suite: ch.suite, aead: ch.aead, flags: ch.flags, sessionID: sec.sessionID, secret: sec.session,
			issued: unixSeconds(now), expiry: unixSeconds(na), serverHash: server.cred.hash,
			clientID: client.cred.spiffeID, clientPK: client.cred.publicKey}
		tk, err := keys.seal(nil, server.cred.spiffeID, st.marshal(), now)
		return tk, st.expiry, err
	}
	sh, _, err := respond(nil, ch, server, client.cred, nil, issue)
	if err != nil {
		t.Fatal(err)
	}
	const slack = 256
	for name, n := range map[string]int{"ClientHello": len(hs.raw), "ServerHello": len(sh)} {
		t.Logf("largest %s: %d bytes", name, n)
		if n+slack > handshakeBodyPrealloc {
			t.Errorf("largest %s: %d bytes (+%d), over the %d reserved", name, n, slack, handshakeBodyPrealloc)
		}
	}
}

// TestCredentialCacheConcurrent runs lookups, verifications and evictions of a full cache
// on several goroutines at once (run with -race): every answer is the credential asked
// for, and a refused one stays refused.
func TestCredentialCacheConcurrent(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	ca, other := newTestIssuer(t), newTestIssuer(t)
	nb, na := now.Add(-time.Hour), now.Add(time.Hour)
	var good [][]byte
	for _, id := range []string{"a", "b", "c", "d"} {
		good = append(good, ca.identity(t, X25519MLKEM768(), "spiffe://example.org/"+id, nb, na).cred.raw)
	}
	forged := other.identity(t, X25519MLKEM768(), "spiffe://example.org/a", nb, na).cred.raw
	var cc credCache
	cc.seed = maphash.MakeSeed()
	cc.m = make(map[uint64]*Credential, maxCachedCredentials)
	live := &Credential{notBefore: nb, notAfter: na}
	for i := range maxCachedCredentials - 2 {
		cc.m[uint64(i)+1<<40] = live // full but for two: the goroutines' insertions evict
	}
	errs := make(chan error, 8)
	for g := range 8 {
		go func() {
			for i := range 6 {
				b := good[(g+i)%len(good)]
				c, err := cc.verify(ca.roots, b, now)
				if err != nil || !bytes.Equal(c.raw, b) {
					errs <- fmt.Errorf("goroutine %d: %v, right credential %v", g, err, err == nil && bytes.Equal(c.raw, b))
					return
				}
				if _, err := cc.verify(ca.roots, forged, now); err == nil {
					errs <- fmt.Errorf("goroutine %d: forged credential accepted", g)
					return
				}
			}
			errs <- nil
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if n := cc.len(); n > maxCachedCredentials {
		t.Fatalf("%d entries, over the bound %d", n, maxCachedCredentials)
	}
}
