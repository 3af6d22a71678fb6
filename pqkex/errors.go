package pqkex

import (
	"context"
	"errors"
	"io"
	"net/http"
	"time"

	"connectrpc.com/connect"
)

// reason is the short, stable token that names a rejection on the wire (the
// Veil-Pqkex-Error header) and in metrics. Spec section 9.
type reason string

const (
	reasonNoSession     reason = "no_session"
	reasonMalformed     reason = "malformed"
	reasonTampered      reason = "tampered"
	reasonTruncated     reason = "truncated"
	reasonReplayed      reason = "replayed"
	reasonUnknownTicket reason = "unknown_ticket"
	reasonTicketExpired reason = "ticket_expired"
	reasonUnknownSess   reason = "unknown_session"
	reasonCredential    reason = "credential"
	reasonServerKey     reason = "server_key"
	reasonTLSNotPQ      reason = "tls_not_pq"
	reasonUnsupported   reason = "unsupported"
	reasonVersion       reason = "version"
	reasonInternal      reason = "internal"
	reasonReplayStore   reason = "replay_store"
	reasonStaleAttempt  reason = "stale_attempt"
)

// reasonCodes is the one place where pqkex maps its failures to Connect codes.
var reasonCodes = map[reason]connect.Code{
	reasonNoSession:     connect.CodeUnauthenticated,
	reasonMalformed:     connect.CodeInvalidArgument,
	reasonTampered:      connect.CodeDataLoss,
	reasonTruncated:     connect.CodeDataLoss, // tampering, like every integrity failure (spec 9)
	reasonReplayed:      connect.CodeAlreadyExists,
	reasonUnknownTicket: connect.CodeFailedPrecondition,
	reasonTicketExpired: connect.CodeDeadlineExceeded,
	reasonUnknownSess:   connect.CodeFailedPrecondition,
	reasonCredential:    connect.CodePermissionDenied,
	reasonServerKey:     connect.CodeFailedPrecondition,
	reasonTLSNotPQ:      connect.CodeFailedPrecondition, // the client retries without flagTLSEphemeral
	reasonUnsupported:   connect.CodeUnimplemented,
	reasonVersion:       connect.CodeUnimplemented,
	reasonInternal:      connect.CodeInternal,
	reasonReplayStore:   connect.CodeUnavailable, // the shared replay store did not answer: retry later
	reasonStaleAttempt:  connect.CodeFailedPrecondition,
}

// Error is a pqkex failure. Its text never contains key material or internal state.
type reasonError struct {
	reason reason
	text   string
	code   connect.Code // when not 0, the code instead of the reason's (a client's view of a refusal, spec 9)
}

func (e *reasonError) Error() string { return "pqkex: " + e.text }

func newError(r reason, text string) *reasonError { return &reasonError{reason: r, text: text} }

// Sentinels. They are immutable; toConnect wraps them in a fresh *connect.Error each time.
var (
	errNoSession       = newError(reasonNoSession, "no post-quantum session")
	errUnsealed        = newError(reasonTampered, "tampered: unsealed response to a sealed call")
	errMalformed       = newError(reasonMalformed, "malformed message")
	errCompressed      = newError(reasonMalformed, "compressed payloads are refused")
	errMethod          = newError(reasonMalformed, "only requests with a body can be sealed")
	errTampered        = newError(reasonTampered, "message failed authentication")
	errTruncated       = newError(reasonTruncated, "body truncated before its final frame")
	errReplayed        = newError(reasonReplayed, "replayed call")
	errAttemptStale    = newError(reasonStaleAttempt, "call attempt outside pqkex.AttemptWindow of the server's clock (a held-back call, or clocks apart)")
	errUnknownTicket   = newError(reasonUnknownTicket, "ticket not issued by this service")
	errTicketExpired   = newError(reasonTicketExpired, "ticket expired")
	errUnknownSession  = newError(reasonUnknownSess, "session not held by this server: send the ticket")
	errCredential      = newError(reasonCredential, "peer credential rejected")
	errCredentialTime  = newError(reasonCredential, "peer credential outside its validity")
	errIdentity        = newError(reasonCredential, "peer identity not authorized")
	errChannelBinding  = newError(reasonCredential, "channel binding failed")
	errServerConfirm   = newError(reasonCredential, "server failed to prove its identity")
	errServerKey       = newError(reasonServerKey, "server credential unknown to this server")
	errReplayStore     = newError(reasonReplayStore, "the shared replay store did not answer")
	errTLSNotPQ        = newError(reasonTLSNotPQ, "TLS connection without a post-quantum key exchange: send a pqkex ephemeral")
	errTLSNotPQHere    = newError(reasonCredential, "server accepted the TLS ephemeral, but this TLS connection is not post-quantum")
	errUnsupported     = newError(reasonUnsupported, "unsupported suite or AEAD")
	errServerVersion   = &reasonError{reason: reasonVersion, code: connect.CodeUnavailable, text: "server answered in another wire version (unauthenticated)"}
	errInternal        = newError(reasonInternal, "internal error")
	errFrameLength     = newError(reasonTampered, "tampered: frame length out of range") // unauthenticated, like seq (spec 6.2)
	errFieldsTooLarge  = newError(reasonMalformed, "headers or trailers exceed one frame (64 KiB)")
	errClearMismatch   = newError(reasonTampered, "tampered: a clear status, method, path or Content-Type differs from the sealed one")
	errSequenceWrapped = newError(reasonInternal, "frame sequence exhausted")
)

// asReason finds a pqkex error in err's chain, as errors.As would, without allocating
// (this runs for every body read).
func asReason(err error) *reasonError {
	for err != nil {
		switch x := err.(type) {
		case *reasonError:
			return x
		case interface{ As(any) bool }:
			var re *reasonError
			if errors.As(err, &re) {
				return re
			}
			return nil
		case interface{ Unwrap() error }:
			err = x.Unwrap()
		case interface{ Unwrap() []error }:
			for _, e := range x.Unwrap() {
				if re := asReason(e); re != nil {
					return re
				}
			}
			return nil
		default:
			return nil
		}
	}
	return nil
}

// reasonOf returns the reason of a pqkex error, or reasonInternal.
func reasonOf(err error) reason {
	if re := asReason(err); re != nil {
		return re.reason
	}
	return reasonInternal
}

// isRejection reports whether err is one of pqkex's own rejections.
func isRejection(err error) bool {
	if err == nil || err == io.EOF {
		return false
	}
	return asReason(err) != nil
}

// toConnect turns any error into a *connect.Error with pqkex's code for it.
func toConnect(err error) *connect.Error {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce
	}
	if re := asReason(err); re != nil {
		code := reasonCodes[re.reason]
		if re.code != 0 {
			code = re.code
		}
		return connect.NewError(code, re)
	}
	return connect.NewError(connect.CodeInternal, errInternal)
}

// cutShort is the client's view of a transport failure (a reset stream, a closed
// connection) while it reads a sealed response, before its FINAL frame: a dropped call,
// unavailable (spec 6.2, 9), as a replica that dies mid-stream causes. The failure is
// unauthenticated; a proxy resetting the stream chooses its HTTP/2 code, which connect-go
// would map to resource_exhausted, permission_denied or internal, so that code never
// reaches the caller. The caller's own cancellation or deadline keeps its code. (A body
// that ends cleanly before FINAL is truncated, data_loss: the opener reports it.)
func cutShort(ctx context.Context, err error) error {
	if err == nil || err == io.EOF || isRejection(err) || callerEnded(ctx) {
		return err
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	return connect.NewError(connect.CodeUnavailable, errors.New("pqkex: the response was cut short before its final frame by a transport failure (unauthenticated): "+err.Error()))
}

// intermediaryFailure is the client's view of a transport failure before any response to
// a sealed call or handshake: the call was dropped (unavailable), whatever HTTP/2 code a
// proxy reset the stream with.
func intermediaryFailure(ctx context.Context, err error) error {
	var ce *connect.Error
	if callerEnded(ctx) || errors.As(err, &ce) {
		return err
	}
	return connect.NewError(connect.CodeUnavailable, err)
}

// callerEnded reports whether the caller canceled ctx or its deadline passed.
func callerEnded(ctx context.Context) bool {
	if ctx == nil {
		return true
	}
	if ctx.Err() != nil {
		return true
	}
	dl, ok := ctx.Deadline()
	return ok && !time.Now().Before(dl)
}

// handshakeRefusal rebuilds the error a server announced in the Veil-Pqkex-Error header of a
// handshake (or credential) response; versions is its Veil-Pqkex-Version header. The refusal
// is unauthenticated and says so (spec 9).
//
// The refusal is unauthenticated, so a proxy can forge any token: whatever it names, the
// caller sees unavailable (a handshake that did not complete, as a failed TLS handshake
// is), never the code the reason maps to on the server; the reason stays in the message
// and the client's metrics for diagnosis.
func handshakeRefusal(token, versions string) *reasonError {
	r := reason(token)
	if _, ok := reasonCodes[r]; !ok {
		r = reasonInternal
	}
	text := "handshake refused by the server (unauthenticated): " + string(r)
	switch {
	case r == reasonVersion:
		text = "handshake refused by the server (unauthenticated): it speaks wire version " + shownVersions(versions) + ", this client " + wireVersionName
	case r == reasonUnsupported && versions == "":
		// A version-1 server predates the version header and refuses version 2 as unsupported (spec 5.5).
		r, text = reasonVersion, "handshake refused by the server (unauthenticated): it predates wire version "+wireVersionName+" (speaks version 1 only)"
	}
	return &reasonError{reason: r, code: connect.CodeUnavailable, text: text}
}

// callRefusal is the client's view of a Veil-Pqkex-Error on a sealed call (spec 9): a
// session refusal is unavailable, anything else is tampering. It never carries the code the
// reason maps to on the server, which a proxy could otherwise choose.
func callRefusal(token string) *reasonError {
	if sessionRefusal(token) {
		return &reasonError{reason: reason(token), code: connect.CodeUnavailable,
			text: "session refused by the server (unauthenticated refusal: " + token + ")"}
	}
	if reason(token) == reasonReplayStore {
		// The server could not consult its shared replay store: the call did not run. A
		// proxy that forges this only makes the call fail, as dropping it would.
		return &reasonError{reason: reasonReplayStore, code: connect.CodeUnavailable,
			text: "the server could not check the call against its replay store (unauthenticated refusal: " + token + ")"}
	}
	if len(token) > 32 || !validFieldName(http.CanonicalHeaderKey(token)) {
		token = "?"
	}
	return newError(reasonTampered, "tampered: the server refused the call (unauthenticated refusal: "+token+")")
}

// sessionRefusal reports whether token names a refusal of the call's session, the only
// kind of clear refusal a client acts on (spec 9).
func sessionRefusal(token string) bool {
	switch reason(token) {
	case reasonUnknownTicket, reasonTicketExpired, reasonUnknownSess, reasonSuitePolicy:
		// suite_policy: a replica whose RequireSuites does not allow the session's suite
		// (spec 3.1); a new handshake meets that policy, or fails it.
		return true
	}
	return false
}

// Header names (spec section 6.1).
const (
	headerTicket      = "Veil-Pqkex-Ticket"
	headerSession     = "Veil-Pqkex-Session"      // the short form (spec 6.6)
	headerSessionHeld = "Veil-Pqkex-Session-Held" // the server keeps the session for the short form
	headerSealed      = "Veil-Pqkex-Sealed"
	headerError       = "Veil-Pqkex-Error"
	headerVersion     = "Veil-Pqkex-Version" // the wire versions a server speaks (spec 5.5)
)

// headerValue is h.Get for a key already in canonical form, as all of pqkex's header names
// are: Get canonicalizes (validates and maybe copies) its key on every call.
func headerValue(h http.Header, canonical string) string {
	if v := h[canonical]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// writeError writes err in the request's protocol (Connect, gRPC or gRPC-Web) and names the
// reason in the Veil-Pqkex-Error header.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	w.Header().Set(headerError, string(reasonOf(err)))
	_ = connect.NewErrorWriter().Write(w, r, toConnect(err))
}
