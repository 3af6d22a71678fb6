package rpc

import (
	"crypto"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/internal/atomicfile"
	"github.com/veilrpc/veil/internal/certpem"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/transport"
)

// Files of a sealing identity, kept beside the X.509 identity files (tls.crt, tls.key,
// ca.crt) in the same directory.
const (
	SealCredentialFile = "pq.cred"        // the CA-certified static hybrid KEM public key
	SealKeyFile        = "pq.key"         // its private key, mode 0600
	SealRootFile       = "ca-mldsa65.pub" // the CA's ML-DSA-65 public key
	SealSM2RootFile    = "ca-sm2.pub"     // the CA's SM2 public key, when it has one (ShangMi suite)
)

// IssueSealingIdentity generates a static hybrid KEM key for id, has ca certify it
// (ML-DSA-65 and the classical root key both sign), and writes pq.cred, pq.key (0600)
// and ca-mldsa65.pub into dir. The credential is valid for ttl.
func IssueSealingIdentity(ca *pki.CA, id spiffeid.ID, dir string, ttl time.Duration, suite pqkex.Scheme) error {
	if suite == nil {
		suite = pqkex.X25519MLKEM768()
	}
	pub, priv, err := pqkex.GenerateKey(suite, nil)
	if err != nil {
		return fmt.Errorf("rpc: sealing key: %w", err)
	}
	now := time.Now()
	classical := ca.Signer()
	if suite.ID() == pqkex.SM2MLKEM768().ID() {
		// ShangMi credentials are signed with the CA's SM2 key (docs/pqkex.md 3.1).
		if classical = ca.SM2Signer(); classical == nil {
			return errors.New("rpc: the CA has no SM2 key for ShangMi credentials (veil ca init --sm2)")
		}
	}
	cred, err := pqkex.IssueCredential(ca.PQSigner(), classical, suite, id.String(), now.Add(-time.Minute), now.Add(ttl), pub)
	if err != nil {
		return fmt.Errorf("rpc: sealing credential: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("rpc: %w", err)
	}
	files := []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{SealKeyFile, pem.EncodeToMemory(&pem.Block{Type: "VEIL PQ PRIVATE KEY", Bytes: priv}), 0o600},
		{SealCredentialFile, pem.EncodeToMemory(&pem.Block{Type: "VEIL PQ CREDENTIAL", Bytes: cred}), 0o644},
		{SealRootFile, pem.EncodeToMemory(&pem.Block{Type: "ML-DSA-65 PUBLIC KEY", Bytes: ca.PQPublicKey().Bytes()}), 0o644},
	}
	if sm2Root := ca.SM2PublicKeyBytes(); sm2Root != nil {
		files = append(files, struct {
			name string
			data []byte
			perm os.FileMode
		}{SealSM2RootFile, pem.EncodeToMemory(&pem.Block{Type: "SM2 PUBLIC KEY", Bytes: sm2Root}), 0o644})
	}
	for _, f := range files {
		if err := atomicfile.Write(filepath.Join(dir, f.name), f.data, f.perm); err != nil {
			return fmt.Errorf("rpc: %w", err)
		}
	}
	return nil
}

// LoadSealingIdentity reads a sealing identity written by IssueSealingIdentity and the
// roots that verify peers' credentials: the ML-DSA-65 key from ca-mldsa65.pub and the
// classical key of the root in ca.crt.
func LoadSealingIdentity(dir string) (*pqkex.Identity, pqkex.Roots, error) {
	read := func(name, typ string) ([]byte, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("rpc: sealing identity: %w", err)
		}
		block, _ := pem.Decode(b)
		if block == nil || block.Type != typ {
			return nil, fmt.Errorf("rpc: sealing identity: %s is not a %s", name, typ)
		}
		return block.Bytes, nil
	}
	cred, err := read(SealCredentialFile, "VEIL PQ CREDENTIAL")
	if err != nil {
		return nil, pqkex.Roots{}, err
	}
	key, err := read(SealKeyFile, "VEIL PQ PRIVATE KEY")
	if err != nil {
		return nil, pqkex.Roots{}, err
	}
	pqRoot, err := read(SealRootFile, "ML-DSA-65 PUBLIC KEY")
	if err != nil {
		return nil, pqkex.Roots{}, err
	}
	id, err := pqkex.NewIdentity(cred, key)
	if err != nil {
		return nil, pqkex.Roots{}, fmt.Errorf("rpc: sealing identity: %w", err)
	}
	classical, err := rootKey(filepath.Join(dir, transport.BundleFile))
	if err != nil {
		return nil, pqkex.Roots{}, err
	}
	roots, err := pqkex.NewRoots(pqRoot, classical)
	if err != nil {
		return nil, pqkex.Roots{}, fmt.Errorf("rpc: sealing identity: %s: %w", SealRootFile, err)
	}
	if _, err := os.Stat(filepath.Join(dir, SealSM2RootFile)); err == nil {
		sm2Root, err := read(SealSM2RootFile, "SM2 PUBLIC KEY")
		if err != nil {
			return nil, pqkex.Roots{}, err
		}
		if roots.SM2, err = pqkex.ParseSM2PublicKey(sm2Root); err != nil {
			return nil, pqkex.Roots{}, fmt.Errorf("rpc: sealing identity: %s: %w", SealSM2RootFile, err)
		}
	}
	return id, roots, nil
}

// rootKey is the public key of the first root in the bundle file at path.
func rootKey(path string) (crypto.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("rpc: %w", err)
	}
	roots, err := certpem.ParseCertificates(b)
	if err != nil {
		return nil, fmt.Errorf("rpc: %s: %w", path, err)
	}
	return roots[0].PublicKey, nil
}

// WithSealing seals every call end to end with s (package pqkex): request and response
// bodies travel in AEAD frames under per-call keys from a post-quantum hybrid session,
// so proxies that terminate TLS see only ciphertext. s's mode (strict by default)
// decides what happens to unsealed calls. Handlers see the sealed peer in
// PeerFromContext, and the policy authorizes that end-to-end identity.
func WithSealing(s *pqkex.Server) ServerOption {
	return serverOption(func(c *serverConfig) { c.sealing = s })
}

// WithClientSealing seals the client's calls with c (package pqkex). The sealed calls
// expect, end to end, the server that NewHTTPClient's TLS authorizer expects, on top of c's
// own authorizer; WithSealedServer names another.
func WithClientSealing(c *pqkex.Client) ClientOption {
	return clientOption(func(cfg *clientConfig) { cfg.sealing = c })
}

// WithSealedServer sets the server identity that sealed calls expect end to end, in place of
// NewHTTPClient's TLS authorizer: for a client whose TLS peer is a proxy with an identity of
// its own (the pqkex client then also needs pqkex.WithoutChannelBinding for that server).
func WithSealedServer(a pqkex.Authorizer) ClientOption {
	return clientOption(func(cfg *clientConfig) { cfg.sealedFor = a })
}

// SealedAuthorizer is a transport authorizer as a pqkex one: it accepts the SPIFFE IDs a
// accepts.
func SealedAuthorizer(a transport.Authorizer) pqkex.Authorizer {
	return func(id string) error {
		sid, err := spiffeid.FromString(id)
		if err != nil {
			return fmt.Errorf("rpc: sealed peer: %w", err)
		}
		return a(sid)
	}
}

// withSealedPeer replaces the TLS peer with the end-to-end pqkex peer of a sealed call.
func withSealedPeer(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sp, ok := pqkex.PeerFromContext(r.Context())
		if !ok {
			next.ServeHTTP(w, r)
			return
		}
		id, err := spiffeid.FromString(sp.SPIFFEID)
		if err != nil {
			http.Error(w, "rpc: sealed peer has an invalid SPIFFE ID", http.StatusUnauthorized)
			return
		}
		p, _ := r.Context().Value(peerKey{}).(*Peer)
		if p == nil { // a bootstrap procedure's request has no TLS peer (peerHandler)
			p = &Peer{}
			r = r.WithContext(withPeerValue(r.Context(), p))
		}
		p.HopID, p.ID = p.ID, id
		p.Sealed, p.PQSuite, p.ChannelBound = true, sp.Suite, sp.ChannelBound
		next.ServeHTTP(w, r)
	})
}
