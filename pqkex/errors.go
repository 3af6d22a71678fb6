package pqkex

import (
	"errors"
	"io"
	"net/http"

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
	reasonReordered     reason = "reordered"
	reasonReplayed      reason = "replayed"
	reasonUnknownTicket reason = "unknown_ticket"
	reasonTicketExpired reason = "ticket_expired"
	reasonUnknownSess   reason = "unknown_session"
	reasonCredential    reason = "credential"
	reasonServerKey     reason = "server_key"
	reasonTLSNotPQ      reason = "tls_not_pq"
	reasonUnsupported   reason = "unsupported"
	reasonInternal      reason = "internal"
	reasonReplayStore   reason = "replay_store"
)

// reasonCodes is the one place where pqkex maps its failures to Connect codes.
var reasonCodes = map[reason]connect.Code{
	reasonNoSession:     connect.CodeUnauthenticated,
	reasonMalformed:     connect.CodeInvalidArgument,
	reasonTampered:      connect.CodeDataLoss,
	reasonTruncated:     connect.CodeOutOfRange,
	reasonReordered:     connect.CodeAborted,
	reasonReplayed:      connect.CodeAlreadyExists,
	reasonUnknownTicket: connect.CodeFailedPrecondition,
	reasonTicketExpired: connect.CodeDeadlineExceeded,
	reasonUnknownSess:   connect.CodeFailedPrecondition,
	reasonCredential:    connect.CodePermissionDenied,
	reasonServerKey:     connect.CodeFailedPrecondition,
	reasonTLSNotPQ:      connect.CodeFailedPrecondition, // the client retries without flagTLSEphemeral
	reasonUnsupported:   connect.CodeUnimplemented,
	reasonInternal:      connect.CodeInternal,
	reasonReplayStore:   connect.CodeUnavailable, // the shared replay store did not answer: retry later
}

// Error is a pqkex failure. Its text never contains key material or internal state.
type reasonError struct {
	reason reason
	text   string
}

func (e *reasonError) Error() string { return "pqkex: " + e.text }

func newError(r reason, text string) *reasonError { return &reasonError{reason: r, text: text} }

// Sentinels. They are immutable; toConnect wraps them in a fresh *connect.Error each time.
var (
	errNoSession       = newError(reasonNoSession, "no post-quantum session")
	errUnsealed        = newError(reasonNoSession, "unsealed response to a sealed call")
	errMalformed       = newError(reasonMalformed, "malformed message")
	errCompressed      = newError(reasonMalformed, "compressed payloads are refused")
	errMethod          = newError(reasonMalformed, "only requests with a body can be sealed")
	errTampered        = newError(reasonTampered, "message failed authentication")
	errTruncated       = newError(reasonTruncated, "body truncated before its final frame")
	errReordered       = newError(reasonReordered, "frame out of order")
	errReplayed        = newError(reasonReplayed, "replayed call or frame")
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
	errUnsupported     = newError(reasonUnsupported, "unsupported version, suite or AEAD")
	errInternal        = newError(reasonInternal, "internal error")
	errFrameTooLarge   = newError(reasonMalformed, "frame too large")
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
		return connect.NewError(reasonCodes[re.reason], re)
	}
	return connect.NewError(connect.CodeInternal, errInternal)
}

// errorFromReason rebuilds the error a server announced in the Veil-Pqkex-Error header.
func errorFromReason(token string) *connect.Error {
	r := reason(token)
	code, ok := reasonCodes[r]
	if !ok {
		r, code = reasonInternal, connect.CodeInternal
	}
	return connect.NewError(code, newError(r, "rejected by server: "+string(r)))
}

// Header names (spec section 6.1).
const (
	headerTicket       = "Veil-Pqkex-Ticket"
	headerSession      = "Veil-Pqkex-Session"      // the short form (spec 6.6)
	headerSessionHeld  = "Veil-Pqkex-Session-Held" // the server keeps the session for the short form
	headerSealed       = "Veil-Pqkex-Sealed"
	headerTrailersOnly = "Veil-Pqkex-Trailers-Only"
	headerError        = "Veil-Pqkex-Error"
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
