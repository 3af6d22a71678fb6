package rpc

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/veilrpc/veil/transport"
)

// ServerOption configures NewServer.
type ServerOption interface {
	applyToServer(*serverConfig)
}

// ClientOption configures NewHTTPClient.
type ClientOption interface {
	applyToClient(*clientConfig)
}

// Option is both a ServerOption and a ClientOption: it means the same on either side.
//
// Options are values with an unexported method, as in connect-go. The zero
// configuration (no options) is the safe one: TLS 1.3 with post-quantum hybrid key
// exchange only (transport.PQMode's zero value), every application procedure denied
// (no Policy), no compression, write coalescing on.
type Option interface {
	ServerOption
	ClientOption
}

type serverOption func(*serverConfig)

func (f serverOption) applyToServer(c *serverConfig) { f(c) }

type clientOption func(*clientConfig)

func (f clientOption) applyToClient(c *clientConfig) { f(c) }

type option struct {
	server func(*serverConfig)
	client func(*clientConfig)
}

func (o option) applyToServer(c *serverConfig) { o.server(c) }
func (o option) applyToClient(c *clientConfig) { o.client(c) }

// WithPQMode sets the TLS key-exchange policy (see transport.PQMode; default its zero
// value).
func WithPQMode(m transport.PQMode) Option {
	return option{
		server: func(c *serverConfig) { c.pqMode = m },
		client: func(c *clientConfig) { c.pqMode = m },
	}
}

// WithMetrics registers the collectors in reg: calls, latency and TLS handshakes, and on
// a server those of WatchIdentity and WatchDependency. The default is, on a server, a
// new registry of its own with the Go and process collectors (served by
// WithMetricsAddr); on a client, none. WithMetricsAddr needs a reg that is also a
// prometheus.Gatherer, such as a *prometheus.Registry.
func WithMetrics(reg prometheus.Registerer) Option {
	return option{
		server: func(c *serverConfig) { c.registry = reg },
		client: func(c *clientConfig) { c.registry = reg },
	}
}

// WithWriteCoalescing turns write coalescing on or off for the connections (default on):
// see conn.go.
func WithWriteCoalescing(on bool) Option {
	return option{
		server: func(c *serverConfig) { c.noCoalesce = !on },
		client: func(c *clientConfig) { c.noCoalesce = !on },
	}
}
