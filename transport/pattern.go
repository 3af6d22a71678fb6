package transport

import (
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Pattern matches SPIFFE IDs. It is one of:
//   - an exact ID: spiffe://example.org/payment
//   - a whole trust domain: spiffe://example.org (every ID in it)
//   - a path pattern where a "*" segment matches exactly one segment:
//     spiffe://example.org/payment/ns/*/sa/*
//   - "*" alone, which matches every ID (from any trusted bundle).
type Pattern struct {
	raw      string
	any      bool
	td       spiffeid.TrustDomain
	segments []string // nil: the whole trust domain
}

// ParsePattern parses a pattern.
func ParsePattern(s string) (Pattern, error) {
	if s == "*" {
		return Pattern{raw: s, any: true}, nil
	}
	rest, ok := strings.CutPrefix(s, "spiffe://")
	if !ok {
		return Pattern{}, fmt.Errorf("transport: pattern %q: want spiffe://trust-domain[/path]", s)
	}
	tdName, path, hasPath := strings.Cut(rest, "/")
	td, err := spiffeid.TrustDomainFromString(tdName)
	if err != nil {
		return Pattern{}, fmt.Errorf("transport: pattern %q: %w", s, err)
	}
	p := Pattern{raw: s, td: td}
	if !hasPath {
		return p, nil
	}
	p.segments = strings.Split(path, "/")
	for _, seg := range p.segments {
		if seg == "*" {
			continue
		}
		if seg == "" || strings.Contains(seg, "*") {
			return Pattern{}, fmt.Errorf("transport: pattern %q: bad segment %q (use * for a whole segment)", s, seg)
		}
		if _, err := spiffeid.FromSegments(td, seg); err != nil {
			return Pattern{}, fmt.Errorf("transport: pattern %q: %w", s, err)
		}
	}
	return p, nil
}

// MustParsePattern is ParsePattern for patterns known at compile time; it panics on error.
func MustParsePattern(s string) Pattern {
	p, err := ParsePattern(s)
	if err != nil {
		panic(err)
	}
	return p
}

// Match reports whether id matches.
func (p Pattern) Match(id spiffeid.ID) bool {
	if p.any {
		return !id.IsZero()
	}
	if id.IsZero() || id.TrustDomain() != p.td {
		return false
	}
	if p.segments == nil {
		return true
	}
	got := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(got) != len(p.segments) || id.Path() == "" {
		return false
	}
	for i, seg := range p.segments {
		if seg != "*" && seg != got[i] {
			return false
		}
	}
	return true
}

// String returns the pattern as parsed.
func (p Pattern) String() string { return p.raw }
