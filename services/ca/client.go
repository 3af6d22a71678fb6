package ca

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	cav1 "github.com/veilrpc/veil/gen/veil/ca/v1"
	"github.com/veilrpc/veil/gen/veil/ca/v1/cav1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// Client is the workload side of the online CA: a transport.Issuer for
// transport.NewRenewingSource. It joins with a token over a connection that presents no
// client certificate and verifies the CA against the bundle given out of band; it
// renews over mutual TLS with the workload's current certificate.
type Client struct {
	url    string
	caID   spiffeid.ID
	token  string
	bundle *x509bundle.Bundle
	join   cav1connect.CAServiceClient
	sealingState

	mu    sync.Mutex
	hc    *http.Client
	mtls  cav1connect.CAServiceClient
	bound transport.Source
	leaf  *x509.Certificate // the leaf current held when its connections were made
}

var _ transport.Issuer = (*Client)(nil)

// NewClient returns a client for the CA at url ("https://host:port") whose roots are
// bundle (the CA's ca.crt or bundle.crt, handed out with the token).
func NewClient(url string, bundle *x509bundle.Bundle, token string, opts ...ClientOption) *Client {
	caID := ServerID(bundle.TrustDomain())
	hc := bootstrapHTTPClient(transport.BootstrapClientConfig(x509bundle.NewSet(bundle), transport.WithAuthorizer(transport.AuthorizeID(caID))))
	c := &Client{url: url, caID: caID, token: token, bundle: bundle,
		join: cav1connect.NewCAServiceClient(hc, url, rpc.ClientOptions()...)}
	var cfg clientConfig
	for _, o := range opts {
		o.applyToClient(&cfg)
	}
	c.sealSuite = cfg.sealSuite
	return c
}

// Join implements transport.Issuer with the client's token.
func (c *Client) Join(ctx context.Context, csr []byte, ttl time.Duration) (*transport.Issued, error) {
	if c.token == "" {
		return nil, errors.New("ca: no join token")
	}
	pub, priv, err := c.sealingKey()
	if err != nil {
		return nil, err
	}
	req := &cav1.JoinRequest{Token: c.token, Csr: csr, TtlSeconds: ttlSeconds(ttl), PqStaticKey: pub}
	if pub != nil {
		req.PqSuite = c.sealSuite.Name()
	}
	res, err := c.join.Join(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, err
	}
	return c.decode(res.Msg.GetIssued(), priv)
}

// Renew implements transport.Issuer over mutual TLS as current.
func (c *Client) Renew(ctx context.Context, current transport.Source, csr []byte, ttl time.Duration) (*transport.Issued, error) {
	pub, priv, err := c.sealingKey()
	if err != nil {
		return nil, err
	}
	req := &cav1.RenewRequest{Csr: csr, TtlSeconds: ttlSeconds(ttl), PqStaticKey: pub}
	if pub != nil {
		req.PqSuite = c.sealSuite.Name()
	}
	res, err := c.client(current).Renew(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, err
	}
	return c.decode(res.Msg.GetIssued(), priv)
}

// Trust implements transport.Issuer.
func (c *Client) Trust(ctx context.Context, current transport.Source) (*transport.Trust, error) {
	res, err := c.client(current).GetBundle(ctx, connect.NewRequest(&cav1.GetBundleRequest{}))
	if err != nil {
		return nil, err
	}
	return decodeTrust(res.Msg.GetBundle())
}

// client returns the mutual-TLS client for current. The CA checks the certificate of
// the connection a renewal arrives on, so once current holds a new leaf the client is
// replaced: the next call handshakes with the new leaf on a new connection.
func (c *Client) client(current transport.Source) cav1connect.CAServiceClient {
	c.mu.Lock()
	defer c.mu.Unlock()
	svid, err := current.GetX509SVID()
	if err != nil {
		return c.mtls
	}
	if c.mtls == nil || c.bound != current || svid.Certificates[0] != c.leaf {
		if c.hc != nil {
			c.hc.CloseIdleConnections()
		}
		c.hc = rpc.NewHTTPClient(current, transport.AuthorizeID(c.caID))
		c.mtls, c.bound, c.leaf = cav1connect.NewCAServiceClient(c.hc, c.url, rpc.ClientOptions()...), current, svid.Certificates[0]
	}
	return c.mtls
}

func bootstrapHTTPClient(cfg *tls.Config) *http.Client {
	t := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true, TLSHandshakeTimeout: 10 * time.Second}
	t.Protocols = new(http.Protocols)
	t.Protocols.SetHTTP2(true)
	return &http.Client{Transport: t, Timeout: joinTimeout}
}

// joinTimeout bounds a Join call, so that an unreachable CA fails the join instead of
// hanging a starting workload.
const joinTimeout = 30 * time.Second

func ttlSeconds(d time.Duration) uint32 {
	s := d / time.Second
	if s > 1<<31 {
		s = 1 << 31
	}
	return uint32(s)
}

// decode decodes an issuance and installs its sealing credential, if one was asked for.
func (c *Client) decode(m *cav1.Issued, sealKey []byte) (*transport.Issued, error) {
	out, err := decodeIssued(m)
	if err != nil {
		return nil, err
	}
	if err := c.adoptSealing(m, sealKey); err != nil {
		return nil, err
	}
	return out, nil
}

func decodeIssued(m *cav1.Issued) (*transport.Issued, error) {
	if m == nil || len(m.GetChain()) == 0 {
		return nil, errors.New("ca: response has no certificate")
	}
	out := &transport.Issued{}
	for _, der := range m.GetChain() {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("ca: response certificate: %w", err)
		}
		out.Chain = append(out.Chain, cert)
	}
	t, err := decodeTrust(m.GetBundle())
	if err != nil {
		return nil, err
	}
	out.Trust = *t
	return out, nil
}

func decodeTrust(b *cav1.Bundle) (*transport.Trust, error) {
	if b == nil || len(b.GetRoots()) == 0 {
		return nil, errors.New("ca: response has no roots")
	}
	td, err := spiffeid.TrustDomainFromString(b.GetTrustDomain())
	if err != nil {
		return nil, fmt.Errorf("ca: response: %w", err)
	}
	t := &transport.Trust{TrustDomain: td}
	for _, der := range b.GetRoots() {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("ca: response root: %w", err)
		}
		if !cert.IsCA {
			return nil, errors.New("ca: response root is not a CA certificate")
		}
		t.Roots = append(t.Roots, cert)
	}
	d, err := pki.NewDenylist(b.GetDeniedSerials(), b.GetDeniedIds())
	if err != nil {
		return nil, fmt.Errorf("ca: response: %w", err)
	}
	t.Denylist = d
	return t, nil
}
