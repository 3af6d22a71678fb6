package main

import (
	"crypto/ed25519"
	"flag"
	"fmt"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/gen/veil/auth/v1/authv1connect"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/auth"
	"github.com/veilrpc/veil/transport"
)

// Continuous authentication from the CLI (docs/ca.md): `veil serve --service auth`
// runs the token service, `veil serve --require-token` checks a certificate-bound
// token on every call, and the client commands fetch, cache and refresh tokens with
// --token-from.

// Bounds of --token-ttl: a token is meant to be short-lived, and one that lives
// less than a second would be refreshed on every call.
const (
	minTokenTTL = time.Second
	maxTokenTTL = time.Hour
)

// tokenServeFlags are veil serve's token settings: the token service's (with
// --service auth) and the verifier's (--require-token).
type tokenServeFlags struct {
	signingKey *string
	ttl        *time.Duration
	require    *bool
	issuer     *string
	publicKey  *string
}

func addTokenServeFlags(fs *flag.FlagSet) tokenServeFlags {
	return tokenServeFlags{
		signingKey: fs.String("token-signing-key", "", "auth: the token service's Ed25519 signing key (PKCS#8 PEM); created with FILE.pub beside it if missing"),
		ttl:        fs.Duration("token-ttl", auth.DefaultTokenTTL, "auth: lifetime of the access tokens the token service issues (1s to 1h; never past the caller's certificate)"),
		require:    fs.Bool("require-token", false, "every call needs an access token from the token service, bound to the caller's certificate, for this server's SPIFFE ID (continuous authentication)"),
		issuer:     fs.String("token-issuer", "", "with --require-token: the token service's SPIFFE ID (default with --service auth: this server's)"),
		publicKey:  fs.String("token-public-key", "", "with --require-token: the token service's public key (PKIX PEM, the .pub beside its signing key; default with --service auth: this server's)"),
	}
}

// check validates the token flags against the services to run.
func (f tokenServeFlags) check(services stringList) error {
	withAuth := slices.Contains(services, "auth")
	if withAuth && *f.signingKey == "" {
		return fmt.Errorf("%w: --service auth needs --token-signing-key", errUsage)
	}
	if !withAuth && *f.signingKey != "" {
		return fmt.Errorf("%w: --token-signing-key is for --service auth", errUsage)
	}
	if *f.ttl < minTokenTTL || *f.ttl > maxTokenTTL {
		return fmt.Errorf("%w: --token-ttl %s: want %s to %s", errUsage, *f.ttl, minTokenTTL, maxTokenTTL)
	}
	if !*f.require {
		if *f.issuer != "" || *f.publicKey != "" {
			return fmt.Errorf("%w: --token-issuer and --token-public-key need --require-token", errUsage)
		}
		return nil
	}
	if *f.issuer != "" {
		if _, err := spiffeid.FromString(*f.issuer); err != nil {
			return fmt.Errorf("%w: --token-issuer: %v", errUsage, err)
		}
	}
	if !withAuth && (*f.issuer == "" || *f.publicKey == "") {
		return fmt.Errorf("%w: --require-token needs --token-issuer and --token-public-key (or --service auth on this server)", errUsage)
	}
	if (*f.issuer == "") != (*f.publicKey == "") {
		return fmt.Errorf("%w: give both --token-issuer and --token-public-key, or neither to trust this server's own token service", errUsage)
	}
	return nil
}

// buildTokenService builds `--service auth`, the token service, signing as self; it
// returns the service and its public key.
func buildTokenService(f tokenServeFlags, self spiffeid.ID) (builtin, ed25519.PublicKey, error) {
	key, err := auth.LoadOrCreateKey(*f.signingKey)
	if err != nil {
		return builtin{}, nil, err
	}
	svc := auth.New(self, key, *f.ttl)
	return builtin{
		names: []string{authv1connect.TokenServiceName},
		// The service binds each token to the certificate of the connection that asks.
		opts: []rpc.ServerOption{rpc.WithPeerCertificates()},
		register: func(s *rpc.Server) {
			rpc.Register[authv1connect.TokenServiceHandler](s, authv1connect.NewTokenServiceHandler, svc)
		},
	}, key.Public().(ed25519.PublicKey), nil
}

// serverOptions returns the option that requires tokens (none without
// --require-token). own is this server's token service key when it runs one.
func (f tokenServeFlags) serverOptions(self spiffeid.ID, own ed25519.PublicKey) ([]rpc.ServerOption, error) {
	if !*f.require {
		return nil, nil
	}
	v := rpc.TokenVerifier{Issuer: *f.issuer, Audience: self.String()}
	if *f.issuer == "" {
		v.Issuer, v.Key = self.String(), own
	} else {
		key, err := auth.LoadPublicKey(*f.publicKey)
		if err != nil {
			return nil, err
		}
		v.Key = key
	}
	// A caller needs no token to obtain one.
	return []rpc.ServerOption{rpc.WithBoundTokens(v, "/"+authv1connect.TokenServiceName+"/IssueToken")}, nil
}

// tokenClientFlags are the client commands' token settings.
type tokenClientFlags struct {
	from     *string
	serverID *string
}

func addTokenClientFlags(fs interface {
	String(name, value, usage string) *string
}) tokenClientFlags {
	return tokenClientFlags{
		from:     fs.String("token-from", "", "fetch access tokens for the server (--server-id) from this token service (https://HOST:PORT, 'veil serve --service auth'), cache them, refresh them before they expire and when the server answers token_expired"),
		serverID: fs.String("token-server-id", "", "with --token-from: SPIFFE ID the token service must have (default: any ID in the identity's trust domain)"),
	}
}

// options returns the Connect client option that attaches tokens to every call (none
// without --token-from), and the TokenSource behind it. The token service is reached
// with the identity in dir, sealed as the calls are (seal: "on", "off" or "").
func (f tokenClientFlags) options(dir, serverID string, seal clientSeal) ([]connect.ClientOption, *auth.TokenSource, error) {
	if *f.from == "" {
		if *f.serverID != "" {
			return nil, nil, fmt.Errorf("%w: --token-server-id needs --token-from", errUsage)
		}
		return nil, nil, nil
	}
	if !strings.HasPrefix(*f.from, "https://") {
		return nil, nil, fmt.Errorf("%w: --token-from %q: want https://HOST:PORT", errUsage, *f.from)
	}
	if serverID == "" {
		return nil, nil, fmt.Errorf("%w: --token-from needs --server-id: a token names the one server it is for", errUsage)
	}
	audience, err := spiffeid.FromString(serverID)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: --server-id: %v", errUsage, err)
	}
	src, err := transport.LoadFiles(dir)
	if err != nil {
		return nil, nil, err
	}
	svid, err := src.GetX509SVID()
	if err != nil {
		return nil, nil, err
	}
	authorize := transport.AuthorizeMatching(transport.MustParsePattern("spiffe://" + svid.ID.TrustDomain().Name()))
	pqAuthorize := pqkex.AuthorizeAny()
	if *f.serverID != "" {
		id, err := spiffeid.FromString(*f.serverID)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: --token-server-id: %v", errUsage, err)
		}
		authorize, pqAuthorize = transport.AuthorizeID(id), pqkex.AuthorizeID(id.String())
	}
	var opts []auth.TokenSourceOption
	if seal.sealed(dir) {
		pc, err := newSealingClient(dir, pqAuthorize, false)
		if err != nil {
			return nil, nil, err
		}
		opts = append(opts, auth.WithClientOptions(rpc.WithClientSealing(pc)))
	}
	ts := auth.NewTokenSource(src, strings.TrimSuffix(*f.from, "/"), authorize, audience, opts...)
	return []connect.ClientOption{rpc.WithAccessTokens(ts)}, ts, nil
}
