package rpc

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/transport"
)

// Policy says which callers may call which procedures. It denies by default: a
// procedure with no matching rule is refused with permission_denied. The zero Policy,
// a nil *Policy and a server without WithPolicy deny every application procedure.
//
// A rule's procedure is an exact procedure ("/veil.echo.v1.EchoService/Echo"), every
// procedure of a service ("/veil.echo.v1.EchoService/*"), or every procedure ("*").
// Its patterns are transport.Pattern strings: an exact SPIFFE ID, a trust domain, or a
// path with "*" segments.
type Policy struct {
	rules []rule
}

type rule struct {
	procedure string
	patterns  []transport.Pattern
}

// NewPolicy returns a policy that denies everything.
func NewPolicy() *Policy { return &Policy{} }

// Allow lets callers matching any of patterns call procedure.
func (p *Policy) Allow(procedure string, patterns ...string) error {
	if procedure != "*" && (!strings.HasPrefix(procedure, "/") || strings.Count(procedure, "/") != 2) {
		return fmt.Errorf("rpc: policy: procedure %q: want /package.Service/Method, /package.Service/* or *", procedure)
	}
	if len(patterns) == 0 {
		return fmt.Errorf("rpc: policy: procedure %q: no caller patterns", procedure)
	}
	r := rule{procedure: procedure}
	for _, s := range patterns {
		pat, err := transport.ParsePattern(s)
		if err != nil {
			return fmt.Errorf("rpc: policy: %w", err)
		}
		r.patterns = append(r.patterns, pat)
	}
	p.rules = append(p.rules, r)
	return nil
}

// MustAllow is Allow for rules known at compile time; it panics on a malformed rule.
func (p *Policy) MustAllow(procedure string, patterns ...string) *Policy {
	if err := p.Allow(procedure, patterns...); err != nil {
		panic(err)
	}
	return p
}

// Authorize returns nil if id may call procedure, and a permission_denied error that
// names both otherwise.
func (p *Policy) Authorize(procedure string, id spiffeid.ID) error {
	if p != nil {
		for _, r := range p.rules {
			if !r.covers(procedure) {
				continue
			}
			for _, pat := range r.patterns {
				if pat.Match(id) {
					return nil
				}
			}
		}
	}
	return connect.NewError(connect.CodePermissionDenied,
		fmt.Errorf("rpc: %s may not call %s", idString(id), procedure))
}

func (r rule) covers(procedure string) bool {
	switch {
	case r.procedure == "*":
		return true
	case strings.HasSuffix(r.procedure, "/*"):
		return strings.HasPrefix(procedure, strings.TrimSuffix(r.procedure, "*"))
	}
	return r.procedure == procedure
}

func idString(id spiffeid.ID) string {
	if id.IsZero() {
		return "an unidentified caller"
	}
	return id.String()
}

// authzInterceptor enforces the policy before any handler runs.
type authzInterceptor struct {
	policy    *Policy
	public    map[string]bool // procedures any verified peer may call (health, reflection)
	bootstrap map[string]bool // procedures that authenticate their callers themselves
}

// interceptor enforces the policy before every handler.
func (a *authzInterceptor) interceptor() connect.Interceptor {
	return serverCheck(func(ctx context.Context, procedure string, _ http.Header) error { return a.check(ctx, procedure) })
}

func (a *authzInterceptor) check(ctx context.Context, procedure string) error {
	if a.bootstrap[procedure] {
		return nil
	}
	p, ok := PeerFromContext(ctx)
	if !ok {
		return connect.NewError(connect.CodeUnauthenticated, errors.New("rpc: no verified peer"))
	}
	if a.public[procedure] {
		return nil
	}
	return a.policy.Authorize(procedure, p.ID)
}

// serverCheck is a server-side interceptor that runs a check before every handler,
// unary or streaming, and refuses the call with the check's error. Client calls pass.
type serverCheck func(ctx context.Context, procedure string, header http.Header) error

func (f serverCheck) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if req.Spec().IsClient {
			return next(ctx, req)
		}
		if err := f(ctx, req.Spec().Procedure, req.Header()); err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

func (f serverCheck) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (f serverCheck) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		if err := f(ctx, conn.Spec().Procedure, conn.RequestHeader()); err != nil {
			return err
		}
		return next(ctx, conn)
	}
}
