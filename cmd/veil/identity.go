package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/ca"
	"github.com/veilrpc/veil/transport"
)

// identityFlags are the ways veil serve gets its identity: files (--identity), the
// online CA (--ca ...), or a SPIRE agent (--spiffe-socket). Exactly one is used.
type identityFlags struct {
	ca           *string
	caBundle     *string
	joinToken    *string
	id           *string
	certTTL      *time.Duration
	renewBefore  *time.Duration
	degrade      *time.Duration
	spiffeSocket *string
	spiffeWait   *time.Duration
}

func addIdentityFlags(fs *flag.FlagSet) *identityFlags {
	return &identityFlags{
		ca:           fs.String("ca", "", "obtain and renew the certificate from this online CA (https://HOST:PORT, see 'veil ca serve') instead of --identity"),
		caBundle:     fs.String("ca-bundle", "", "with --ca: PEM file with the CA's roots (its bundle.crt)"),
		joinToken:    fs.String("join-token", "", "with --ca: the single-use join token from 'veil ca token' (or @FILE to read it from a file)"),
		id:           fs.String("id", "", "with --ca: the SPIFFE ID to request"),
		certTTL:      fs.Duration("cert-ttl", pki.DefaultLeafTTL, "with --ca: certificate lifetime to request (the CA caps it; 10s and up)"),
		renewBefore:  fs.Duration("renew-before", 0, "with --ca: renew this long before expiry (default: at 2/3 of the lifetime)"),
		degrade:      fs.Duration("degrade-below", 0, "with --ca: report NOT_SERVING once the certificate has less than this left (default: 1/6 of the lifetime)"),
		spiffeSocket: fs.String("spiffe-socket", "", "get the identity from a SPIRE agent's Workload API at this unix socket path instead of --identity"),
		spiffeWait:   fs.Duration("spiffe-timeout", 30*time.Second, "with --spiffe-socket: how long to wait for the first SVID"),
	}
}

// workloadIdentity is a Source with what veil serve needs around it.
type workloadIdentity struct {
	src    transport.Source
	status rpc.IdentityStatus // health and identity metrics follow it
	dir    string             // identity directory, if any (sealing identity files)
	close  func()
	// sealing is the online CA's client when the identity comes from it: it also
	// obtains the pqkex sealing identity with every certificate.
	sealing *ca.Client
}

// source builds the identity chosen by the flags; identityDir is --identity.
func (f *identityFlags) source(ctx context.Context, identityDir string, logger *slog.Logger) (*workloadIdentity, error) {
	chosen := 0
	for _, s := range []string{identityDir, *f.ca, *f.spiffeSocket} {
		if s != "" {
			chosen++
		}
	}
	if chosen != 1 {
		return nil, fmt.Errorf("%w: give exactly one of --identity, --ca or --spiffe-socket", errUsage)
	}
	switch {
	case *f.ca != "":
		return f.fromCA(ctx, logger)
	case *f.spiffeSocket != "":
		wctx, cancel := context.WithTimeout(ctx, *f.spiffeWait)
		defer cancel()
		src, err := workloadapi.NewX509Source(wctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+*f.spiffeSocket)))
		if err != nil {
			return nil, fmt.Errorf("no SVID from the SPIRE agent at %s: %w", *f.spiffeSocket, err)
		}
		return &workloadIdentity{src: src, status: expiryStatus{src: src}, close: func() { _ = src.Close() }}, nil
	}
	src, err := transport.WatchFiles(ctx, identityDir, transport.WithLogger(logger))
	if err != nil {
		return nil, err
	}
	return &workloadIdentity{src: src, status: expiryStatus{src: src, file: src}, dir: identityDir, close: func() {}}, nil
}

// expiryStatus reports a certificate that someone else renews (cert-manager, SPIRE) as
// unhealthy once less than a sixth of its lifetime is left, so that health and
// metrics warn before it expires; for files it also counts reloads and rejected files.
type expiryStatus struct {
	src  transport.Source
	file *transport.FileSource
}

func (e expiryStatus) Status() transport.RenewStatus {
	svid, err := e.src.GetX509SVID()
	if err != nil {
		return transport.RenewStatus{LastError: err.Error()}
	}
	leaf := svid.Certificates[0]
	remaining := time.Until(leaf.NotAfter)
	st := transport.RenewStatus{ID: svid.ID, Serial: leaf.SerialNumber.Text(16), NotAfter: leaf.NotAfter,
		Remaining: remaining, Healthy: remaining > leaf.NotAfter.Sub(leaf.NotBefore)/6}
	if e.file != nil {
		fs := e.file.Status()
		st.Renewals, st.Failures, st.LastError = fs.Reloads, fs.Rejected, fs.LastError
	}
	return st
}

func (f *identityFlags) fromCA(ctx context.Context, logger *slog.Logger) (*workloadIdentity, error) {
	if *f.caBundle == "" || *f.joinToken == "" || *f.id == "" {
		return nil, fmt.Errorf("%w: --ca needs --ca-bundle, --join-token and --id", errUsage)
	}
	if !strings.HasPrefix(*f.ca, "https://") {
		return nil, fmt.Errorf("%w: --ca %q: want https://HOST:PORT", errUsage, *f.ca)
	}
	id, err := spiffeid.FromString(*f.id)
	if err != nil {
		return nil, fmt.Errorf("%w: --id: %v", errUsage, err)
	}
	if *f.certTTL < 10*time.Second {
		return nil, fmt.Errorf("%w: --cert-ttl %s: at least 10s", errUsage, *f.certTTL)
	}
	if *f.renewBefore >= *f.certTTL {
		return nil, fmt.Errorf("%w: --renew-before %s must be shorter than --cert-ttl %s", errUsage, *f.renewBefore, *f.certTTL)
	}
	bundle, err := x509bundle.Load(id.TrustDomain(), *f.caBundle)
	if err != nil {
		return nil, fmt.Errorf("--ca-bundle: %w", err)
	}
	token := *f.joinToken
	if file, ok := strings.CutPrefix(token, "@"); ok {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("--join-token: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	opts := []transport.RenewOption{transport.WithCertTTL(*f.certTTL), transport.WithLogger(logger)}
	if *f.renewBefore > 0 {
		opts = append(opts, transport.WithRenewBefore(*f.renewBefore))
	}
	if *f.degrade > 0 {
		opts = append(opts, transport.WithDegradeBelow(*f.degrade))
	}
	// Renewal runs until ctx ends; the join itself times out in the client.
	// Every certificate comes with a pqkex credential for a fresh static key, so that
	// the workload can seal end to end (--pq-seal strict|permissive) with no files (one
	// more ML-DSA-65 signature per issuance on the CA).
	client := ca.NewClient(*f.ca, bundle, token, ca.WithSealingIdentity(nil))
	src, err := transport.NewRenewingSource(ctx, client, id, opts...)
	if err != nil {
		switch ca.Reason(err) {
		case "token_replayed":
			return nil, errors.New("the join token was already used: ask for a new one ('veil ca token')")
		case "token_expired":
			return nil, errors.New("the join token has expired: ask for a new one ('veil ca token')")
		case "token_unknown":
			return nil, errors.New("the CA does not know this join token")
		}
		return nil, err
	}
	return &workloadIdentity{src: src, status: src, close: func() { _ = src.Close() }, sealing: client}, nil
}
