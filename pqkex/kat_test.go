package pqkex

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/sha3"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"golang.org/x/crypto/chacha20poly1305"
)

var update = flag.Bool("update", false, "rewrite testdata/kat.json from the implementation")

const katPath = "testdata/kat.json"

// katKeys are the keys a vector is computed from that it does not hold: the CA roots, the
// server's identity and the ticket keys.
type katKeys struct {
	roots   Roots
	server  *Identity
	tickets *TicketKeys
}

// katKeysOf recomputes vector v from its inputs and returns its keys; v must reproduce.
func katKeysOf(t testing.TB, v katVector) katKeys {
	t.Helper()
	got, keys := katRun(t, SchemeByName(v.Suite), aeadByName(v.AEAD), helloFlags(v))
	if !bytes.Equal(got.ServerCredential, v.ServerCredential) || !bytes.Equal(got.ResponseBody, v.ResponseBody) {
		t.Fatalf("%s: vector does not reproduce", v.Suite)
	}
	return keys
}

// serverOptions are the options of a server with the vector's identity, roots and ticket
// keys at the vector's time v.Now.
func (k katKeys) serverOptions(v katVector) []ServerOption {
	return []ServerOption{WithIdentity(k.server), WithRoots(k.roots), WithTicketKeys(k.tickets),
		WithClock(func() time.Time { return time.Unix(v.Now, 0) })}
}

// katServer returns a server with the identity, roots and ticket keys of vector v at the
// vector's time.
func katServer(t testing.TB, v katVector) *Server {
	t.Helper()
	s, err := NewServer(katKeysOf(t, v).serverOptions(v)...)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// shake is a deterministic byte stream for known-answer tests.
type shake struct{ s *sha3.SHAKE }

func newShake(seed string) shake {
	s := sha3.NewSHAKE256()
	s.Write([]byte(seed))
	return shake{s}
}

func (r shake) Read(p []byte) (int, error) { return r.s.Read(p) }

type hexBytes []byte

func (h hexBytes) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(h)), nil }
func (h *hexBytes) UnmarshalText(b []byte) error {
	d, err := hex.DecodeString(string(b))
	*h = d
	return err
}

// katVector pins every encoding and derived secret of one deterministic handshake and call.
type katVector struct {
	Suite            string   `json:"suite"`
	AEAD             string   `json:"aead"`
	Seed             string   `json:"seed"`
	Now              int64    `json:"now"`
	Bind             hexBytes `json:"channel_binding"`
	ServerCredential hexBytes `json:"server_credential"`
	ClientCredential hexBytes `json:"client_credential"`
	// The seeds the static and ephemeral key pairs derive from (spec 3), so that a reference
	// can decapsulate the vector's ciphertexts: they are secret in real use.
	ServerKeySeed   hexBytes `json:"server_key_seed"`
	ClientKeySeed   hexBytes `json:"client_key_seed"`
	EphemeralSeed   hexBytes `json:"ephemeral_seed,omitempty"`
	ClientHello     hexBytes `json:"client_hello"`
	ServerHello     hexBytes `json:"server_hello"`
	Session         hexBytes `json:"session_secret"`
	SessionID       hexBytes `json:"session_id"`
	TicketPlaintext hexBytes `json:"ticket_plaintext"`
	CallRoot        hexBytes `json:"call_root"`
	CallID          uint64   `json:"call_id"`
	Procedure       string   `json:"procedure"`
	Attempt         string   `json:"attempt"` // the request head's :attempt (spec 6.3, 6.4)
	ServerNonce     hexBytes `json:"server_nonce"`
	C2SKey          hexBytes `json:"c2s_key"`
	S2CKey          hexBytes `json:"s2c_key"`
	C2SSecret       hexBytes `json:"c2s_secret"`
	S2CSecret       hexBytes `json:"s2c_secret"`
	RequestBody     hexBytes `json:"request_body"`
	ResponseBody    hexBytes `json:"response_body"`
	RekeySS         hexBytes `json:"rekey_shared_secret"`
	RekeyCT         hexBytes `json:"rekey_ciphertext"`
	RekeyedSecret   hexBytes `json:"rekeyed_secret"`
}

var katCases = []struct {
	suite Scheme
	aead  AEAD
	flags uint8
}{
	{X25519MLKEM768(), AES256GCM, 0},
	{X25519MLKEM768(), ChaCha20Poly1305, flagBinding | flagPQOnly},
	{X448MLKEM1024(), AES256GCM, 0},
	// Channel-bound on a post-quantum TLS connection: no pqkex ephemeral (spec 5.3).
	{X25519MLKEM768(), AES256GCM, flagBinding | flagPQOnly | flagTLSEphemeral},
	// The X448 suite binds to the channel with its full hybrid KEMs and ephemeral (spec 5.3).
	{X448MLKEM1024(), ChaCha20Poly1305, flagBinding},
	// The ShangMi suite (spec 3.1): SM4-GCM, SM2-signed credentials, full hybrid KEMs.
	{SM2MLKEM768(), SM4GCM, 0},
	{SM2MLKEM768(), SM4GCM, flagBinding},
}

// katRun computes a vector from its inputs (suite, AEAD, seed, ClientHello flags; the
// binding is drawn from the seed when flags has flagBinding).
func katRun(t testing.TB, suite Scheme, aead AEAD, flags uint8) (katVector, katKeys) {
	t.Helper()
	seed := "veil pqkex kat " + suite.Name() + " " + aead.String()
	if flags&flagTLSEphemeral != 0 {
		seed += " tls-ephemeral" // later vectors than the first three, whose seeds stay as they were
	}
	if flags == flagBinding {
		seed += " bound"
	}
	v := katVector{Suite: suite.Name(), AEAD: aead.String(), Seed: seed,
		Now: time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC).Unix(), CallID: 7, Procedure: "/test.v1.EchoService/Unary"}
	bind := flags&flagBinding != 0
	r := newShake(v.Seed)
	now := time.Unix(v.Now, 0)
	var caSeed [mldsa65.SeedSize]byte
	mustRead(t, r, caSeed[:])
	_, caPQ := mldsa65.NewKeyFromSeed(&caSeed)
	edSeed := make([]byte, ed25519.SeedSize)
	mustRead(t, r, edSeed)
	var caCl crypto.Signer = ed25519.NewKeyFromSeed(edSeed)
	if isSM(suite) {
		caCl = katSM2Signer(t, r)
	}
	roots := Roots{PQ: caPQ.Public(), Classical: caCl.Public()}
	if isSM(suite) {
		roots.SM2 = caCl.Public()
	}
	var seeds [][]byte
	identity := func(id string) *Identity {
		tap := &tapReader{r: r}
		pub, priv, err := GenerateKey(suite, tap)
		seeds = append(seeds, tap.read)
		if err != nil {
			t.Fatal(err)
		}
		cred, err := IssueCredential(caPQ, caCl, suite, id, now.Add(-time.Hour), now.Add(24*time.Hour), pub)
		if err != nil {
			t.Fatal(err)
		}
		ident, err := NewIdentity(cred, priv)
		if err != nil {
			t.Fatal(err)
		}
		return ident
	}
	server, client := identity("spiffe://example.org/server"), identity("spiffe://example.org/client")
	v.ServerCredential, v.ClientCredential = server.cred.raw, client.cred.raw
	v.ServerKeySeed, v.ClientKeySeed = seeds[0], seeds[1]
	var cb []byte
	if bind {
		cb = make([]byte, 32)
		mustRead(t, r, cb)
		v.Bind = cb
	}

	tap := &tapReader{r: r}
	hs, err := startClient(tap, client, server.cred, aead, flags)
	if err != nil {
		t.Fatal(err)
	}
	if flags&flagTLSEphemeral == 0 {
		// startClient reads client_random, the ephemeral seed, then the encapsulation seed.
		v.EphemeralSeed = tap.read[randomSize : len(tap.read)-hs.hello.kem().EncapsulationSeedSize()]
	}
	v.ClientHello = hs.raw
	var tk TicketKey
	tk.ID = 0x01020304
	mustRead(t, r, tk.Secret[:])
	keys, err := NewTicketKeys(tk)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := parseClientHello(hs.raw)
	if err != nil {
		t.Fatal(err)
	}
	peer, err := (&credCache{}).verify(roots, ch.credential, now)
	if err != nil {
		t.Fatal(err)
	}
	issue := func(sec handshakeSecrets) ([]byte, uint64, error) {
		st := &ticketState{suite: suite, aead: aead, flags: ch.flags, sessionID: sec.sessionID, secret: sec.session,
			issued: unixSeconds(now), expiry: unixSeconds(now.Add(time.Hour)), serverHash: server.cred.hash,
			clientID: peer.spiffeID, clientPK: peer.publicKey}
		if bind {
			st.bindingID = bindingID(cb)
		}
		v.TicketPlaintext = st.marshal()
		tkt, err := keys.seal(r, server.cred.spiffeID, v.TicketPlaintext, now)
		return tkt, st.expiry, err
	}
	sh, serverSecrets, err := respond(r, ch, server, peer, cb, issue)
	if err != nil {
		t.Fatal(err)
	}
	v.ServerHello = sh
	res, err := hs.finish(sh, cb)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(res.secrets.session, serverSecrets.session) || !bytes.Equal(res.secrets.sessionID, serverSecrets.sessionID) {
		t.Fatal("client and server derived different sessions")
	}
	st, err := keys.openTicket(res.ticket, server.cred.spiffeID, now)
	if err != nil || !bytes.Equal(st.marshal(), v.TicketPlaintext) {
		t.Fatalf("ticket does not open to its plaintext: %v", err)
	}
	// The reference opens the ticket with the standard library alone (spec 7).
	if pt, err := referenceOpenTicket(tk.Secret[:], server.cred.spiffeID, res.ticket); err != nil || !bytes.Equal(pt, v.TicketPlaintext) {
		t.Fatalf("the reference does not open the ticket: %v", err)
	}
	if bind && !bytes.Equal(st.bindingID, refExpandLabel(crypto.SHA256, cb, "binding id", nil, 32)) {
		t.Fatal("binding_id and the reference derivation disagree")
	}
	if !bytes.Equal(server.cred.hash, refHash(refHasherFor(suite.Name()), server.cred.raw)) {
		t.Fatal("the credential hash is not the suite hash of the credential")
	}
	v.Session, v.SessionID = res.secrets.session, res.secrets.sessionID

	clientPK, err := suite.UnmarshalBinaryPublicKey(client.cred.publicKey)
	if err != nil {
		t.Fatal(err)
	}
	ctRekey, ssRekey, err := suite.EncapsulateDeterministically(clientPK, mustSeed(t, r, suite.EncapsulationSeedSize()))
	if err != nil {
		t.Fatal(err)
	}
	v.RekeySS, v.RekeyCT = ssRekey, ctRekey
	v.ServerNonce = mustSeed(t, r, serverNonceSize) // read last, so earlier fields kept their values

	h := suite.Hash()
	// The call path derives each direction's first key from the keyed session state
	// (newCallKeys, then deriveS2C with the server nonce); the step-by-step reference, plain
	// HKDF over the bytes of spec 5.2, must agree with it.
	ck, err := newCallKeys(h, aead, callRoot(h, v.Session, server.cred.spiffeID, server.cred.hash), v.CallID, v.Procedure)
	if err != nil {
		t.Fatal(err)
	}
	copy(ck.nonce[:], v.ServerNonce)
	if err := ck.deriveS2C(); err != nil {
		t.Fatal(err)
	}
	ref := referenceCallKeys(refHasherFor(suite.Name()), aead.keySize(), v.Session, server.cred.spiffeID, server.cred.raw, v.CallID, v.ServerNonce, v.Procedure)
	v.CallRoot = ref.callRoot
	v.C2SKey, v.S2CKey = ref.c2sKey, ref.s2cKey
	v.C2SSecret, v.S2CSecret = ck.chainSecret(dirC2S), ck.chainSecret(dirS2C)
	if !bytes.Equal(v.C2SSecret, ref.c2sSecret) || !bytes.Equal(v.S2CSecret, ref.s2cSecret) {
		t.Fatal("chainSecret and the reference derivation disagree")
	}
	for _, d := range []struct {
		dir *direction
		key []byte
	}{{&ck.c2s, ref.c2sKey}, {&ck.s2c, ref.s2cKey}} {
		want, err := aead.new(d.key)
		if err != nil {
			t.Fatal(err)
		}
		pt := []byte("same key?")
		if !bytes.Equal(d.dir.keys.Seal(nil, d.dir.nonce(3), pt, nil), want.Seal(nil, d.dir.nonce(3), pt, nil)) {
			t.Fatalf("newCallKeys (%s) and the reference derivation disagree", d.dir.label)
		}
	}
	v.Attempt = katAttempt(v.Now)
	v.RequestBody = binary.BigEndian.AppendUint64(nil, v.CallID) // a request body starts with its call ID
	v.RequestBody = append(v.RequestBody, sealBody(t, &ck.c2s, &fieldBlock{method: "POST", path: v.Procedure, attempt: v.Attempt, headers: katRequestHeaders},
		[][]byte{[]byte("ping")}, nil)...)
	v.ResponseBody = append([]byte(nil), v.ServerNonce...) // a response body starts with the server nonce
	v.ResponseBody = append(v.ResponseBody, sealBody(t, &ck.s2c, &fieldBlock{status: http.StatusOK, headers: katResponseHeaders},
		[][]byte{[]byte("pong"), []byte("!")}, http.Header{"Grpc-Status": {"0"}, "Grpc-Message": {"ok"}})...)
	v.RekeyedSecret = rekeySecret(h, v.S2CSecret, ssRekey, ctRekey)
	// An in-stream rekey derives T0 from the session when it first needs it, then advances.
	if err := ck.s2c.advance(ssRekey, ctRekey); err != nil || !bytes.Equal(ck.s2c.secret, v.RekeyedSecret) {
		t.Fatalf("direction.advance and rekeySecret disagree: %v", err)
	}
	return v, katKeys{roots: roots, server: server, tickets: keys}
}

// tapReader records what is read through it.
type tapReader struct {
	r    io.Reader
	read []byte
}

func (t *tapReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	t.read = append(t.read, p[:n]...)
	return n, err
}

func mustRead(t testing.TB, r io.Reader, b []byte) {
	t.Helper()
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatal(err)
	}
}

func mustSeed(t testing.TB, r io.Reader, n int) []byte {
	b := make([]byte, n)
	mustRead(t, r, b)
	return b
}

// katAttempt is the vectors' request attempt (spec 6.4): the bytes 0xa0..0xaf and the
// vector's time.
func katAttempt(now int64) string {
	a := make([]byte, 16, attemptSize)
	for i := range a {
		a[i] = 0xa0 + byte(i)
	}
	return hex.EncodeToString(binary.BigEndian.AppendUint64(a, uint64(now)))
}

// The headers of the vectors' request and response heads (spec 6.3).
var (
	katRequestHeaders  = http.Header{"Content-Type": {"application/proto"}, "Idempotency-Key": {"k-1"}}
	katResponseHeaders = http.Header{"Content-Type": {"application/proto"}, "X-Answer": {"a", "b"}}
)

// sealBody seals a body with d: the head frame, one data frame per chunk and the FINAL frame
// with trailers.
func sealBody(t testing.TB, d *direction, head *fieldBlock, chunks [][]byte, trailers http.Header) []byte {
	t.Helper()
	s := &sealer{dir: d, now: time.Now}
	out, err := s.appendBlock(nil, 0, head)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range chunks {
		if out, err = s.appendData(out, c); err != nil {
			t.Fatal(err)
		}
	}
	if out, err = s.appendBlock(out, flagFinal, &fieldBlock{trailers: trailers}); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestKnownAnswers(t *testing.T) {
	var got []katVector
	for _, c := range katCases {
		v, _ := katRun(t, c.suite, c.aead, c.flags)
		got = append(got, v)
	}
	if *update {
		b, err := json.MarshalIndent(got, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(katPath, append(b, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want := loadKAT(t)
	if len(want) != len(got) {
		t.Fatalf("%s has %d vectors, want %d", katPath, len(want), len(got))
	}
	for i := range want {
		a, _ := json.Marshal(got[i])
		b, _ := json.Marshal(want[i])
		if !bytes.Equal(a, b) {
			t.Errorf("vector %d (%s, %s) differs from %s; diff the JSON after running with -update", i, want[i].Suite, want[i].AEAD, katPath)
		}
	}
}

func loadKAT(t testing.TB) []katVector {
	t.Helper()
	b, err := os.ReadFile(filepath.FromSlash(katPath))
	if err != nil {
		t.Fatal(err)
	}
	var v []katVector
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestKnownAnswerServer sends each vector's request body, with its ticket, through a real
// Server whose randomness yields the vector's server nonce: the response body on the wire is
// the vector's, byte for byte.
func TestKnownAnswerServer(t *testing.T) {
	for _, v := range loadKAT(t) {
		suite := SchemeByName(v.Suite)
		keys := katKeysOf(t, v)
		sh, err := parseServerHello(v.ServerHello, suite, aeadByName(v.AEAD), helloFlags(v))
		if err != nil {
			t.Fatal(err)
		}
		s, err := NewServer(keys.serverOptions(v)...)
		if err != nil {
			t.Fatal(err)
		}
		s.cfg.rand = bytes.NewReader(v.ServerNonce)
		h := s.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if b, err := io.ReadAll(r.Body); err != nil || string(b) != "ping" {
				t.Errorf("%s: handler read %q %v", v.Suite, b, err)
			}
			if !reflect.DeepEqual(r.Header, katRequestHeaders) {
				t.Errorf("%s: handler saw headers %v, want the sealed %v only", v.Suite, r.Header, katRequestHeaders)
			}
			for k, vs := range katResponseHeaders {
				w.Header()[k] = vs
			}
			_, _ = w.Write([]byte("pong"))
			w.(http.Flusher).Flush()
			_, _ = w.Write([]byte("!"))
			w.Header().Set(http.TrailerPrefix+"Grpc-Status", "0")
			w.Header().Set(http.TrailerPrefix+"Grpc-Message", "ok")
		}))
		req := httptest.NewRequest(http.MethodPost, v.Procedure, bytes.NewReader(v.RequestBody))
		req.Header.Set(headerTicket, base64.RawURLEncoding.EncodeToString(sh.ticket))
		req.Header.Set("Content-Type", "application/proto") // the clear copy of the sealed one
		req.Header.Set("X-Added-By-Proxy", "1")             // never reaches the handler
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK || rec.Header().Get(headerSealed) != "1" || rec.Header().Get("Content-Type") != "application/proto" ||
			rec.Header().Get("X-Answer") != "" {
			t.Fatalf("%s: status %d, headers %v", v.Suite, rec.Code, rec.Header())
		}
		if !bytes.Equal(rec.Body.Bytes(), v.ResponseBody) {
			t.Errorf("%s: the server's response body differs from the vector's", v.Suite)
		}
	}
}

// callKeysRef is the per-call key schedule of spec 5.2 computed step by step with the standard
// library's HKDF, independently of the kdf type the implementation uses.
type callKeysRef struct{ callRoot, c2sKey, s2cKey, c2sSecret, s2cSecret []byte }

func refExpandLabel(h refHasher, secret []byte, label string, context []byte, n int) []byte {
	full := "veil-pqkex-v1 " + label
	info := binary.BigEndian.AppendUint16(nil, uint16(n))
	info = append(append(info, byte(len(full))), full...)
	info = binary.BigEndian.AppendUint16(info, uint16(len(context)))
	out, err := hkdf.Expand(h.New, secret, string(append(info, context...)), n)
	if err != nil {
		panic(err)
	}
	return out
}

func referenceCallKeys(h refHasher, keySize int, session []byte, serverID string, serverCredential []byte, callID uint64, nonce []byte, procedure string) callKeysRef {
	srv := binary.BigEndian.AppendUint16(nil, uint16(len(serverID)))
	srv = append(append(srv, serverID...), refHash(h, serverCredential)...)
	root := refExpandLabel(h, session, "call root", srv, h.Size())
	c2s := binary.BigEndian.AppendUint64(nil, callID)
	c2s = append(c2s, procedure...)
	s2c := binary.BigEndian.AppendUint64(nil, callID)
	s2c = append(append(s2c, nonce...), procedure...)
	return callKeysRef{
		callRoot:  root,
		c2sKey:    refExpandLabel(h, root, "c2s key", c2s, keySize),
		s2cKey:    refExpandLabel(h, root, "s2c key", s2c, keySize),
		c2sSecret: refExpandLabel(h, root, "c2s", c2s, h.Size()),
		s2cSecret: refExpandLabel(h, root, "s2c", s2c, h.Size()),
	}
}

// TestKnownAnswerBodiesIndependently opens each vector's request and response body with the
// standard library alone (the reference key schedule above, crypto/cipher's AES-GCM or
// x/crypto's ChaCha20-Poly1305) and reads the sealed message of spec 6.2 and 6.3 byte by
// byte: the call ID or server nonce, the head frame's field block, the data frames, the FINAL
// frame's block. None of the implementation's framing or field-block code is used.
func TestKnownAnswerBodiesIndependently(t *testing.T) {
	type entry struct {
		kind        byte
		name, value string
	}
	for _, v := range loadKAT(t) {
		h := refHasherFor(v.Suite)
		ref := referenceCallKeys(h, refKeySize(v.AEAD), v.Session, katServerID, v.ServerCredential, v.CallID, v.ServerNonce, v.Procedure)
		newAEAD := func(key []byte) cipher.AEAD {
			var a cipher.AEAD
			var err error
			if v.AEAD == AES256GCM.String() {
				var b cipher.Block
				if b, err = aes.NewCipher(key); err == nil {
					a, err = cipher.NewGCM(b)
				}
			} else if v.AEAD == "SM4-GCM" {
				a, err = refSM4GCM(key)
			} else {
				a, err = chacha20poly1305.New(key)
			}
			if err != nil {
				t.Fatal(err)
			}
			return a
		}
		// frames opens every frame of body under key: flags and plaintext of each.
		frames := func(body, key []byte) (flags []byte, pts [][]byte) {
			a := newAEAD(key)
			for seq := uint32(0); len(body) > 0; seq++ {
				if len(body) < 9 {
					t.Fatalf("%s: %d bytes left, not a frame header", v.Suite, len(body))
				}
				hdr, n := body[:9], int(binary.BigEndian.Uint32(body[5:9]))
				if binary.BigEndian.Uint32(hdr[1:5]) != seq || len(body) < 9+n {
					t.Fatalf("%s: frame %d: bad seq or length", v.Suite, seq)
				}
				nonce := make([]byte, 12)
				binary.BigEndian.PutUint32(nonce[8:], seq)
				pt, err := a.Open(nil, nonce, body[9:9+n], hdr)
				if err != nil {
					t.Fatalf("%s: frame %d does not open: %v", v.Suite, seq, err)
				}
				flags, pts = append(flags, hdr[0]), append(pts, pt)
				body = body[9+n:]
			}
			return flags, pts
		}
		block := func(b []byte) []entry {
			var out []entry
			n := int(binary.BigEndian.Uint16(b))
			b = b[2:]
			for range n {
				kind := b[0]
				nl := int(binary.BigEndian.Uint16(b[1:]))
				name := string(b[3 : 3+nl])
				b = b[3+nl:]
				vl := int(binary.BigEndian.Uint16(b))
				out = append(out, entry{kind, name, string(b[2 : 2+vl])})
				b = b[2+vl:]
			}
			if len(b) != 0 {
				t.Fatalf("%s: %d bytes after a field block", v.Suite, len(b))
			}
			return out
		}
		if binary.BigEndian.Uint64(v.RequestBody) != v.CallID {
			t.Fatalf("%s: request body does not start with the call ID", v.Suite)
		}
		flags, pts := frames(v.RequestBody[8:], ref.c2sKey)
		if !bytes.Equal(flags, []byte{0, 0, 1}) || string(pts[1]) != "ping" || len(block(pts[2])) != 0 {
			t.Errorf("%s: request frames %v %q", v.Suite, flags, pts)
		}
		if got, want := block(pts[0]), []entry{{2, ":method", "POST"}, {2, ":path", v.Procedure}, {2, ":attempt", v.Attempt},
			{0, "Content-Type", "application/proto"}, {0, "Idempotency-Key", "k-1"}}; !reflect.DeepEqual(got, want) {
			t.Errorf("%s: request head %v, want %v", v.Suite, got, want)
		}
		if !bytes.Equal(v.ResponseBody[:16], v.ServerNonce) {
			t.Fatalf("%s: response body does not start with the server nonce", v.Suite)
		}
		flags, pts = frames(v.ResponseBody[16:], ref.s2cKey)
		if !bytes.Equal(flags, []byte{0, 0, 0, 1}) || string(pts[1])+string(pts[2]) != "pong!" {
			t.Errorf("%s: response frames %v %q", v.Suite, flags, pts)
		}
		if got, want := block(pts[0]), []entry{{2, ":status", "200"}, {0, "Content-Type", "application/proto"},
			{0, "X-Answer", "a"}, {0, "X-Answer", "b"}}; !reflect.DeepEqual(got, want) {
			t.Errorf("%s: response head %v, want %v", v.Suite, got, want)
		}
		if got, want := block(pts[3]), []entry{{1, "Grpc-Message", "ok"}, {1, "Grpc-Status", "0"}}; !reflect.DeepEqual(got, want) {
			t.Errorf("%s: response trailers %v, want %v", v.Suite, got, want)
		}
	}
}

// refHash is H(b) with the standard library.
func refHash(h refHasher, b []byte) []byte {
	d := h.New()
	d.Write(b)
	return d.Sum(nil)
}

// referenceOpenTicket opens a ticket as spec 7 describes it, with the standard library:
// K_t = ExpandLabel-SHA256(secret, "ticket key", u16 len ‖ server_spiffe_id ‖ salt, 32),
// AES-256-GCM with a zero nonce and aad = label ‖ key_id ‖ salt ‖ u16 len ‖ server_spiffe_id.
func referenceOpenTicket(secret []byte, serverID string, ticket []byte) ([]byte, error) {
	if len(ticket) < 4+16+16 {
		return nil, errors.New("short ticket")
	}
	salt := ticket[4:20]
	id := binary.BigEndian.AppendUint16(nil, uint16(len(serverID)))
	id = append(id, serverID...)
	key := refExpandLabel(crypto.SHA256, secret, "ticket key", append(append([]byte(nil), id...), salt...), 32)
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		return nil, err
	}
	aad := append([]byte("veil-pqkex-v1 ticket"), ticket[:20]...)
	aad = append(aad, id...)
	return g.Open(nil, make([]byte, 12), ticket[20:], aad)
}

// katServerID is the SPIFFE ID of every vector's server.
const katServerID = "spiffe://example.org/server"

// katServerHash is H(server credential) of a vector, as srv and its tickets hold it.
func katServerHash(v katVector) []byte {
	return refHash(refHasherFor(v.Suite), v.ServerCredential)
}
