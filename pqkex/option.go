package pqkex

import (
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Mode says what a server does with calls that carry no pqkex session. Its zero value
// is [Strict], and so is any value other than [Permissive].
type Mode int

const (
	// Strict refuses calls without a pqkex session with unauthenticated. It is the zero value.
	Strict Mode = iota
	// Permissive passes plaintext calls through (and counts them), for migrations.
	Permissive
)

// String returns "strict" or "permissive", the names [ParseMode] reads.
func (m Mode) String() string {
	switch m {
	case Strict:
		return "strict"
	case Permissive:
		return "permissive"
	}
	return "Mode(" + strconv.Itoa(int(m)) + ")"
}

// ParseMode returns the mode named s: "strict" or "permissive". The empty string is
// [Strict], the default.
func ParseMode(s string) (Mode, error) {
	switch s {
	case "strict", "":
		return Strict, nil
	case "permissive":
		return Permissive, nil
	}
	return Strict, fmt.Errorf("pqkex: unknown mode %q (want strict or permissive)", s)
}

// RekeyPolicy says when keys are renewed with a fresh KEM. Every field of it and of its
// [StreamRekeyPolicy] follows one rule: zero takes the default of [DefaultRekeyPolicy], a
// negative value means "never" for that measure.
type RekeyPolicy struct {
	// Calls, Bytes and Age bound a client session: past any of them the client runs a new
	// handshake (fresh ephemeral KEM) before its next call.
	Calls int64
	Bytes int64
	Age   time.Duration
	// Stream bounds each direction of a call: past it the sender sends a REKEY frame.
	Stream StreamRekeyPolicy
}

// DefaultRekeyPolicy returns the defaults: a new session every 2^20 calls, 64 GiB or hour,
// and an in-stream rekey every GiB or 15 minutes.
func DefaultRekeyPolicy() RekeyPolicy {
	return RekeyPolicy{
		Calls:  1 << 20,
		Bytes:  64 << 30,
		Age:    time.Hour,
		Stream: StreamRekeyPolicy{Bytes: 1 << 30, Age: 15 * time.Minute},
	}
}

// StreamRekeyPolicy says when a sender advances a direction's keys with a fresh KEM
// encapsulation to the receiver's static key (spec 6.2): after Bytes plaintext bytes or Age
// since the direction's last key. Zero fields take the defaults, negative ones mean never,
// as in [RekeyPolicy].
type StreamRekeyPolicy struct {
	Bytes int64
	Age   time.Duration
}

// withDefaults resolves p's zero fields to the defaults and its negative ones to zero, which
// the checks that use the result read as never.
func (p RekeyPolicy) withDefaults() RekeyPolicy {
	d := DefaultRekeyPolicy()
	pick := func(v, def int64) int64 {
		switch {
		case v == 0:
			return def
		case v < 0:
			return 0
		}
		return v
	}
	p.Calls = pick(p.Calls, d.Calls)
	p.Bytes = pick(p.Bytes, d.Bytes)
	p.Age = time.Duration(pick(int64(p.Age), int64(d.Age)))
	p.Stream.Bytes = pick(p.Stream.Bytes, d.Stream.Bytes)
	p.Stream.Age = time.Duration(pick(int64(p.Stream.Age), int64(d.Stream.Age)))
	return p
}

// config is shared by servers and clients.
type config struct {
	identity  IdentitySource
	roots     Roots
	rootsSet  bool
	authorize Authorizer
	authSet   bool // WithAuthorizer given
	aead      AEAD
	bind      bool     // server: require channel binding
	suites    []uint16 // RequireSuites
	suitesSet bool

	// client only
	insecureAny bool            // InsecureAcceptAnyServer
	noBindAll   bool            // WithoutChannelBinding()
	noBind      map[string]bool // WithoutChannelBinding(authorities...)
	registerer  prometheus.Registerer
	now         func() time.Time
	logger      *slog.Logger
	rekey       RekeyPolicy

	// server only
	rand           io.Reader // randomness of handshakes and server nonces; nil: crypto/rand (tests set it)
	tickets        *TicketKeys
	ticketLifetime time.Duration
	mode           func(procedure string) Mode
	replayStore    ReplayStore
	replayFor      func(procedure string) bool
}

// Option configures a [Server] or a [Client].
type Option interface {
	ServerOption
	apply(*config)
}

// ServerOption configures a [Server]. Every [Option] is a ServerOption.
type ServerOption interface {
	applyServer(*config)
}

type option func(*config)

func (o option) apply(c *config)       { o(c) }
func (o option) applyServer(c *config) { o(c) }

type serverOption func(*config)

func (o serverOption) applyServer(c *config) { o(c) }

// WithIdentity sets the local workload's credential and static key. Required.
func WithIdentity(src IdentitySource) Option {
	return option(func(c *config) { c.identity = src })
}

// WithRoots sets the CA keys that certify peer credentials. Required.
func WithRoots(r Roots) Option {
	return option(func(c *config) { c.roots, c.rootsSet = r, true })
}

// WithAuthorizer sets which peer SPIFFE IDs are accepted. On a server the default,
// [AuthorizeAny], accepts any client identity the roots certify (rpc's policy authorizes
// calls). A client must name the servers it expects, normally with [AuthorizeID] (spec 4.2):
// through a proxy, the TLS peer is the proxy, and only the pqkex credential says which
// workload answers, so without an authorizer a proxy could route the session to another
// certified workload. [NewClient] refuses to start without it unless given
// [InsecureAcceptAnyServer].
func WithAuthorizer(a Authorizer) Option {
	return option(func(c *config) { c.authorize, c.authSet = a, a != nil })
}

// InsecureAcceptAnyServer lets a client without [WithAuthorizer] accept any server identity
// the roots certify. Through a TLS-terminating proxy this lets any certified workload answer,
// and read, the client's calls. NewClient logs a warning, and every session made under it is
// counted in veil_pqkex_insecure_sessions_total. For tests and tools only; servers ignore it.
func InsecureAcceptAnyServer() Option {
	return option(func(c *config) { c.insecureAny = true })
}

// WithoutChannelBinding turns channel binding (spec 5.3), on by default on clients, off for
// the servers at the given authorities ("https://host:port", as in request URLs), or for
// every server when none are given. Use it only for servers reached through a
// TLS-terminating proxy, where binding makes every handshake fail. Servers ignore it.
func WithoutChannelBinding(authorities ...string) Option {
	return option(func(c *config) {
		if len(authorities) == 0 {
			c.noBindAll = true
			return
		}
		if c.noBind == nil {
			c.noBind = map[string]bool{}
		}
		for _, a := range authorities {
			c.noBind[a] = true
		}
	})
}

// WithAEAD selects the AEAD a client proposes (servers accept every supported AEAD). The
// default is AES-256-GCM.
func WithAEAD(a AEAD) Option {
	return option(func(c *config) { c.aead = a })
}

// WithChannelBinding binds the handshake to the TLS connection it runs on (spec 5.3). Clients
// bind by default (see [WithoutChannelBinding]); on a server it refuses handshakes without
// binding. Use it only where the peer terminates TLS itself: a terminating proxy then makes
// the handshake fail.
func WithChannelBinding() Option {
	return option(func(c *config) { c.bind = true })
}

// WithMetrics registers pqkex's counters with reg (veil_pqkex_rejections_total,
// veil_pqkex_handshakes_total, veil_pqkex_calls_total). Without it the counters exist but are
// not exported.
func WithMetrics(reg prometheus.Registerer) Option {
	return option(func(c *config) { c.registerer = reg })
}

// WithClock sets the clock, for tests. The default is time.Now.
func WithClock(now func() time.Time) Option {
	return option(func(c *config) { c.now = now })
}

// WithLogger sets where pqkex logs its warnings (a client built with
// [InsecureAcceptAnyServer]). The default is [slog.Default]; nil keeps it.
func WithLogger(l *slog.Logger) Option {
	return option(func(c *config) {
		if l != nil {
			c.logger = l
		}
	})
}

// WithRekeyPolicy sets when sessions and streams get fresh KEM keys.
func WithRekeyPolicy(p RekeyPolicy) Option {
	return option(func(c *config) { c.rekey = p })
}

// WithTicketKeys sets the keys that seal session tickets; replicas that share them can
// continue each other's sessions. The default is a random key private to this server.
func WithTicketKeys(k *TicketKeys) ServerOption {
	return serverOption(func(c *config) { c.tickets = k })
}

// WithTicketLifetime bounds how long a session ticket is accepted. The default is one hour;
// a ticket never outlives either credential.
func WithTicketLifetime(d time.Duration) ServerOption {
	return serverOption(func(c *config) { c.ticketLifetime = d })
}

// WithReplayStore checks every sealed call to a procedure for which procedures reports true
// (nil: every procedure) against store as well as the server's own window, so that a call
// replayed to another replica is refused (already_exists) before its handler runs (spec
// 6.4). Give it the procedures with side effects that must not repeat: each check is a
// round trip to the store.
func WithReplayStore(store ReplayStore, procedures func(procedure string) bool) ServerOption {
	return serverOption(func(c *config) { c.replayStore, c.replayFor = store, procedures })
}

// WithMode sets the mode of every procedure. The default is [Strict].
func WithMode(m Mode) ServerOption {
	return serverOption(func(c *config) { c.mode = func(string) Mode { return m } })
}

// WithProcedureMode decides the mode per procedure (the request path, e.g.
// "/acme.v1.FooService/Bar"). A nil f is every procedure [Strict].
func WithProcedureMode(f func(procedure string) Mode) ServerOption {
	return serverOption(func(c *config) {
		if f == nil {
			f = func(string) Mode { return Strict }
		}
		c.mode = f
	})
}

func newConfig() *config {
	return &config{
		authorize:      AuthorizeAny(),
		aead:           AES256GCM,
		now:            time.Now,
		logger:         slog.Default(),
		ticketLifetime: time.Hour,
		mode:           func(string) Mode { return Strict },
	}
}
