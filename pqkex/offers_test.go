package pqkex

import (
	"testing"
)

// TestOffers: the version and suite offers of a ClientHello (spec 5.1, 5.5) are checked
// before anything else of the hello is used.
func TestOffers(t *testing.T) {
	v := loadKAT(t)[0]
	ch, err := parseClientHello(v.ClientHello)
	if err != nil {
		t.Fatal(err)
	}
	suite := ch.suite.ID()
	for _, tc := range []struct {
		name     string
		versions []uint8
		suites   []uint16
		want     reason
	}{
		{"own version missing", []uint8{3}, []uint16{suite}, reasonMalformed},
		{"repeated version", []uint8{2, 2}, []uint16{suite}, reasonMalformed},
		{"no versions", nil, []uint16{suite}, reasonMalformed},
		{"nine versions", []uint8{2, 3, 4, 5, 6, 7, 8, 9, 10}, []uint16{suite}, reasonMalformed},
		{"chosen suite not offered", []uint8{2}, []uint16{suite + 1}, reasonUnsupported},
		{"repeated suite", []uint8{2}, []uint16{suite, suite}, reasonMalformed},
		{"no suites", []uint8{2}, nil, reasonMalformed},
		{"lower versions also offered", []uint8{2, 1}, []uint16{suite, suite + 1}, ""},
	} {
		m := *ch
		m.versions, m.suites = tc.versions, tc.suites
		_, err := parseClientHello(m.marshal())
		if got := reasonOf(err); (tc.want == "" && err != nil) || (tc.want != "" && got != tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	// A server that speaks 3 as well refuses a version-2 hello that offers 3: the client
	// goes lower only after a refusal, which such a server never sends (a downgrade).
	saved := serverVersions
	defer func() { serverVersions = saved }()
	serverVersions = []uint8{3, 2}
	m := *ch
	m.versions = []uint8{3, 2}
	if _, err := parseClientHello(m.marshal()); reasonOf(err) != reasonVersion {
		t.Errorf("downgraded hello: %v, want version", err)
	}
	m.versions = []uint8{2}
	if _, err := parseClientHello(m.marshal()); err != nil {
		t.Errorf("hello of a client that speaks only 2, to a server of 3 and 2: %v", err)
	}
}

// TestServerHelloEcho: a ServerHello must echo the hello's suite and AEAD and be of the
// hello's version.
func TestServerHelloEcho(t *testing.T) {
	v := loadKAT(t)[0]
	suite, aead, flags := SchemeByName(v.Suite), aeadByName(v.AEAD), helloFlags(v)
	if _, err := parseServerHello(v.ServerHello, suite, aead, flags); err != nil {
		t.Fatal(err)
	}
	for i, want := range map[int]reason{0: reasonVersion, 3: reasonMalformed, 5: reasonMalformed} {
		b := append([]byte(nil), v.ServerHello...)
		b[i] ^= 0x01
		if _, err := parseServerHello(b, suite, aead, flags); reasonOf(err) != want {
			t.Errorf("byte %d changed: %v, want %s", i, err, want)
		}
	}
}

// TestTicketOfAnotherVersion: a ticket whose plaintext is of another wire version (a
// session made by a version-1 replica under the same ticket key) is refused as
// unknown_ticket, so the client makes a new session (spec 5.5, 7).
func TestTicketOfAnotherVersion(t *testing.T) {
	v := loadKAT(t)[0]
	if _, err := parseTicketState(v.TicketPlaintext); err != nil {
		t.Fatal(err)
	}
	for _, version := range []byte{1, 3} {
		b := append([]byte(nil), v.TicketPlaintext...)
		b[0] = version
		if _, err := parseTicketState(b); err != errUnknownTicket {
			t.Errorf("ticket of version %d: %v, want unknown_ticket", version, err)
		}
	}
}
