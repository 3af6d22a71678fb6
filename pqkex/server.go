package pqkex

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
	"weak"
)

// Endpoint paths served by [Server.Handler] (spec sections 4.2 and 5).
const (
	CredentialPath = "/veil.pqkex.v1/credential"
	HandshakePath  = "/veil.pqkex.v1/handshake"
)

const sideServer = "server"

// Server is the server half of pqkex: HTTP middleware that answers handshakes and unseals
// requests before connect-go handlers see them.
type Server struct {
	cfg     *config
	ids     identityHistory
	creds   credCache
	replay  replayCache
	tickets ticketCache
	m       *metrics
	sc      sideCounters
}

// NewServer returns a server. [WithIdentity] and [WithRoots] are required.
func NewServer(opts ...ServerOption) (*Server, error) {
	cfg := newConfig()
	for _, o := range opts {
		o.applyServer(cfg)
	}
	if cfg.identity == nil || !cfg.rootsSet {
		return nil, errors.New("pqkex: server needs WithIdentity and WithRoots")
	}
	if cfg.ticketLifetime <= 0 {
		return nil, errors.New("pqkex: ticket lifetime must be positive")
	}
	if err := cfg.checkSuites(); err != nil {
		return nil, err
	}
	if id, err := cfg.identity.GetIdentity(); err == nil && id != nil && !cfg.allowsSuite(id.cred.suite) {
		return nil, errors.New("pqkex: the server's identity is of a suite RequireSuites does not allow")
	}
	if cfg.tickets == nil {
		// Private to this server, rotated every ticket lifetime (spec 7.2).
		var err error
		if cfg.tickets, err = NewRotatingTicketKeys(cfg.ticketLifetime, cfg.now); err != nil {
			return nil, err
		}
	}
	cfg.rekey = cfg.rekey.withDefaults()
	m := newMetrics(cfg.registerer)
	return &Server{cfg: cfg, m: m, sc: m.forSide(sideServer)}, nil
}

// Handler wraps next: it serves [CredentialPath] and [HandshakePath], unseals sealed calls
// and seals their responses, and refuses or passes plaintext calls according to the mode.
func (s *Server) Handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case CredentialPath:
			w.Header()[headerVersion] = serverVersionsHeader
			s.serveCredential(w, r)
		case HandshakePath:
			w.Header()[headerVersion] = serverVersionsHeader
			s.serveHandshake(w, r)
		default:
			s.serveCall(w, r, next)
		}
	})
}

func (s *Server) reject(w http.ResponseWriter, r *http.Request, err error) {
	s.m.reject(sideServer, err)
	writeError(w, r, err)
}

func (s *Server) serveCredential(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		s.reject(w, r, errMalformed)
		return
	}
	id, err := s.cfg.identity.GetIdentity()
	if err != nil || id == nil {
		s.reject(w, r, errInternal)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	_, _ = w.Write(id.cred.raw)
}

func (s *Server) serveHandshake(w http.ResponseWriter, r *http.Request) {
	sh, err := s.handshake(r)
	if err != nil {
		s.m.handshakes.WithLabelValues(sideServer, "error").Inc()
		s.reject(w, r, err)
		return
	}
	s.m.handshakes.WithLabelValues(sideServer, "ok").Inc()
	w.Header().Set("Content-Type", "application/octet-stream")
	_, _ = w.Write(sh)
}

func (s *Server) handshake(r *http.Request) (out []byte, err error) {
	defer recoverTo(&err)
	if r.Method != http.MethodPost {
		return nil, errMalformed
	}
	body, err := readHandshakeBody(r.Body, r.ContentLength)
	if err != nil {
		return nil, errMalformed
	}
	ch, err := parseClientHello(body)
	if err != nil {
		return nil, err
	}
	if !s.cfg.allowsSuite(ch.suite) {
		return nil, s.cfg.errSuitePolicy(ch.suite, "offered") // before any other check (spec 3.1)
	}
	now := s.cfg.now()
	self, err := s.self(now)
	if err != nil {
		return nil, err
	}
	if ch.serverDigest != self.cred.digest {
		return nil, errServerKey
	}
	if ch.suite.ID() != self.cred.suite.ID() {
		return nil, errUnsupported
	}
	if ch.flags&flagTLSEphemeral != 0 && (r.TLS == nil || !tlsEphemeralGroup(ch.suite, r.TLS.CurveID)) {
		// Checked before the credential work so that the client's retry is cheap (spec 5.3).
		return nil, errTLSNotPQ
	}
	peer, err := s.creds.verify(s.cfg.roots, ch.credential, now)
	if err != nil {
		return nil, err
	}
	if peer.suite.ID() != ch.suite.ID() {
		return nil, errCredential
	}
	if err := s.cfg.authorize(peer.spiffeID); err != nil {
		return nil, errIdentity
	}
	bound := ch.flags&flagBinding != 0
	if s.cfg.bind && !bound {
		return nil, errChannelBinding
	}
	var cb []byte
	if bound {
		if cb, err = channelBinding(r.TLS, peer.spiffeID); err != nil {
			return nil, err
		}
	}
	issue := func(sec handshakeSecrets) ([]byte, uint64, error) {
		// A ticket never outlives its key (spec 7.2), nor either credential.
		expiry := now.Add(s.cfg.ticketLifetime)
		for _, t := range []time.Time{now.Add(s.cfg.tickets.Period()), peer.notAfter, self.cred.notAfter} {
			if t.Before(expiry) {
				expiry = t
			}
		}
		st := &ticketState{
			suite: ch.suite, aead: ch.aead, flags: ch.flags, sessionID: sec.sessionID,
			secret: sec.session, issued: unixSeconds(now), expiry: unixSeconds(expiry),
			serverHash: self.cred.hash, clientID: peer.spiffeID, clientPK: peer.publicKey,
		}
		if bound {
			st.bindingID = bindingID(cb)
		}
		t, err := s.cfg.tickets.seal(nil, self.cred.spiffeID, st.marshal(), now)
		return t, st.expiry, err
	}
	out, _, err = respond(s.cfg.rand, ch, self, peer, cb, issue)
	return out, err
}

// channelBinding returns the TLS exporter of conn after checking that the TLS peer
// certificate names spiffeID (spec 5.3).
func channelBinding(conn *tls.ConnectionState, spiffeID string) ([]byte, error) {
	if conn == nil || len(conn.PeerCertificates) == 0 || !hasURI(conn.PeerCertificates[0], spiffeID) {
		return nil, errChannelBinding
	}
	cb, err := conn.ExportKeyingMaterial(exporterLabel, nil, 32)
	if err != nil {
		return nil, errChannelBinding
	}
	return cb, nil
}

func hasURI(cert *x509.Certificate, id string) bool {
	for _, u := range cert.URIs {
		if u.String() == id {
			return true
		}
	}
	return false
}

// recoverTo turns a panic in a library under untrusted input into an internal error.
func recoverTo(err *error) {
	if recover() != nil {
		*err = errInternal
	}
}

var contentEncodingHeaders = []string{"Content-Encoding", "Connect-Content-Encoding", "Grpc-Encoding"}
var acceptEncodingHeaders = []string{"Accept-Encoding", "Connect-Accept-Encoding", "Grpc-Accept-Encoding"}

func compressed(h http.Header) bool {
	for _, k := range contentEncodingHeaders {
		if v := headerValue(h, k); v != "" && !strings.EqualFold(v, "identity") {
			return true
		}
	}
	return false
}

func (s *Server) serveCall(w http.ResponseWriter, r *http.Request, next http.Handler) {
	procedure := r.URL.Path
	ticketHeader, sessionHeader := headerValue(r.Header, headerTicket), headerValue(r.Header, headerSession)
	if ticketHeader == "" && sessionHeader == "" {
		// A suite policy covers plaintext too: no call outside the required suites, sealed
		// or not (spec 3.1), whatever the procedure's mode.
		if s.cfg.mode(procedure) == Permissive && !s.cfg.suitesSet {
			s.sc.plain.Inc()
			next.ServeHTTP(w, r)
			return
		}
		s.reject(w, r, errNoSession)
		return
	}
	inner, sw, err := s.openCall(w, r, ticketHeader, sessionHeader)
	if err != nil {
		s.reject(w, r, err)
		return
	}
	s.sc.sealed.Inc()
	next.ServeHTTP(sw, inner)
	if err := sw.finish(); err != nil {
		s.m.reject(sideServer, err)
	}
}

// openCall authenticates a sealed call: ticket (or, in the short form, the session ID of a
// session this server holds), call keys, request head, replay window.
func (s *Server) openCall(w http.ResponseWriter, r *http.Request, ticketHeader, sessionHeader string) (_ *http.Request, _ *sealWriter, err error) {
	defer recoverTo(&err)
	if ticketHeader != "" && sessionHeader != "" {
		return nil, nil, errMalformed
	}
	now := s.cfg.now()
	self, err := s.self(now)
	if err != nil {
		return nil, nil, err
	}
	var st *ticketState
	if sessionHeader != "" {
		st, err = s.cfg.tickets.openSessionHeader(&s.tickets, sessionHeader, now)
	} else {
		st, err = s.cfg.tickets.openTicketHeader(&s.tickets, ticketHeader, self.cred, now)
	}
	if err != nil {
		return nil, nil, err
	}
	// The policy covers sessions as it covers hellos: a ticket of another suite, from a
	// replica of that suite sharing the ticket keys or from before the policy, is refused
	// (spec 3.1).
	if !s.cfg.allowsSuite(st.suite) {
		return nil, nil, s.cfg.errSuitePolicy(st.suite, "session's")
	}
	if r.Method != http.MethodPost || r.Body == nil {
		return nil, nil, errMethod
	}
	sc := &serverCall{srv: s, st: st, self: self}
	// A body of known length (a unary request) is read whole, in one read from the HTTP/2
	// body pipe rather than four, and its frames are opened in place. Only a caller holding
	// a valid session (ticket or session ID, checked above) gets this far, and HTTP/2 flow
	// control already lets a peer make the server buffer this much.
	op := &sc.op
	*op = opener{r: r.Body, side: sc}
	if err := op.preread(r.ContentLength); err != nil {
		return nil, nil, err
	}
	callID, err := op.readCallID()
	if err != nil {
		return nil, nil, err
	}
	keys := &sc.keys
	if err := keys.init(st.suite.Hash(), st.aead, st.secretKey, callID, r.URL.Path); err != nil {
		return nil, nil, err
	}
	op.dir = &keys.c2s
	// The request head authenticates the session and carries what the handler sees (spec
	// 6.2, 6.3); the clear method, path and Content-Type must be its copies.
	head, err := readHead(op, requestHead)
	if err != nil {
		return nil, nil, err
	}
	if head.method != r.Method || head.path != r.URL.RequestURI() || !slices.Equal(head.headers["Content-Type"], r.Header["Content-Type"]) {
		return nil, nil, errClearMismatch
	}
	if compressed(head.headers) {
		return nil, nil, errCompressed
	}
	if !s.replay.accept(st.sessionID, callID, st.expiry, unixSeconds(now)) {
		return nil, nil, errReplayed
	}
	if err := s.sharedReplay(r, st, head.attempt, now); err != nil {
		return nil, nil, err
	}
	// A fresh server nonce for the response keys (spec 5.2, 6.4): a call replayed to another
	// replica, whose replay window never saw it, is answered under other keys.
	if err := readRandom(s.cfg.rand, keys.nonce[:]); err != nil {
		return nil, nil, err
	}
	if err := keys.deriveS2C(); err != nil {
		return nil, nil, err
	}
	sc.peer = Peer{SPIFFEID: st.clientID, Suite: st.suite.Name(), AEAD: st.aead, ChannelBound: onBoundConnection(st, r.TLS)}
	inner := r.WithContext(withPeer(r.Context(), &sc.peer))
	// The handler sees the sealed request headers and nothing a proxy added in clear.
	if head.headers == nil {
		head.headers = http.Header{}
	}
	inner.Header = head.headers
	inner.Trailer = nil // a sealed request's trailers are its FINAL block, which has none (spec 6.3): clear ones are a proxy's
	inner.ContentLength = -1
	sc.body = openReader{o: op, body: r.Body, side: sc}
	inner.Body = &sc.body
	sc.seal = sealer{dir: &keys.s2c, side: sc, policy: s.cfg.rekey.Stream, now: s.cfg.now}
	sc.sw = sealWriter{w: w, h: make(http.Header, 4), held: sessionHeader == "", nonce: keys.nonce[:], s: &sc.seal}
	return inner, &sc.sw, nil
}

// sharedReplay checks a call's attempt against the shared replay store, if the procedure
// has one (spec 6.4): the attempt's time must be within AttemptWindow of the server's clock,
// and the store must not have recorded the attempt before.
func (s *Server) sharedReplay(r *http.Request, st *ticketState, attempt string, now time.Time) error {
	if s.cfg.replayStore == nil || (s.cfg.replayFor != nil && !s.cfg.replayFor(r.URL.Path)) {
		return nil
	}
	key, began, err := attemptKey(st.clientID, attempt)
	if err != nil {
		return err
	}
	// Open at both ends: an accepted attempt began less than AttemptWindow after now, so it
	// is stale before its record (kept ReplayRecordLifetime from now) may go.
	if d := now.Sub(began); d >= AttemptWindow || d <= -AttemptWindow {
		return errAttemptStale
	}
	fresh, err := s.cfg.replayStore.Accept(r.Context(), key[:], now.Add(ReplayRecordLifetime))
	switch {
	case err != nil:
		return errReplayStore
	case !fresh:
		return errReplayed
	}
	return nil
}

// attemptKey is the replay store's key for a call (spec 6.4): SHA-256 of a label, the
// client's SPIFFE ID and the attempt, so that one client cannot claim another's attempt;
// and the time the attempt began.
func attemptKey(clientID, attempt string) (key [ReplayKeySize]byte, began time.Time, err error) {
	var a [attemptSize]byte
	// Its one spelling (6.3), checked here too: hex.Decode panics on a longer input and
	// accepts upper case, a second name for one record.
	if !validAttempt(attempt) {
		return key, began, errMalformed
	}
	if _, derr := hex.Decode(a[:], []byte(attempt)); derr != nil {
		return key, began, errMalformed
	}
	h := sha256.New()
	h.Write([]byte(attemptLabel))
	h.Write([]byte{0})
	h.Write([]byte(clientID))
	h.Write([]byte{0})
	h.Write(a[:])
	h.Sum(key[:0])
	secs := binary.BigEndian.Uint64(a[16:])
	if secs > math.MaxInt64 {
		return key, began, errAttemptStale
	}
	return key, time.Unix(int64(secs), 0), nil
}

// attemptLabel separates replay-store keys from every other hash in pqkex (spec 6.4).
const attemptLabel = "veil-pqkex v2 attempt"

// serverCall is one sealed call as the server answers it: its keys and the state of its
// request and response frames, in one allocation. It is the frames' callSide.
type serverCall struct {
	srv  *Server
	st   *ticketState
	self *Identity
	keys callKeys
	peer Peer
	op   opener
	body openReader
	seal sealer
	sw   sealWriter
}

func (sc *serverCall) encap() ([]byte, []byte, error) { return encapTo(sc.st.suite, sc.st.clientPK) }

// decap opens a client's REKEY frame, which is sealed to the static key the session was
// made with: the current one, or one this server replaced less than a ticket lifetime ago.
func (sc *serverCall) decap(ct []byte) ([]byte, error) {
	id := sc.self
	if !bytes.Equal(id.cred.hash, sc.st.serverHash) {
		if id = sc.srv.ids.find(sc.st.serverHash, sc.srv.cfg.now()); id == nil {
			return nil, errMalformed
		}
	}
	return sc.st.suite.Decapsulate(id.priv, ct)
}

// onBoundConnection reports whether a call of the session st arrived over the TLS connection
// its channel-bound handshake was bound to (spec 7.3): what Peer.ChannelBound means. net/http
// shares one ConnectionState among a connection's requests, so the answer is kept per
// session for the last connection seen, by a weak pointer: a closed connection's state (and
// its exporter secret) is not kept alive by it.
func onBoundConnection(st *ticketState, conn *tls.ConnectionState) bool {
	if st.flags&flagBinding == 0 || conn == nil {
		return false
	}
	if c := st.onConn.Load(); c != nil && c.conn.Value() == conn {
		return c.bound
	}
	cb, err := conn.ExportKeyingMaterial(exporterLabel, nil, 32)
	bound := err == nil && hmac.Equal(bindingID(cb), st.bindingID)
	clear(cb)
	st.onConn.Store(&connCheck{conn: weak.Make(conn), bound: bound})
	return bound
}

// connCheck is onBoundConnection's answer for one connection.
type connCheck struct {
	conn  weak.Pointer[tls.ConnectionState]
	bound bool
}

// identityHistory remembers the identities a server replaced, each for a ticket lifetime, so
// that the in-stream rekeys of sessions made with an earlier credential still decapsulate.
type identityHistory struct {
	mu   sync.Mutex
	last *Identity
	old  []retainedIdentity
}

type retainedIdentity struct {
	id    *Identity
	until time.Time
}

// self returns the server's current identity, noting a replaced one.
func (s *Server) self(now time.Time) (*Identity, error) {
	id, err := s.cfg.identity.GetIdentity()
	if err != nil || id == nil {
		return nil, errInternal
	}
	h := &s.ids
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.last != id {
		if h.last != nil && !bytes.Equal(h.last.cred.hash, id.cred.hash) {
			h.old = append(h.old, retainedIdentity{id: h.last, until: now.Add(s.cfg.ticketLifetime)})
		}
		h.last = id
		kept := h.old[:0]
		for _, r := range h.old {
			if now.Before(r.until) {
				kept = append(kept, r)
			}
		}
		clear(h.old[len(kept):])
		h.old = kept
	}
	return id, nil
}

// find returns the identity retained at now whose credential hashes to hash, if any.
func (h *identityHistory) find(hash []byte, now time.Time) *Identity {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.old {
		if now.Before(r.until) && bytes.Equal(r.id.cred.hash, hash) {
			return r.id
		}
	}
	return nil
}

func (sc *serverCall) rekeyed()           { sc.srv.sc.streamRekeys.Inc() }
func (sc *serverCall) counted(int)        {}
func (sc *serverCall) rejected(err error) { sc.srv.m.reject(sideServer, err) }
func (sc *serverCall) final(block []byte) error {
	_, err := decodeFieldBlock(block, requestFinal)
	return err
}

// encapTo encapsulates to a marshaled public key. Parsing is deferred to here because most
// calls never rekey and parsing a hybrid key costs more than the rest of a call's setup.
func encapTo(suite Scheme, pk []byte) ([]byte, []byte, error) {
	k, err := suite.UnmarshalBinaryPublicKey(pk)
	if err != nil {
		return nil, nil, errMalformed
	}
	return suite.Encapsulate(k)
}
