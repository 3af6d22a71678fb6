package rpc

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/time/rate"
)

// HTTP/3 (QUIC) next to HTTP/2 over TCP. The TLS configuration is transport's, unchanged:
// quic-go runs crypto/tls's QUIC handshake, so the key-exchange policy (X25519MLKEM768
// in PQStrict), the SPIFFE verification in VerifyConnection and the identity Source's
// GetCertificate / GetClientCertificate callbacks (rotation without a restart) apply as
// they do over TCP. http3 replaces the ALPN list with "h3".

// Limits of an HTTP/3 connection (both sides): at most this many concurrent request
// streams per connection, and bounded flow-control windows, so that a peer that opens
// streams and never reads holds at most MaxStreamReceiveWindow per stream and
// MaxConnectionReceiveWindow per connection.
const (
	HTTP3MaxStreams                 = 256
	http3MaxUniStreams              = 16 // control, QPACK encoder and decoder streams, and spares
	http3InitialStreamWindow        = 512 << 10
	http3MaxStreamWindow            = 6 << 20
	http3InitialConnectionWindow    = 768 << 10
	http3MaxConnectionWindow        = 15 << 20
	http3HandshakeTimeout           = 10 * time.Second
	http3IdleTimeout                = 90 * time.Second
	DefaultHTTP3HandshakesPerSecond = 256
	DefaultHTTP3HandshakeBurst      = 512
	// DefaultHTTP3ProbeTimeout is how long a client in auto mode waits for a QUIC
	// handshake before it decides UDP is blocked and falls back to HTTP/2.
	DefaultHTTP3ProbeTimeout = 3 * time.Second
	// http3RetryAfter is how long an auto-mode client stays on HTTP/2 after a failed
	// QUIC handshake before it tries HTTP/3 again.
	http3RetryAfter = 5 * time.Minute
	// A client keeps address-validation tokens for this many servers, this many each.
	http3TokenOrigins    = 256
	http3TokensPerOrigin = 4
)

// http3Mode says how a client uses HTTP/3.
type http3Mode int

const (
	http3Off  http3Mode = iota
	http3Only           // dial HTTP/3 only
	http3Auto           // try HTTP/3, fall back to HTTP/2 when UDP is blocked
)

type http3ServerConfig struct {
	perSecond float64
	burst     int
}

// WithHTTP3 serves HTTP/3 over QUIC on the UDP port with the number of the TCP listener
// (next to HTTP/2, which keeps serving), and makes a client dial HTTP/3 only. A server
// advertises HTTP/3 to HTTP/2 callers with Alt-Svc. Both serve the same handlers,
// interceptors, policy, health and reflection; 0-RTT is off on both sides (early data
// can be replayed), and a server validates client addresses with QUIC Retry once new
// handshakes exceed DefaultHTTP3HandshakesPerSecond (see WithHTTP3AddressValidation).
func WithHTTP3() Option {
	return option{
		server: func(c *serverConfig) {
			if c.http3 == nil {
				c.http3 = &http3ServerConfig{perSecond: DefaultHTTP3HandshakesPerSecond, burst: DefaultHTTP3HandshakeBurst}
			}
		},
		client: func(c *clientConfig) { c.http3 = http3Only },
	}
}

// WithHTTP3Auto makes a client try HTTP/3 and fall back to HTTP/2 when no QUIC
// handshake completes within probe (DefaultHTTP3ProbeTimeout when 0), as when a
// firewall drops UDP or the server has no HTTP/3. Refusals by TLS (wrong identity,
// untrusted CA, no post-quantum group) are not fallbacks: they fail the call as over
// HTTP/2. Each fallback is counted in veil_rpc_http3_fallbacks_total (WithMetrics).
func WithHTTP3Auto(probe time.Duration) ClientOption {
	return clientOption(func(c *clientConfig) {
		c.http3 = http3Auto
		c.http3Probe = probe
	})
}

// WithHTTP3AddressValidation sets when a server's QUIC listener makes new clients prove
// their address with a Retry before it keeps any state for them: once new handshakes
// exceed perSecond with bursts of burst. WithHTTP3AddressValidation(0, 0) validates
// every client (one extra round trip each). It implies WithHTTP3.
func WithHTTP3AddressValidation(perSecond float64, burst int) ServerOption {
	return serverOption(func(c *serverConfig) { c.http3 = &http3ServerConfig{perSecond: perSecond, burst: burst} })
}

func http3QUICConfig(handshake time.Duration, keepalive time.Duration) *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:           handshake,
		MaxIdleTimeout:                 http3IdleTimeout,
		KeepAlivePeriod:                keepalive,
		MaxIncomingStreams:             HTTP3MaxStreams,
		MaxIncomingUniStreams:          http3MaxUniStreams,
		InitialStreamReceiveWindow:     http3InitialStreamWindow,
		MaxStreamReceiveWindow:         http3MaxStreamWindow,
		InitialConnectionReceiveWindow: http3InitialConnectionWindow,
		MaxConnectionReceiveWindow:     http3MaxConnectionWindow,
		Allow0RTT:                      false,
	}
}

// transportMetrics count requests by transport ("h2" or "h3") and QUIC Retries.
type transportMetrics struct {
	requests *prometheus.CounterVec
	retries  prometheus.Counter
}

func registerOrReuse[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if reg == nil {
		return c
	}
	if err := reg.Register(c); err != nil {
		if are, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); ok {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic(err)
	}
	return c
}

func newTransportMetrics(reg prometheus.Registerer) *transportMetrics {
	return &transportMetrics{
		requests: registerOrReuse(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_rpc_requests_total", Help: "HTTP requests served, by transport (h2 over TCP, h3 over QUIC).",
			ConstLabels: prometheus.Labels{"side": "server"},
		}, []string{"transport"})),
		retries: registerOrReuse(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "veil_quic_retries_total", Help: "QUIC connection attempts answered with a Retry (address validation under a handshake flood).",
			ConstLabels: prometheus.Labels{"side": "server"},
		})),
	}
}

// transportLabel counts each request by the transport it came on.
func (m *transportMetrics) handler(next http.Handler) http.Handler {
	h2, h3 := m.requests.WithLabelValues("h2"), m.requests.WithLabelValues("h3")
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 3 {
			h3.Inc()
		} else {
			h2.Inc()
		}
		next.ServeHTTP(w, r)
	})
}

// http3Server is a server's QUIC side.
type http3Server struct {
	udp *net.UDPConn
	tr  *quic.Transport
	srv *http3.Server
	err chan error
}

// startHTTP3 listens on the UDP port of tcpAddr and serves h with tlsCfg over HTTP/3.
// It returns the handler for HTTP/2, which adds Alt-Svc.
func (s *Server) startHTTP3(tcpAddr net.Addr, tlsCfg *tls.Config, h http.Handler, m *transportMetrics) (*http3Server, http.Handler, error) {
	ta, ok := tcpAddr.(*net.TCPAddr)
	if !ok {
		return nil, nil, fmt.Errorf("rpc: HTTP/3 needs a TCP listener to take its port from, not %T", tcpAddr)
	}
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: ta.IP, Port: ta.Port, Zone: ta.Zone})
	if err != nil {
		return nil, nil, fmt.Errorf("rpc: HTTP/3 listener on udp %s: %w", ta, err)
	}
	limiter := rate.NewLimiter(rate.Limit(s.cfg.http3.perSecond), s.cfg.http3.burst)
	tr := &quic.Transport{
		Conn: udp,
		// Retry once new handshakes come faster than the limiter allows: the address
		// passed here is unvalidated, so the limiter is global, not per address (a
		// flood makes every new client pay one round trip). A client presenting a
		// token from an earlier connection (NEW_TOKEN) is not asked: quic-go calls
		// this only for Initials without a valid token.
		VerifySourceAddress: func(net.Addr) bool {
			if limiter.Allow() {
				return false
			}
			m.retries.Inc()
			return true
		},
	}
	hs := &http3.Server{
		Handler:    h,
		TLSConfig:  http3.ConfigureTLSConfig(tlsCfg),
		QUICConfig: http3QUICConfig(http3HandshakeTimeout, 0),
		Port:       ta.Port,
		Logger:     s.cfg.logger,
	}
	ln, err := tr.Listen(hs.TLSConfig, hs.QUICConfig)
	if err != nil {
		_ = udp.Close()
		return nil, nil, fmt.Errorf("rpc: HTTP/3 listener: %w", err)
	}
	h3 := &http3Server{udp: udp, tr: tr, srv: hs, err: make(chan error, 1)}
	go func() { h3.err <- hs.ServeListener(ln) }()
	altSvc := fmt.Sprintf(`%s=":%d"; ma=86400`, http3.NextProtoH3, ta.Port)
	h2 := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Alt-Svc", altSvc)
		h.ServeHTTP(w, r)
	})
	return h3, h2, nil
}

// close closes the listener and its connections at once (nil: nothing to close).
func (h *http3Server) close() {
	if h == nil {
		return
	}
	_ = h.srv.Close()
	_ = h.tr.Close()
	_ = h.udp.Close()
	if err := h.wait(); err != nil {
		h.srv.Logger.Warn("rpc: HTTP/3 serve ended with an error", "err", err)
	}
}

// wait returns the serve loop's error, unless it only says the server was closed.
func (h *http3Server) wait() error {
	err := <-h.err
	if err == nil || errors.Is(err, http.ErrServerClosed) || errors.Is(err, quic.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// shutdown stops taking connections, lets requests finish until ctx is done, and closes
// the UDP socket.
func (h *http3Server) shutdown(ctx context.Context) error {
	err := h.srv.Shutdown(ctx)
	if err != nil {
		_ = h.srv.Close()
	}
	_ = h.tr.Close()
	_ = h.udp.Close()
	return errors.Join(err, h.wait())
}

// newHTTP3Transport is a client's HTTP/3 round tripper, with 0-RTT off.
func newHTTP3Transport(tlsCfg *tls.Config, handshake, keepalive time.Duration) (*http3.Transport, error) {
	qt, err := sharedClientQUIC()
	if err != nil {
		return nil, err
	}
	tc := tlsCfg.Clone()
	tc.NextProtos = []string{http3.NextProtoH3}
	// QUIC sessions are resumed from their own cache, never from a TCP session's ticket.
	tc.ClientSessionCache = tls.NewLRUClientSessionCache(256)
	qc := http3QUICConfig(handshake, keepalive)
	// The address-validation tokens servers send (NEW_TOKEN, RFC 9000 8.1.3) are kept and
	// presented on reconnection: a server whose Retry budget a flood has spent (it is
	// global, see startHTTP3) then sends no Retry to a client it has seen before.
	qc.TokenStore = quic.NewLRUTokenStore(http3TokenOrigins, http3TokensPerOrigin)
	return &http3.Transport{
		TLSClientConfig: tc,
		QUICConfig:      qc,
		Dial: func(ctx context.Context, addr string, tlsCfg *tls.Config, cfg *quic.Config) (*quic.Conn, error) {
			ua, err := net.ResolveUDPAddr("udp", addr)
			if err != nil {
				return nil, err
			}
			// Dial, not DialEarly: no 0-RTT.
			return qt.Dial(ctx, ua, tlsCfg, cfg)
		},
	}, nil
}

// The clients of a process share one UDP socket and QUIC transport (connections are
// told apart by connection ID), so that clients made and dropped, as http.Clients are,
// leave no socket behind.
var clientQUIC struct {
	once sync.Once
	tr   *quic.Transport
	err  error
}

func sharedClientQUIC() (*quic.Transport, error) {
	clientQUIC.once.Do(func() {
		udp, err := net.ListenUDP("udp", nil)
		if err != nil {
			clientQUIC.err = err
			return
		}
		clientQUIC.tr = &quic.Transport{Conn: udp}
	})
	return clientQUIC.tr, clientQUIC.err
}

// h3Client sends calls over HTTP/3, or in auto mode over HTTP/2 while UDP is blocked.
type h3Client struct {
	h3        *http3.Transport
	h2        *http.Transport // nil: HTTP/3 only
	fallbacks prometheus.Counter

	mu      sync.Mutex
	useH2At time.Time // auto mode: calls go over HTTP/2 until this passes
}

func newH3Client(cfg *clientConfig, tlsCfg *tls.Config, h2 *http.Transport) (*h3Client, error) {
	c := &h3Client{}
	handshake := http3HandshakeTimeout
	if cfg.http3 == http3Auto {
		c.h2 = h2
		handshake = cfg.http3Probe
		if handshake <= 0 {
			handshake = DefaultHTTP3ProbeTimeout
		}
		c.fallbacks = registerOrReuse(cfg.registry, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "veil_rpc_http3_fallbacks_total", Help: "Calls an auto-mode client sent over HTTP/2 because no QUIC handshake completed (UDP blocked).",
			ConstLabels: prometheus.Labels{"side": "client"},
		}))
	}
	// No keepalive: an idle QUIC connection closes after http3IdleTimeout, as an idle
	// HTTP/2 connection does after IdleConnTimeout, so a dropped client leaves nothing
	// behind; a call in flight to a partitioned peer fails by QUIC's loss detection.
	t, err := newHTTP3Transport(tlsCfg, handshake, 0)
	if err != nil {
		return nil, err
	}
	c.h3 = t
	return c, nil
}

// fallbackWorthy reports whether a failed QUIC dial means "no HTTP/3 path" rather than
// a refusal: a TLS alert (CRYPTO_ERROR) is a refusal and is returned as is.
func fallbackWorthy(err error) bool {
	if te, ok := errors.AsType[*quic.TransportError](err); ok && te.ErrorCode.IsCryptoError() {
		return false
	}
	if errors.Is(err, context.Canceled) {
		return false
	}
	return true
}

// RoundTrip implements http.RoundTripper.
func (c *h3Client) RoundTrip(req *http.Request) (*http.Response, error) {
	if c.h2 == nil {
		return c.h3.RoundTrip(req)
	}
	c.mu.Lock()
	useH2 := time.Now().Before(c.useH2At)
	c.mu.Unlock()
	if useH2 {
		return c.h2.RoundTrip(req)
	}
	// The body is kept for HTTP/2 if HTTP/3 fails before reading any of it (a failed
	// dial), since http3 closes the body of a failed request.
	var body *keptBody
	r3 := req
	if req.Body != nil && req.Body != http.NoBody {
		body = &keptBody{rc: req.Body}
		r3 = req.Clone(req.Context())
		r3.Body = body
	}
	res, err := c.h3.RoundTrip(r3)
	if err == nil {
		return res, nil
	}
	var dialErr bool
	if _, ok := errors.AsType[*quic.IdleTimeoutError](err); ok {
		dialErr = true
	}
	if _, ok := errors.AsType[*quic.HandshakeTimeoutError](err); ok {
		dialErr = true
	}
	if _, ok := errors.AsType[*net.OpError](err); ok {
		dialErr = true // ICMP unreachable: nothing listens on the UDP port
	}
	if !dialErr || !fallbackWorthy(err) || req.Context().Err() != nil || (body != nil && body.read.Load()) {
		if body != nil {
			_ = body.rc.Close()
		}
		return nil, err
	}
	c.mu.Lock()
	c.useH2At = time.Now().Add(http3RetryAfter)
	c.mu.Unlock()
	c.fallbacks.Inc()
	return c.h2.RoundTrip(req)
}

// CloseIdleConnections closes idle HTTP/3 (and in auto mode HTTP/2) connections.
func (c *h3Client) CloseIdleConnections() {
	c.h3.CloseIdleConnections()
	if c.h2 != nil {
		c.h2.CloseIdleConnections()
	}
}

// keptBody defers Close until the body has been read from, so that a request that
// failed before sending anything can go over HTTP/2 with its body intact.
type keptBody struct {
	rc   io.ReadCloser
	read atomic.Bool
}

func (b *keptBody) Read(p []byte) (int, error) {
	b.read.Store(true)
	return b.rc.Read(p)
}

func (b *keptBody) Close() error {
	if b.read.Load() {
		return b.rc.Close()
	}
	return nil
}

// failingTransport fails every request with err.
type failingTransport struct{ err error }

func (f failingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil {
		_ = req.Body.Close()
	}
	return nil, f.err
}

func (failingTransport) CloseIdleConnections() {}
