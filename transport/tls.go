package transport

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// PQMode says which TLS key exchanges a peer accepts. The zero value is PQStrict, the
// secure choice: accepting classic key exchange takes an explicit PQPermissive. Any
// value other than PQPermissive is PQStrict.
type PQMode int

const (
	// PQStrict accepts only post-quantum hybrid groups: a ClientHello that offers
	// only classic groups fails the handshake. It is the zero value and the default.
	PQStrict PQMode = iota
	// PQPermissive prefers post-quantum hybrid key exchange and accepts classic
	// groups, reporting each classic handshake to the Observer: for peers that cannot
	// do X25519MLKEM768 yet. A recorded classic handshake can be decrypted by whoever
	// later has a quantum computer.
	PQPermissive
)

// String returns "strict" or "permissive".
func (m PQMode) String() string {
	if m == PQPermissive {
		return "permissive"
	}
	return "strict"
}

// ParsePQMode parses "strict" or "permissive"; "" is the zero value, PQStrict.
func ParsePQMode(s string) (PQMode, error) {
	switch s {
	case "strict", "":
		return PQStrict, nil
	case "permissive":
		return PQPermissive, nil
	}
	return 0, fmt.Errorf("transport: unknown PQ mode %q (want strict or permissive)", s)
}

// Hybrid post-quantum groups, most preferred first.
var pqGroups = []tls.CurveID{tls.X25519MLKEM768, tls.SecP256r1MLKEM768, tls.SecP384r1MLKEM1024}

// Classic groups accepted in permissive mode after the hybrid ones.
var classicGroups = []tls.CurveID{tls.X25519, tls.CurveP256, tls.CurveP384}

// IsPQGroup reports whether g is a post-quantum hybrid key exchange.
func IsPQGroup(g tls.CurveID) bool { return slices.Contains(pqGroups, g) }

// Reason names why a handshake was refused: a stable snake_case token, the reason
// label of veil_tls_handshake_failures_total, in HandshakeError and its text. Every
// value is listed in docs/refusals.md (a test holds the table to these constants).
type Reason string

// Reasons a handshake is refused, as reported to Observer.HandshakeFailed and found in
// the error's text.
const (
	ReasonNoClientCert     Reason = "no_client_cert"
	ReasonUnknownAuthority Reason = "unknown_authority"
	ReasonExpired          Reason = "expired"
	ReasonNoSPIFFEID       Reason = "no_spiffe_id"
	ReasonManySPIFFEIDs    Reason = "multiple_spiffe_ids"
	ReasonBadCertificate   Reason = "bad_certificate"
	ReasonTLSVersion       Reason = "tls_version"
	ReasonClassicOnly      Reason = "classic_key_exchange"
	ReasonUnauthorizedPeer Reason = "unauthorized_peer"
	ReasonRevoked          Reason = "revoked" // on the Source's Denylist
	ReasonNotTLS           Reason = "not_tls"
	ReasonPeerAlert        Reason = "peer_alert"  // the peer sent a TLS alert (seen in net/http's log)
	ReasonPeerClosed       Reason = "peer_closed" // the peer hung up mid-handshake (seen in net/http's log)
	ReasonOther            Reason = "other"
)

// Observer is told about every handshake a config takes part in. Implementations must
// be safe for concurrent use. Nil methods are never called on a nil Observer.
type Observer interface {
	HandshakeDone(group tls.CurveID, resumed bool)
	HandshakeFailed(reason Reason)
}

// Denylist refuses certificates that chain to a trusted root but have been revoked.
// Check returns an error that says what is revoked, or nil for a chain (leaf first) it
// does not deny. Package pki's Denylist, distributed with a CA's trust bundle, is one.
type Denylist interface {
	Check(chain []*x509.Certificate) error
}

// DenylistSource is implemented by Sources that distribute a denylist with their trust
// bundle. ServerConfig and ClientConfig refuse the peers it denies with ReasonRevoked,
// on every handshake, resumed ones included. A nil Denylist denies nothing.
type DenylistSource interface {
	GetDenylist() Denylist
}

// Authorizer decides whether a verified peer ID may connect.
type Authorizer func(id spiffeid.ID) error

// AuthorizeAny accepts every ID that chains to the bundle.
func AuthorizeAny() Authorizer { return func(spiffeid.ID) error { return nil } }

// AuthorizeID accepts exactly id.
func AuthorizeID(id spiffeid.ID) Authorizer {
	return func(got spiffeid.ID) error {
		if got != id {
			return fmt.Errorf("unexpected ID %q (want %q)", got, id)
		}
		return nil
	}
}

// AuthorizeMatching accepts IDs matched by any of the patterns.
func AuthorizeMatching(patterns ...Pattern) Authorizer {
	return func(got spiffeid.ID) error {
		for _, p := range patterns {
			if p.Match(got) {
				return nil
			}
		}
		return fmt.Errorf("ID %q is not allowed", got)
	}
}

// Option configures ServerConfig, ClientConfig and BootstrapClientConfig: every option
// of a TLS config applies to servers and clients alike. Options are values with an
// unexported method, as in connect-go. The zero configuration (no options) is the safe
// one: post-quantum hybrid key exchange only (PQStrict), a client certificate required,
// and on the client side no server accepted until WithAuthorizer names it.
type Option interface {
	applyToConfig(*config)
}

type configOption func(*config)

func (f configOption) applyToConfig(c *config) { f(c) }

type config struct {
	mode       PQMode
	authorize  Authorizer
	observer   Observer
	now        func() time.Time
	optionalCC bool
}

// WithPQMode sets the key-exchange policy (default PQStrict, PQMode's zero value).
func WithPQMode(m PQMode) Option { return configOption(func(c *config) { c.mode = m }) }

// WithAuthorizer decides which peer IDs may connect. Without it (or with nil) a server
// accepts any ID that chains to a trusted bundle, leaving per-procedure authorization to
// the layer above (package rpc's Policy, which denies by default), and a client accepts
// no server at all: a client must say which server it means to reach.
func WithAuthorizer(a Authorizer) Option {
	return configOption(func(c *config) { c.authorize = a })
}

// WithObserver reports handshakes (for metrics).
func WithObserver(o Observer) Option { return configOption(func(c *config) { c.observer = o }) }

// WithClock sets the time used to check certificate validity (default time.Now).
func WithClock(now func() time.Time) Option {
	return configOption(func(c *config) { c.now = now })
}

// WithOptionalClientCert lets a server accept handshakes without a client certificate,
// so that a bootstrap procedure (the CA's Join) can be reached before a workload has an
// identity. A certificate that is presented is verified as usual. The caller must
// refuse every other request on such a connection (package rpc does so by procedure).
func WithOptionalClientCert() Option { return configOption(func(c *config) { c.optionalCC = true }) }

// newConfig applies opts; an unset Authorizer becomes fallback.
func newConfig(opts []Option, fallback Authorizer) *config {
	c := &config{now: time.Now}
	for _, o := range opts {
		o.applyToConfig(c)
	}
	if c.authorize == nil {
		c.authorize = fallback
	}
	if c.now == nil {
		c.now = time.Now
	}
	return c
}

// authorizeNone is a client's Authorizer until WithAuthorizer sets one.
func authorizeNone(id spiffeid.ID) error {
	return fmt.Errorf("no Authorizer configured for the server (use WithAuthorizer): refusing %q", id)
}

func (c *config) curves() []tls.CurveID {
	if c.mode != PQPermissive {
		return slices.Clone(pqGroups)
	}
	return append(slices.Clone(pqGroups), classicGroups...)
}

func (c *config) failed(reason Reason, err error) error {
	if c.observer != nil {
		c.observer.HandshakeFailed(reason)
	}
	return &HandshakeError{Reason: reason, Err: err}
}

// HandshakeError is a refused handshake with its reason.
type HandshakeError struct {
	Reason Reason
	Err    error
}

func (e *HandshakeError) Error() string {
	return "transport: handshake refused (" + string(e.Reason) + "): " + e.Err.Error()
}

func (e *HandshakeError) Unwrap() error { return e.Err }

// ServerConfig is a TLS 1.3-only server configuration that requires a client
// certificate chaining to src's bundle with exactly one SPIFFE ID, authorized by the
// configured Authorizer. The server certificate and bundle are read from src on each
// handshake. The config supports HTTP/2 and HTTP/1.1 by ALPN.
func ServerConfig(src Source, opts ...Option) *tls.Config {
	c := newConfig(opts, AuthorizeAny())
	base := &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: c.curves(),
		NextProtos:       []string{"h2", "http/1.1"},
		// Client certificates are requested, not required, so that VerifyConnection sees
		// the missing-certificate case, counts it and refuses it with a clear reason.
		ClientAuth: tls.RequestClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return certificateFrom(src)
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				if c.optionalCC {
					if c.observer != nil {
						c.observer.HandshakeDone(cs.CurveID, cs.DidResume)
					}
					return nil
				}
				return c.failed(ReasonNoClientCert, errors.New("client presented no certificate"))
			}
			if err := c.verifyPeer(src, cs); err != nil {
				return err
			}
			if c.observer != nil {
				c.observer.HandshakeDone(cs.CurveID, cs.DidResume)
			}
			return nil
		},
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			// Refusals are counted here and then left to crypto/tls, which fails the
			// handshake with the standard alert (protocol_version, handshake_failure)
			// that tells the client what went wrong.
			switch {
			case !slices.Contains(hello.SupportedVersions, tls.VersionTLS13):
				_ = c.failed(ReasonTLSVersion, errors.New("client does not offer TLS 1.3"))
			case c.mode != PQPermissive && !slices.ContainsFunc(hello.SupportedCurves, IsPQGroup):
				_ = c.failed(ReasonClassicOnly, errors.New("client offers no post-quantum hybrid key exchange and the server is PQ strict"))
			}
			return base, nil
		},
	}
}

// ClientConfig is a TLS 1.3-only client configuration that presents src's SVID,
// verifies the server's chain against src's bundle and authorizes the server's SPIFFE
// ID with the configured Authorizer (without one it accepts no server). Sessions are
// resumed with tickets; resumed sessions are verified again.
func ClientConfig(src Source, opts ...Option) *tls.Config {
	c := newConfig(opts, authorizeNone)
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: c.curves(),
		NextProtos:       []string{"h2"},
		// Verification is done in VerifyConnection against the SPIFFE bundle (the server
		// name is not a DNS name in SPIFFE); it also runs on resumed sessions.
		InsecureSkipVerify: true,
		ClientSessionCache: tls.NewLRUClientSessionCache(256),
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return certificateFrom(src)
		},
		VerifyConnection: func(cs tls.ConnectionState) error { return c.verifyServer(src, cs) },
	}
}

// verifyServer is the client side's VerifyConnection.
func (c *config) verifyServer(src Source, cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return c.failed(ReasonBadCertificate, errors.New("server presented no certificate"))
	}
	if err := c.verifyPeer(src, cs); err != nil {
		return err
	}
	if c.mode != PQPermissive && !IsPQGroup(cs.CurveID) {
		return c.failed(ReasonClassicOnly, fmt.Errorf("negotiated %s, not a post-quantum hybrid group", cs.CurveID))
	}
	if c.observer != nil {
		c.observer.HandshakeDone(cs.CurveID, cs.DidResume)
	}
	return nil
}

// BootstrapClientConfig is ClientConfig for a workload that has no identity yet: it
// presents no client certificate, and verifies the server against bundle (the CA bundle
// given out of band) and the configured Authorizer. It is only good for the CA's Join.
func BootstrapClientConfig(bundle x509bundle.Source, opts ...Option) *tls.Config {
	c := newConfig(opts, authorizeNone)
	src := bundleOnly{bundle}
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		CurvePreferences:   c.curves(),
		NextProtos:         []string{"h2"},
		InsecureSkipVerify: true, // verified in VerifyConnection against the SPIFFE bundle
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &tls.Certificate{}, nil // no identity yet: send an empty Certificate message
		},
		VerifyConnection: func(cs tls.ConnectionState) error { return c.verifyServer(src, cs) },
	}
}

// bundleOnly is a Source with trust material and no identity.
type bundleOnly struct{ x509bundle.Source }

func (bundleOnly) GetX509SVID() (*x509svid.SVID, error) {
	return nil, errors.New("transport: no identity yet")
}

func (c *config) verifyPeer(src Source, cs tls.ConnectionState) error {
	leaf := cs.PeerCertificates[0]
	switch n := len(leaf.URIs); {
	case n == 0:
		return c.failed(ReasonNoSPIFFEID, errors.New("peer certificate has no SPIFFE ID"))
	case n > 1:
		return c.failed(ReasonManySPIFFEIDs, fmt.Errorf("peer certificate has %d URI SANs, want exactly one SPIFFE ID", n))
	}
	id, _, err := x509svid.Verify(cs.PeerCertificates, src, x509svid.WithTime(c.now()))
	if err != nil {
		return c.failed(verifyReason(err), err)
	}
	if d, ok := src.(DenylistSource); ok {
		if dl := d.GetDenylist(); dl != nil {
			if err := dl.Check(cs.PeerCertificates); err != nil {
				return c.failed(ReasonRevoked, err)
			}
		}
	}
	if err := c.authorize(id); err != nil {
		return c.failed(ReasonUnauthorizedPeer, err)
	}
	return nil
}

func verifyReason(err error) Reason {
	var inv x509.CertificateInvalidError
	var unknown x509.UnknownAuthorityError
	switch {
	case errors.As(err, &inv) && inv.Reason == x509.Expired:
		return ReasonExpired
	case errors.As(err, &unknown):
		return ReasonUnknownAuthority
	case strings.Contains(err.Error(), "could not get X509 bundle"):
		return ReasonUnknownAuthority
	case strings.Contains(err.Error(), "no URI SAN"), strings.Contains(err.Error(), "scheme is missing or invalid"):
		return ReasonNoSPIFFEID
	}
	return ReasonBadCertificate
}

func certificateFrom(src Source) (*tls.Certificate, error) {
	svid, err := src.GetX509SVID()
	if err != nil {
		return nil, fmt.Errorf("transport: own certificate: %w", err)
	}
	cert := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, c := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return cert, nil
}

// PeerID returns the SPIFFE ID of a verified TLS peer.
func PeerID(cs *tls.ConnectionState) (spiffeid.ID, error) {
	if cs == nil || len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("transport: no verified peer")
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("transport: %w", err)
	}
	return id, nil
}
