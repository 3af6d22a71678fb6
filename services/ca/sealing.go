package ca

import (
	"errors"
	"fmt"
	"sync/atomic"

	cav1 "github.com/veilrpc/veil/gen/veil/ca/v1"
	"github.com/veilrpc/veil/pqkex"
)

// ClientOption configures NewClient.
type ClientOption interface {
	applyToClient(*clientConfig)
}

type clientConfig struct {
	sealSuite pqkex.Scheme // nil: no sealing identity
}

type clientOption func(*clientConfig)

func (f clientOption) applyToClient(c *clientConfig) { f(c) }

// WithSealingIdentity makes every Join and Renew also ask the CA to certify a fresh
// pqkex static key of suite (nil: X25519+ML-KEM-768) with the same SPIFFE ID and
// validity as the certificate. The client then is the sealing layer's identity source
// (GetIdentity, for pqkex.WithIdentity) and knows its roots (SealingRoots, for
// pqkex.WithRoots): a workload that joins the online CA gets end-to-end sealing with
// no files, and its sealing identity rotates with every renewal. The static private
// key never leaves the process.
func WithSealingIdentity(suite pqkex.Scheme) ClientOption {
	return clientOption(func(c *clientConfig) {
		if suite == nil {
			suite = pqkex.X25519MLKEM768()
		}
		c.sealSuite = suite
	})
}

// sealing is the client's current pqkex identity and the roots that certify it.
type sealing struct {
	id    *pqkex.Identity
	roots pqkex.Roots
}

type sealingState struct {
	sealSuite pqkex.Scheme
	sealing   atomic.Pointer[sealing]
}

// sealingKey returns a fresh static key pair to send with a request, or nils when the
// client does not request sealing credentials.
func (c *Client) sealingKey() (pub, priv []byte, err error) {
	if c.sealSuite == nil {
		return nil, nil, nil
	}
	pub, priv, err = pqkex.GenerateKey(c.sealSuite, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("ca: sealing key: %w", err)
	}
	return pub, priv, nil
}

// adoptSealing installs the credential the CA issued for priv's public key.
func (c *Client) adoptSealing(m *cav1.Issued, priv []byte) error {
	if priv == nil {
		return nil
	}
	if len(m.GetPqCredential()) == 0 || len(m.GetPqRoot()) == 0 {
		return errors.New("ca: the CA issued no sealing credential")
	}
	id, err := pqkex.NewIdentity(m.GetPqCredential(), priv)
	if err != nil {
		return fmt.Errorf("ca: sealing credential: %w", err)
	}
	authorities := c.bundle.X509Authorities()
	if len(authorities) == 0 {
		return errors.New("ca: no root in the bundle")
	}
	roots, err := pqkex.NewRoots(m.GetPqRoot(), authorities[0].PublicKey)
	if err != nil {
		return fmt.Errorf("ca: sealing root: %w", err)
	}
	if sm2Root := m.GetPqSm2Root(); len(sm2Root) != 0 {
		if roots.SM2, err = pqkex.ParseSM2PublicKey(sm2Root); err != nil {
			return fmt.Errorf("ca: SM2 sealing root: %w", err)
		}
	}
	c.sealing.Store(&sealing{id: id, roots: roots})
	return nil
}

// GetIdentity implements pqkex.IdentitySource: the sealing identity of the latest
// certificate. It fails until the first Join with WithSealingIdentity succeeded.
func (c *Client) GetIdentity() (*pqkex.Identity, error) {
	s := c.sealing.Load()
	if s == nil {
		return nil, errors.New("ca: no sealing identity (yet)")
	}
	return s.id, nil
}

// SealingRoots returns the keys that certify sealing credentials in this trust
// domain: the CA's ML-DSA-65 key (as the CA reported it over the verified connection)
// and the classical root of the bundle the client was given.
func (c *Client) SealingRoots() (pqkex.Roots, error) {
	s := c.sealing.Load()
	if s == nil {
		return pqkex.Roots{}, errors.New("ca: no sealing identity (yet)")
	}
	return s.roots, nil
}
