package rpc

import (
	"fmt"
	"net"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/transport"
)

type clientConfig struct {
	pqMode     transport.PQMode
	registry   prometheus.Registerer
	wrap       []func(http.RoundTripper) http.RoundTripper
	idleConns  int
	sealing    *pqkex.Client
	sealedFor  pqkex.Authorizer // WithSealedServer; nil: the TLS authorizer
	noCoalesce bool             // see WithWriteCoalescing
	pingIdle   time.Duration
	pingWait   time.Duration
	http3      http3Mode     // WithHTTP3, WithHTTP3Auto
	http3Probe time.Duration // WithHTTP3Auto
}

// Defaults for WithKeepalive.
const (
	DefaultKeepaliveIdle    = 30 * time.Second
	DefaultKeepaliveTimeout = 15 * time.Second
)

// WithKeepalive sets how long a connection may stay silent before the client pings
// it, and how long it waits for the answer before closing the connection and failing
// its calls with unavailable. Without this, a connection to a partitioned peer would
// keep taking new calls until the kernel gives up on it. Defaults:
// DefaultKeepaliveIdle and DefaultKeepaliveTimeout.
func WithKeepalive(idle, timeout time.Duration) ClientOption {
	return clientOption(func(c *clientConfig) { c.pingIdle, c.pingWait = idle, timeout })
}

// WithRoundTripper wraps the client's transport, innermost first: a layer such as
// pqkex's sealing round tripper goes here.
func WithRoundTripper(w func(http.RoundTripper) http.RoundTripper) ClientOption {
	return clientOption(func(c *clientConfig) { c.wrap = append(c.wrap, w) })
}

// NewHTTPClient returns an HTTP/2 client over mutual TLS 1.3 that presents src's
// identity and accepts only servers whose SPIFFE ID server authorizes. It reuses
// connections and resumes TLS sessions. Pass it to generated Connect clients together
// with ClientOptions().
func NewHTTPClient(src transport.Source, server transport.Authorizer, opts ...ClientOption) *http.Client {
	cfg := clientConfig{idleConns: 64, pingIdle: DefaultKeepaliveIdle, pingWait: DefaultKeepaliveTimeout}
	for _, o := range opts {
		o.applyToClient(&cfg)
	}
	m := newMetrics(cfg.registry, "client")
	tlsCfg := transport.ClientConfig(src,
		transport.WithPQMode(cfg.pqMode), transport.WithAuthorizer(server), transport.WithObserver(m))
	t := &http.Transport{
		TLSClientConfig:     tlsCfg,
		ForceAttemptHTTP2:   true,
		MaxIdleConnsPerHost: cfg.idleConns,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second,
	}
	if !cfg.noCoalesce {
		t.DialContext = coalescingDial(&net.Dialer{})
	}
	t.HTTP2 = &http.HTTP2Config{SendPingTimeout: cfg.pingIdle, PingTimeout: cfg.pingWait}
	t.Protocols = new(http.Protocols)
	t.Protocols.SetHTTP2(true)
	var rt http.RoundTripper = t
	var base idleClosing = t
	if cfg.http3 != http3Off {
		h3, err := newH3Client(&cfg, tlsCfg, t)
		if err != nil {
			// No UDP socket at all: the calls fail with this error rather than
			// silently going over HTTP/2 when HTTP/3 was asked for.
			rt = failingTransport{fmt.Errorf("rpc: HTTP/3: %w", err)}
		} else {
			rt, base = h3, h3
		}
	}
	for _, w := range cfg.wrap {
		rt = w(rt)
	}
	if cfg.sealing != nil {
		// The server the sealed calls expect end to end: the one the TLS hop expects, unless
		// WithSealedServer names another (docs/pqkex.md section 4.2).
		expect := cfg.sealedFor
		if expect == nil {
			expect = SealedAuthorizer(server)
		}
		rt = cfg.sealing.RoundTripper(rt, pqkex.ExpectServer(expect))
	}
	return &http.Client{Transport: withIdleCloser(rt, base)}
}

// ClientOptions are the Connect client options Veil uses: no gzip (see
// WithCompression on the server for why).
func ClientOptions() []connect.ClientOption {
	return []connect.ClientOption{
		connect.WithAcceptCompression("gzip", nil, nil),
	}
}
