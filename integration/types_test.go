package integration

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/veilrpc/veil/transport"
)

type x509svidSVID = x509svid.SVID

func mustBundles(t *testing.T, s transport.Source) *x509bundle.Set {
	t.Helper()
	b, err := s.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("example.org"))
	if err != nil {
		t.Fatal(err)
	}
	return x509bundle.NewSet(b)
}
