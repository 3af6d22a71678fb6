package ca

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/veilrpc/veil/internal/atomicfile"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/transport"
)

// Join tokens live in DIR/tokens, one file per token named by the SHA-256 of the token:
// the token itself is never stored. Using a token renames its file to NAME.used, which
// only one process can do, so a token is single use even across processes sharing the
// directory.
const (
	tokenDir    = "tokens"
	tokenPrefix = "vjt1."
	// DefaultTokenTTL is how long a join token stays usable unless told otherwise.
	DefaultTokenTTL = 10 * time.Minute
	// MaxTokenTTL is the longest a join token may live.
	MaxTokenTTL = 7 * 24 * time.Hour
)

type tokenRecord struct {
	Pattern string    `json:"pattern"`
	Expires time.Time `json:"expires"`
	Created time.Time `json:"created"`
}

// NewToken creates a join token in the CA directory dir that lets one Join request a
// certificate for an ID matched by pattern (an exact SPIFFE ID or a transport.Pattern)
// within ttl. It returns the token; only its hash is stored.
func NewToken(dir, pattern string, ttl time.Duration, now time.Time) (string, error) {
	p, err := transport.ParsePattern(pattern)
	if err != nil {
		return "", fmt.Errorf("ca: %w", err)
	}
	if p.String() == "*" {
		return "", errors.New("ca: a join token must name a trust domain")
	}
	if ttl <= 0 || ttl > MaxTokenTTL {
		return "", fmt.Errorf("ca: token TTL %s must be positive and at most %s", ttl, MaxTokenTTL)
	}
	ca, err := pki.LoadCA(dir)
	if err != nil {
		return "", fmt.Errorf("ca: %w", err)
	}
	if tdID := ca.TrustDomain().ID().String(); pattern != tdID && !strings.HasPrefix(pattern, tdID+"/") {
		return "", fmt.Errorf("ca: %s is not in the CA's trust domain %s", pattern, ca.TrustDomain())
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", fmt.Errorf("ca: %w", err)
	}
	token := tokenPrefix + base64.RawURLEncoding.EncodeToString(raw)
	rec, err := json.Marshal(tokenRecord{Pattern: pattern, Expires: now.Add(ttl).UTC(), Created: now.UTC()})
	if err != nil {
		return "", fmt.Errorf("ca: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(dir, tokenDir), 0o700); err != nil {
		return "", fmt.Errorf("ca: %w", err)
	}
	if err := atomicfile.Write(tokenPath(dir, token), rec, 0o600); err != nil {
		return "", fmt.Errorf("ca: %w", err)
	}
	return token, nil
}

func tokenPath(dir, token string) string {
	sum := sha256.Sum256([]byte(token))
	return filepath.Join(dir, tokenDir, hex.EncodeToString(sum[:])+".json")
}

// useToken consumes token and returns the pattern it grants. Every attempt burns the
// token, including one that then fails for another reason.
func useToken(dir, token string, now time.Time) (transport.Pattern, *refusal) {
	if !strings.HasPrefix(token, tokenPrefix) {
		return transport.Pattern{}, refuse(reasonTokenUnknown, "ca: malformed join token")
	}
	p := tokenPath(dir, token)
	used := strings.TrimSuffix(p, ".json") + ".used"
	if err := os.Rename(p, used); err != nil {
		if _, statErr := os.Stat(used); statErr == nil {
			return transport.Pattern{}, refuse(reasonTokenReplayed, "ca: join token already used")
		}
		return transport.Pattern{}, refuse(reasonTokenUnknown, "ca: unknown join token")
	}
	b, err := os.ReadFile(used)
	if err != nil {
		return transport.Pattern{}, refuse(reasonInternal, "ca: reading join token: %v", err)
	}
	var rec tokenRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return transport.Pattern{}, refuse(reasonInternal, "ca: join token record is corrupt")
	}
	if !now.Before(rec.Expires) {
		return transport.Pattern{}, refuse(reasonTokenExpired, "ca: join token expired at %s", rec.Expires.Format(time.RFC3339))
	}
	pat, err := transport.ParsePattern(rec.Pattern)
	if err != nil {
		return transport.Pattern{}, refuse(reasonInternal, "ca: join token record is corrupt")
	}
	return pat, nil
}
