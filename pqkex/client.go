package pqkex

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
)

const sideClient = "client"

// Client is the client half of pqkex: it establishes sessions with servers and seals calls.
// One Client serves any number of servers (one session per authority) and is safe for
// concurrent use.
type Client struct {
	cfg   *config
	creds credCache
	m     *metrics
	sc    sideCounters

	mu       sync.Mutex
	servers  map[string]*Credential    // verified server credentials by authority
	sessions map[string]*clientSession // current session by authority
	locks    map[string]*sync.Mutex    // one handshake at a time per authority
}

// clientSession is an established session as the client holds it.
type clientSession struct {
	suite     Scheme
	aead      AEAD
	secret    []byte
	secretKey *hmacKey // secret, keyed for the per-call derivations
	ticket    []string // base64url, ready for the header (one value, shared by every call: never written)
	sid       []string // base64url session ID, for the short form (spec 6.6); as ticket
	held      atomic.Bool
	expiry    time.Time
	created   time.Time
	server    *Credential
	self      *Identity
	binding   []byte // the TLS exporter the session is bound to; nil when not bound
	tlsEph    bool   // made without a pqkex ephemeral (flags bit 2, spec 5.3)
	calls     atomic.Int64
	inflight  inflight // call IDs (spec 6.4)
	bytes     atomic.Int64
}

// NewClient returns a client. [WithIdentity] and [WithRoots] are required.
func NewClient(opts ...Option) (*Client, error) {
	cfg := newConfig()
	for _, o := range opts {
		o.apply(cfg)
	}
	if cfg.identity == nil || !cfg.rootsSet {
		return nil, errors.New("pqkex: client needs WithIdentity and WithRoots")
	}
	if !cfg.aead.supported() {
		return nil, errors.New("pqkex: unsupported AEAD")
	}
	if err := cfg.checkSuites(); err != nil {
		return nil, err
	}
	if !cfg.authSet {
		if !cfg.insecureAny {
			return nil, errors.New("pqkex: client needs the server identity it expects (WithAuthorizer), or InsecureAcceptAnyServer")
		}
		cfg.logger.Warn("pqkex: client accepts any server identity (InsecureAcceptAnyServer): a proxy can route its calls to any certified workload")
	}
	cfg.rekey = cfg.rekey.withDefaults()
	m := newMetrics(cfg.registerer)
	return &Client{
		cfg: cfg, m: m, sc: m.forSide(sideClient),
		servers: map[string]*Credential{}, sessions: map[string]*clientSession{}, locks: map[string]*sync.Mutex{},
	}, nil
}

// RoundTripper wraps base (normally an HTTP/2 transport with mTLS): every request is sealed
// under a pqkex session with its server, established on first use.
func (c *Client) RoundTripper(base http.RoundTripper, opts ...RoundTripperOption) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	var cfg roundTripperConfig
	for _, o := range opts {
		o.applyRoundTripper(&cfg)
	}
	return &roundTripper{c: c, base: base, expect: cfg.expect}
}

// RoundTripperOption configures a round tripper of [Client.RoundTripper].
type RoundTripperOption interface{ applyRoundTripper(*roundTripperConfig) }

type roundTripperConfig struct {
	expect Authorizer
}

type roundTripperOptionFunc func(*roundTripperConfig)

func (f roundTripperOptionFunc) applyRoundTripper(c *roundTripperConfig) { f(c) }

// ExpectServer adds an expectation of the round tripper's own: a session, credential or
// answer is used only if the server's SPIFFE ID passes a as well as the client's
// authorizer (spec 4.2). rpc.NewHTTPClient passes its TLS authorizer this way.
func ExpectServer(a Authorizer) RoundTripperOption {
	return roundTripperOptionFunc(func(c *roundTripperConfig) { c.expect = a })
}

type roundTripper struct {
	c      *Client
	base   http.RoundTripper
	expect Authorizer // nil: the client's authorizer alone
}

func (rt *roundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	// One attempt for the request and its resend (spec 6.4): a server with a replay store
	// runs it at most once, even if a proxy forges a session refusal after the handler ran.
	// One clock reading serves the attempt and the session's checks (the clock can be slow
	// to read on virtual machines).
	now := rt.c.cfg.now()
	attempt, err := rt.c.newAttempt(now)
	if err != nil {
		if req.Body != nil {
			_ = req.Body.Close()
		}
		return nil, toConnect(err)
	}
	resp, err := rt.roundTrip(req, attempt, now)
	if err != nil && sessionLost(err) && req.GetBody != nil {
		// The server could not open the session ticket (another replica's key, or
		// expired) and refused the call before any handler saw it; the session is
		// dropped. A request whose body can be produced again (unary calls) is resent
		// once, which runs a new handshake: the caller never sees the lost session.
		if body, berr := req.GetBody(); berr == nil {
			rt.c.m.reject(sideClient, err)
			retry := req.Clone(req.Context())
			retry.Body = body
			resp, err = rt.roundTrip(retry, attempt, rt.c.cfg.now())
		}
	}
	if err != nil {
		if req.Body != nil {
			_ = req.Body.Close()
		}
		if !isRejection(err) {
			// The base transport's own failure (a TLS error, a reset stream): a dropped call,
			// never the code a proxy's reset would map to (spec 9).
			return nil, intermediaryFailure(req.Context(), err)
		}
		rt.c.m.reject(sideClient, err)
		return nil, toConnect(err)
	}
	return resp, nil
}

// newAttempt draws a request's attempt (spec 6.4): 16 random bytes and the clock (now) in
// Unix seconds, as lowercase hex.
func (c *Client) newAttempt(now time.Time) (string, error) {
	// One allocation, the string: crypto/rand.Read keeps nothing of its argument, so a and h
	// stay on the stack (an io.Reader from WithRand, for tests, may keep what it reads into).
	var a [attemptSize]byte
	if c.cfg.rand == nil {
		if _, err := rand.Read(a[:16]); err != nil {
			return "", errInternal
		}
	} else {
		r := make([]byte, 16)
		if err := readRandom(c.cfg.rand, r); err != nil {
			return "", err
		}
		copy(a[:], r)
	}
	binary.BigEndian.PutUint64(a[16:], uint64(now.Unix()))
	var h [2 * attemptSize]byte
	hex.Encode(h[:], a[:])
	return string(h[:]), nil
}

// sessionLost reports whether err is the server refusing the session's ticket, after
// which the client has dropped the session (see roundTrip).
func sessionLost(err error) bool {
	re := asReason(err)
	return re != nil && re.code == connect.CodeUnavailable && sessionRefusal(string(re.reason))
}

// roundTrip makes one sealed call: seal the request, send it, open the answer.
func (rt *roundTripper) roundTrip(req *http.Request, attempt string, now time.Time) (*http.Response, error) {
	if req.Method != http.MethodPost {
		return nil, errMethod
	}
	if compressed(req.Header) {
		return nil, errCompressed
	}
	sess, callID, err := rt.reserve(req, now)
	if err != nil {
		return nil, err
	}
	defer sess.inflight.done(callID) // answered or failed: past the server's replay check
	cc, short, err := rt.seal(req, sess, callID, attempt)
	if err != nil {
		return nil, err
	}
	resp, err := rt.send(cc, short)
	if err != nil {
		return nil, err
	}
	return rt.open(cc, req, resp)
}

// reserve returns a usable session for req's server and a call ID in its window.
func (rt *roundTripper) reserve(req *http.Request, now time.Time) (*clientSession, uint64, error) {
	for {
		s, err := rt.c.session(req.Context(), rt.base, req.URL, rt.expect, now)
		if err != nil {
			return nil, 0, err
		}
		if id, ok := s.inflight.alloc(); ok {
			s.calls.Add(1)
			return s, id, nil
		}
		// Another call filled the session's window first: session() replaces it.
	}
}

// seal derives the call's keys and builds the request that goes on the wire: a shallow copy
// of req with only the routing hints in clear (spec 6.1) and the sealed head and body
// (spec 6.3). short reports whether it names the session by ID (the short form, spec 6.6).
func (rt *roundTripper) seal(req *http.Request, sess *clientSession, callID uint64, attempt string) (cc *clientCall, short bool, err error) {
	c := rt.c
	cc = &clientCall{c: c, sess: sess}
	if err := cc.keys.init(sess.suite.Hash(), sess.aead, sess.secretKey, callID, req.URL.Path); err != nil {
		return nil, false, err
	}
	head := fieldBlock{method: req.Method, path: req.URL.RequestURI(), attempt: attempt, headers: req.Header, omit: notSealed}
	out := &cc.out
	*out = *req
	out.Header = make(http.Header, 4)
	for _, k := range clearRequestHeaders {
		if v, ok := req.Header[k]; ok {
			out.Header[k] = v
		}
	}
	// The short form (spec 6.6): only for bodies sealed whole, which can be resent with the
	// ticket if this server does not hold the session.
	// A client request's ContentLength of 0 with a body means an unknown length (net/http),
	// so such a body streams: sealing it whole as empty would drop it.
	whole := req.ContentLength > 0 || req.ContentLength == 0 && nonNil(req.Body) == nil
	short = whole && sess.held.Load()
	if short {
		out.Header[headerSession] = sess.sid
	} else {
		out.Header[headerTicket] = sess.ticket
	}
	out.ContentLength = -1
	out.GetBody = nil
	cc.s = sealer{dir: &cc.keys.c2s, side: cc, policy: c.cfg.rekey.Stream, now: c.cfg.now}
	if whole {
		// The body is in memory (unary): seal it now so that it leaves with a known length,
		// in as few HTTP/2 frames and writes as possible.
		sealed, err := sealWhole(&cc.s, callID, &head, nonNil(req.Body), req.ContentLength, cc)
		if err != nil {
			return nil, false, err
		}
		cc.sealed = sealed
		out.Body = cc.sealedBodyFirst()
		out.ContentLength = int64(len(sealed))
		out.GetBody = cc.getBody
	} else {
		// Encoded now, while req is the caller's to read; sealed when the transport first reads.
		hb := head.encode(nil)
		if len(hb) > maxFramePlaintext {
			return nil, false, errFieldsTooLarge
		}
		out.Body = &sealReader{s: &cc.s, callID: callID, head: hb, src: nonNil(req.Body), side: cc}
	}
	c.sc.sealed.Inc()
	return cc, short, nil
}

// send sends the sealed request. A request in the short form that this server refuses as
// an unknown session is resent once with the ticket (spec 6.6).
func (rt *roundTripper) send(cc *clientCall, short bool) (*http.Response, error) {
	out := &cc.out
	resp, err := rt.base.RoundTrip(out)
	if err != nil || !short || headerValue(resp.Header, headerError) != string(reasonUnknownSess) {
		return resp, err
	}
	// This server (another replica, or one that restarted) does not hold the session: it
	// refused the call before anything else, so the same sealed request is resent once
	// with the ticket.
	_ = resp.Body.Close()
	rt.c.m.reject(sideClient, errUnknownSession)
	retry := out.Clone(out.Context())
	delete(retry.Header, headerSession)
	retry.Header[headerTicket] = cc.sess.ticket
	retry.Body = cc.sealedBody()
	return rt.base.RoundTrip(retry)
}

// open checks the server's answer to req and turns it into the response the caller sees
// (spec 6.2, 6.3); an unauthenticated refusal or an unsealed answer is an error, never a response.
func (rt *roundTripper) open(cc *clientCall, req *http.Request, resp *http.Response) (*http.Response, error) {
	sess := cc.sess
	if token := headerValue(resp.Header, headerError); token != "" {
		// An unauthenticated refusal (spec 9): a session refusal drops the session, anything
		// else is tampering. Neither takes the code the token names.
		_ = resp.Body.Close()
		err := callRefusal(token)
		if sessionRefusal(token) {
			rt.c.dropSession(req.URL, sess)
		}
		return nil, err
	}
	if headerValue(resp.Header, headerSealed) != "1" {
		_ = resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			// An intermediary's own error (the upstream is gone or overloaded): the
			// call did not reach a server, so it is unavailable, as Connect maps these
			// statuses, not a downgrade. Nothing unsealed is ever handed to the caller, nor
			// the reason phrase of an HTTP/1.1 status line, which the intermediary writes.
			return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("pqkex: %s from an intermediary", statusLine(resp.StatusCode)))
		}
		return nil, errUnsealed
	}
	if headerValue(resp.Header, headerSessionHeld) == "1" && !sess.held.Load() {
		sess.held.Store(true)
	}
	if err := cc.openResponse(resp); err != nil {
		_ = resp.Body.Close()
		return nil, cutShort(req.Context(), err)
	}
	return resp, nil
}

// statusLine is the Status of a response with status code.
func statusLine(code int) string {
	if code == http.StatusOK {
		return "200 OK"
	}
	return strconv.Itoa(code) + " " + http.StatusText(code)
}

// clearRequestHeaders are the request headers that also travel in clear, as routing hints
// (spec 6.1); canonical names.
var clearRequestHeaders = []string{"Content-Type", "Te"}

// openResponse reads the sealed response's server nonce and head frame and turns resp into
// the response the caller sees: the sealed status and headers, a body of the opened frames,
// the sealed trailers once the FINAL frame opened. The clear status and Content-Type must
// match the sealed ones; every other clear header is dropped.
func (cc *clientCall) openResponse(resp *http.Response) error {
	cc.o = opener{r: resp.Body, side: cc}
	// A response of known length (a unary one without trailers) is read whole, then opened
	// in place. Its first bytes are the server nonce, which selects the s2c keys (spec 5.2).
	if err := openResponse(&cc.o, &cc.keys, resp.ContentLength); err != nil {
		return err
	}
	head, err := readHead(&cc.o, responseHead)
	if err != nil {
		return err
	}
	if head.status != resp.StatusCode || !slices.Equal(head.headers["Content-Type"], resp.Header["Content-Type"]) {
		return errClearMismatch
	}
	if head.headers == nil {
		head.headers = http.Header{}
	}
	cc.body = openReader{o: &cc.o, body: resp.Body, side: cc, ctx: cc.out.Context()}
	cc.trailers = http.Header{}
	resp.StatusCode, resp.Status = head.status, statusLine(head.status)
	resp.Header, resp.Trailer = head.headers, cc.trailers
	resp.ContentLength = -1
	resp.Body = &cc.body
	return nil
}

// clientCall is one sealed call as the client makes it: its keys, the outgoing request and
// the state of its frames, in one allocation. It is the frames' callSide.
type clientCall struct {
	c        *Client
	sess     *clientSession
	keys     callKeys
	out      http.Request
	s        sealer
	o        opener
	body     openReader
	sealed   []byte      // a request sealed whole, for a resend
	sent     sealedBody  // the first send's body of a request sealed whole
	trailers http.Header // the response's, filled from its FINAL frame
}

func (cc *clientCall) encap() ([]byte, []byte, error) {
	return encapTo(cc.sess.suite, cc.sess.server.publicKey)
}

func (cc *clientCall) decap(ct []byte) ([]byte, error) {
	return cc.sess.suite.Decapsulate(cc.sess.self.priv, ct)
}

func (cc *clientCall) rekeyed()           { cc.c.sc.streamRekeys.Inc() }
func (cc *clientCall) counted(n int)      { cc.sess.bytes.Add(int64(n)) }
func (cc *clientCall) rejected(err error) { cc.c.m.reject(sideClient, err) }

// final restores the trailers of the response's FINAL frame into the response.
func (cc *clientCall) final(block []byte) error {
	f, err := decodeFieldBlock(block, responseFinal)
	if err != nil {
		return err
	}
	for k, v := range f.trailers {
		cc.trailers[k] = v
	}
	return nil
}

func (cc *clientCall) sealedBody() io.ReadCloser { return io.NopCloser(bytes.NewReader(cc.sealed)) }

// sealedBodyFirst is the body of the first send of a request sealed whole, in the call's
// own allocation (resends and GetBody take a new one from sealedBody).
func (cc *clientCall) sealedBodyFirst() io.ReadCloser {
	cc.sent.Reset(cc.sealed)
	return &cc.sent
}

// sealedBody is a request body sealed whole: closing it does nothing.
type sealedBody struct{ bytes.Reader }

func (*sealedBody) Close() error { return nil }

func (cc *clientCall) getBody() (io.ReadCloser, error) { return cc.sealedBody(), nil }

// sealWhole seals a request body of known length n in one piece (the call ID, the head
// frame, its data frames and the FINAL frame) into one buffer, and closes body. A body
// that fits one frame is read straight into its place in that buffer and sealed there.
func sealWhole(s *sealer, callID uint64, head *fieldBlock, body io.ReadCloser, n int64, side callSide) ([]byte, error) {
	if body != nil {
		defer body.Close()
	} else {
		n = 0
	}
	frames := 3 + (int(n)+maxDataFrame-1)/maxDataFrame
	out := make([]byte, 0, callIDSize+frames*(frameHeaderSize+aeadTagSize)+int(n)+len(emptyFinalBlock)+256)
	out = binary.BigEndian.AppendUint64(out, callID)
	out, err := s.appendBlock(out, 0, head)
	if err != nil || n == 0 {
		return s.finishWhole(out, err)
	}
	if side != nil {
		side.counted(int(n))
	}
	if n <= maxDataFrame && !s.rekeyDue() {
		// The head block's size is not bounded above (request headers such as a bearer
		// token): make room for the data frame and the FINAL frame after it.
		out = slices.Grow(out, 2*(frameHeaderSize+aeadTagSize)+int(n)+len(emptyFinalBlock))
		start := len(out)
		buf := out[:start+frameHeaderSize+int(n)]
		// The probe for a longer body reads into the room the tag will take.
		if err := readExactly(body, buf[start+frameHeaderSize:], out[len(buf):len(buf)+1]); err != nil {
			return nil, err
		}
		s.sinceBytes += n
		out, err = s.sealInPlace(buf, start, 0, int(n))
		return s.finishWhole(out, err)
	}
	plain := make([]byte, n)
	if err := readExactly(body, plain, nil); err != nil {
		return nil, err
	}
	out, err = s.appendData(out, plain)
	return s.finishWhole(out, err)
}

// finishWhole appends the FINAL frame of a request sealed whole.
func (s *sealer) finishWhole(out []byte, err error) ([]byte, error) {
	if err != nil {
		return nil, err
	}
	return s.appendFrame(out, flagFinal, emptyFinalBlock)
}

// readExactly fills b from r and checks that r has nothing more, reading into probe (one
// byte of a buffer the caller holds anyway: a local array would escape through r.Read and
// cost an allocation per call) or, when probe is nil, a byte of its own.
func readExactly(r io.Reader, b, probe []byte) error {
	if _, err := io.ReadFull(r, b); err != nil {
		return err
	}
	if probe == nil {
		probe = make([]byte, 1)
	}
	if m, _ := r.Read(probe[:1]); m != 0 {
		return errors.New("pqkex: request body longer than its ContentLength")
	}
	return nil
}

func nonNil(b io.ReadCloser) io.ReadCloser {
	if b == nil || b == http.NoBody {
		return nil
	}
	return b
}

func authority(u *url.URL) string { return u.Scheme + "://" + u.Host }

func (c *Client) lockFor(key string) *sync.Mutex {
	c.mu.Lock()
	defer c.mu.Unlock()
	l, ok := c.locks[key]
	if !ok {
		l = &sync.Mutex{}
		c.locks[key] = l
	}
	return l
}

func (c *Client) usable(s *clientSession, now time.Time) bool {
	p := c.cfg.rekey
	return s != nil && now.Before(s.expiry) && !s.inflight.full() &&
		(p.Calls == 0 || s.calls.Load() < p.Calls) &&
		(p.Bytes == 0 || s.bytes.Load() < p.Bytes) &&
		(p.Age == 0 || now.Sub(s.created) < p.Age)
}

func (c *Client) dropSession(u *url.URL, s *clientSession) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sessions[authority(u)] == s {
		delete(c.sessions, authority(u))
	}
}

// session returns a usable session with the server at u, running a handshake if needed.
// A session whose server expect refuses is never used (expect may be nil).
func (c *Client) session(ctx context.Context, base http.RoundTripper, u *url.URL, expect Authorizer, now time.Time) (*clientSession, error) {
	// The current session's key is spelled into a stack buffer for the lookup: a map index
	// by string(bytes) allocates nothing, where authority's string would on every call.
	var kb [128]byte
	k := append(append(append(kb[:0], u.Scheme...), "://"...), u.Host...)
	c.mu.Lock()
	s := c.sessions[string(k)]
	c.mu.Unlock()
	if c.usable(s, now) {
		if expect != nil && expect(s.server.spiffeID) != nil {
			return nil, errIdentity
		}
		return s, nil
	}
	key := authority(u)
	l := c.lockFor(key)
	l.Lock()
	defer l.Unlock()
	c.mu.Lock()
	s = c.sessions[key]
	c.mu.Unlock()
	if c.usable(s, now) {
		if expect != nil && expect(s.server.spiffeID) != nil {
			return nil, errIdentity
		}
		return s, nil
	}
	if s != nil {
		c.m.rekeys.WithLabelValues(sideClient, "session").Inc()
	}
	return c.establish(ctx, base, key, s != nil, expect)
}

// bindFor reports whether handshakes with the server at key are channel-bound (spec 4.2).
func (c *Client) bindFor(key string) bool { return !c.cfg.noBindAll && !c.cfg.noBind[key] }

// establish runs a handshake with the server at key (refetching its credential once if
// the server rotated it, and sending its own ephemeral once if the TLS connection cannot
// stand in for it) and makes the new session current. The caller holds key's lock.
//
// A rekey (replacing a session that served its calls, bytes or time) always sends a pqkex
// ephemeral: it normally runs on the connection the old session was made on, and only the
// first session of a connection may leave its ephemeral to TLS (spec 6.5).
func (c *Client) establish(ctx context.Context, base http.RoundTripper, key string, rekey bool, expect Authorizer) (*clientSession, error) {
	bind := c.bindFor(key)
	flags := clientFlags(bind, !rekey)
	s, err := c.handshake(ctx, base, key, flags, expect)
	if reasonOf(err) == reasonServerKey {
		// The server rotated its credential: fetch it again, once.
		c.mu.Lock()
		delete(c.servers, key)
		c.mu.Unlock()
		s, err = c.handshake(ctx, base, key, flags, expect)
	}
	if reasonOf(err) == reasonTLSNotPQ && flags&flagTLSEphemeral != 0 {
		// The client cannot see the TLS group before its request; the server did and found
		// it classical (spec 5.3): the full channel-bound handshake, with an ephemeral, once.
		c.m.reject(sideClient, err)
		s, err = c.handshake(ctx, base, key, clientFlags(bind, false), expect)
	}
	if err != nil {
		c.m.handshakes.WithLabelValues(sideClient, "error").Inc()
		return nil, err
	}
	c.m.handshakes.WithLabelValues(sideClient, "ok").Inc()
	if !c.cfg.authSet && expect == nil {
		c.m.insecure.WithLabelValues(sideClient).Inc()
	}
	c.mu.Lock()
	c.sessions[key] = s
	c.mu.Unlock()
	return s, nil
}

// Handshake runs a full handshake with the server at serverURL now, over base (the
// transport RoundTripper wraps), and makes the new session the one later calls to that
// server use. RoundTripper runs handshakes on demand; Handshake sets a session up ahead of
// the first call, or replaces the current one early. The server's credential is fetched
// and verified first unless the client already holds it. With channel binding on a
// post-quantum TLS connection the first session of a connection leaves its ephemeral to
// TLS; a session replacing one on the same connection brings its own (spec 6.5), at the
// cost of a second handshake. Errors are *connect.Error for pqkex refusals, else base's own.
func (c *Client) Handshake(ctx context.Context, base http.RoundTripper, serverURL string) error {
	u, err := url.Parse(serverURL)
	if err != nil || u.Host == "" {
		return fmt.Errorf("pqkex: server URL %q: want scheme://host", serverURL)
	}
	if base == nil {
		base = http.DefaultTransport
	}
	key := authority(u)
	l := c.lockFor(key)
	l.Lock()
	defer l.Unlock()
	c.mu.Lock()
	current := c.sessions[key]
	c.mu.Unlock()
	s, err := c.establish(ctx, base, key, false, nil)
	if err == nil && current != nil && s.tlsEph && bytes.Equal(s.binding, current.binding) {
		// It replaced a session on the same TLS connection: only the first session of a
		// connection may leave its ephemeral to TLS (spec 6.5), so once more with one.
		_, err = c.establish(ctx, base, key, true, nil)
	}
	if err != nil {
		if isRejection(err) {
			c.m.reject(sideClient, err)
			return toConnect(err)
		}
		return err
	}
	return nil
}

// serverCredential returns the verified credential of the server at key, fetching it once;
// the client's authorizer and expect (if not nil) must both accept it.
func (c *Client) serverCredential(ctx context.Context, base http.RoundTripper, key string, self *Identity, expect Authorizer) (*Credential, error) {
	now := c.cfg.now()
	c.mu.Lock()
	cred := c.servers[key]
	c.mu.Unlock()
	if cred != nil && now.Before(cred.notAfter) {
		if expect != nil && expect(cred.spiffeID) != nil {
			return nil, errIdentity
		}
		return cred, nil
	}
	raw, _, err := exchange(ctx, base, http.MethodGet, key+CredentialPath, nil)
	if err != nil {
		return nil, err
	}
	if cred, err = c.creds.verify(c.cfg.roots, raw, now); err != nil {
		return nil, err
	}
	if !c.cfg.allowsSuite(cred.suite) {
		return nil, c.cfg.errSuitePolicy(cred.suite, "server's")
	}
	if cred.suite.ID() != self.cred.suite.ID() {
		return nil, errUnsupported
	}
	if err := c.cfg.authorize(cred.spiffeID); err != nil {
		return nil, errIdentity
	}
	if expect != nil && expect(cred.spiffeID) != nil {
		return nil, errIdentity
	}
	c.mu.Lock()
	c.servers[key] = cred
	c.mu.Unlock()
	return cred, nil
}

func (c *Client) handshake(ctx context.Context, base http.RoundTripper, key string, flags uint8, expect Authorizer) (_ *clientSession, err error) {
	defer recoverTo(&err)
	self, err := c.cfg.identity.GetIdentity()
	if err != nil || self == nil {
		return nil, errInternal
	}
	if !c.cfg.allowsSuite(self.cred.suite) {
		return nil, c.cfg.errSuitePolicy(self.cred.suite, "own identity's")
	}
	flags = suiteFlags(self.cred.suite, flags)
	server, err := c.serverCredential(ctx, base, key, self, expect)
	if err != nil {
		return nil, err
	}
	hs, err := startClient(nil, self, server, c.cfg.aead, flags)
	if err != nil {
		return nil, err
	}
	raw, conn, err := exchange(ctx, base, http.MethodPost, key+HandshakePath, hs.raw)
	if err != nil {
		return nil, err
	}
	var cb []byte
	if flags&flagBinding != 0 {
		if cb, err = channelBinding(conn, server.spiffeID); err != nil {
			return nil, err
		}
	}
	if flags&flagTLSEphemeral != 0 && (conn == nil || !tlsEphemeralGroup(hs.hello.suite, conn.CurveID)) {
		// The server accepted the hello, so its TLS connection is post-quantum and this one,
		// which is not, is another (spec 5.3). The exporters would differ too; this check
		// does not rest on that.
		return nil, errTLSNotPQHere
	}
	res, err := hs.finish(raw, cb)
	if err != nil {
		return nil, err
	}
	now := c.cfg.now()
	expiry := fromUnix(res.expiry)
	return &clientSession{
		suite: hs.hello.suite, aead: hs.hello.aead, secret: res.secrets.session,
		secretKey: callRoot(hs.hello.suite.Hash(), res.secrets.session, server.spiffeID, server.hash),
		ticket:    []string{base64.RawURLEncoding.EncodeToString(res.ticket)},
		sid:       []string{base64.RawURLEncoding.EncodeToString(res.secrets.sessionID)},
		expiry:    expiry, created: now, server: server, self: self,
		binding: cb, tlsEph: flags&flagTLSEphemeral != 0,
	}, nil
}

// exchange makes one request to a pqkex endpoint and returns the response body and the TLS
// state of the connection it came over.
func exchange(ctx context.Context, base http.RoundTripper, method, url string, body []byte) ([]byte, *tls.ConnectionState, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	if err != nil {
		return nil, nil, errMalformed
	}
	if body == nil {
		req.Body = http.NoBody
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := base.RoundTrip(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	if token := headerValue(resp.Header, headerError); token != "" {
		return nil, nil, handshakeRefusal(token, headerValue(resp.Header, headerVersion))
	}
	if resp.StatusCode != http.StatusOK {
		return nil, nil, errNoSession
	}
	raw, err := readHandshakeBody(resp.Body, resp.ContentLength)
	if err != nil {
		return nil, nil, err
	}
	return raw, resp.TLS, nil
}
