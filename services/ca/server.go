package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/veilrpc/veil/gen/veil/ca/v1/cav1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// ServerID is the SPIFFE ID the online CA serves with, in its trust domain.
func ServerID(td spiffeid.TrustDomain) spiffeid.ID {
	return spiffeid.RequireFromPath(td, "/veil/ca")
}

// serverTTL is the lifetime of the CA's own serving certificate; it is re-issued at two
// thirds of it, and at once when the signing root changes.
const serverTTL = time.Hour

// NewServer returns an rpc.Server that serves s with the CA's own leaf (ServerID),
// issued in process from the CA and renewed in the same way. Join is reachable without
// a client certificate (the token authenticates it); Renew and GetBundle need a valid
// certificate from the trust domain. dnsNames and ips are added to the CA's leaf for
// clients that check host names.
func NewServer(s *Service, dnsNames []string, ips []net.IP, opts ...rpc.ServerOption) (*rpc.Server, error) {
	c, err := s.CA()
	if err != nil {
		return nil, err
	}
	self := &selfSource{svc: s, dns: dnsNames, ips: ips}
	if _, err := self.GetX509SVID(); err != nil {
		return nil, err
	}
	td := "spiffe://" + c.TrustDomain().Name()
	policy := rpc.NewPolicy().
		MustAllow(cav1connect.CAServiceRenewProcedure, td).
		MustAllow(cav1connect.CAServiceGetBundleProcedure, td)
	opts = append(opts, rpc.WithPolicy(policy),
		rpc.WithBootstrapProcedures(cav1connect.CAServiceJoinProcedure),
		rpc.WithMiddleware(withPeerChain))
	srv, err := rpc.NewServer(self, opts...)
	if err != nil {
		return nil, err
	}
	if err := s.register(srv.Registerer()); err != nil {
		return nil, err
	}
	rpc.Register(srv, cav1connect.NewCAServiceHandler, cav1connect.CAServiceHandler(s))
	return srv, nil
}

// selfSource is the CA's own identity: a leaf it issues to itself, trust from its bundle,
// and its denylist.
type selfSource struct {
	svc *Service
	dns []string
	ips []net.IP

	mu       sync.Mutex
	svid     *x509svid.SVID
	issuedAt time.Time
}

func (s *selfSource) GetX509SVID() (*x509svid.SVID, error) {
	c, err := s.svc.CA()
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.svc.cfg.now()
	if s.svid != nil {
		leaf := s.svid.Certificates[0]
		due := s.issuedAt.Add(2 * leaf.NotAfter.Sub(s.issuedAt) / 3)
		sameRoot := leaf.CheckSignatureFrom(c.Root()) == nil
		if now.Before(due) && sameRoot {
			return s.svid, nil
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	id := ServerID(c.TrustDomain())
	chain, err := c.IssueUnrecorded(id, &key.PublicKey, min(serverTTL, s.svc.cfg.maxTTL),
		pki.WithDNSNames(s.dns...), pki.WithIPAddresses(s.ips...))
	if err != nil {
		return nil, fmt.Errorf("ca: own certificate: %w", err)
	}
	s.svid = &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
	s.issuedAt = now
	return s.svid, nil
}

func (s *selfSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	c, err := s.svc.CA()
	if err != nil {
		return nil, err
	}
	if td != c.TrustDomain() {
		return nil, fmt.Errorf("ca: no bundle for trust domain %q", td)
	}
	return x509bundle.FromX509Authorities(td, c.Bundle()), nil
}

func (s *selfSource) GetDenylist() transport.Denylist {
	c, err := s.svc.CA()
	if err != nil {
		return nil // denies nothing
	}
	return c.Denylist()
}
