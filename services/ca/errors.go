package ca

import (
	"errors"
	"fmt"

	"connectrpc.com/connect"
)

// Reasons a request is refused, as counted in veil_ca_requests_total{result}.
const (
	reasonTokenUnknown   = "token_unknown"
	reasonTokenReplayed  = "token_replayed"
	reasonTokenExpired   = "token_expired"
	reasonEscalation     = "escalation"
	reasonBadCSR         = "bad_csr"
	reasonBadSignature   = "bad_signature"
	reasonWeakKey        = "weak_key"
	reasonExtraSANs      = "extra_sans"
	reasonWrongID        = "wrong_id"
	reasonBadTTL         = "bad_ttl"
	reasonBadPQKey       = "bad_pq_key"
	reasonRateLimited    = "rate_limited"
	reasonRevoked        = "revoked"
	reasonExpiredCert    = "expired_certificate"
	reasonUnauthenticate = "unauthenticated"
	reasonInternal       = "internal"
)

// codes maps each refusal reason to its Connect code, in one place.
var codes = map[string]connect.Code{
	reasonTokenUnknown:   connect.CodeUnauthenticated,
	reasonTokenReplayed:  connect.CodeUnauthenticated,
	reasonTokenExpired:   connect.CodeUnauthenticated,
	reasonEscalation:     connect.CodePermissionDenied,
	reasonBadCSR:         connect.CodeInvalidArgument,
	reasonBadSignature:   connect.CodeInvalidArgument,
	reasonWeakKey:        connect.CodeInvalidArgument,
	reasonExtraSANs:      connect.CodeInvalidArgument,
	reasonWrongID:        connect.CodeInvalidArgument,
	reasonBadTTL:         connect.CodeInvalidArgument,
	reasonBadPQKey:       connect.CodeInvalidArgument,
	reasonRateLimited:    connect.CodeResourceExhausted,
	reasonRevoked:        connect.CodePermissionDenied,
	reasonExpiredCert:    connect.CodeUnauthenticated,
	reasonUnauthenticate: connect.CodeUnauthenticated,
	reasonInternal:       connect.CodeInternal,
}

// refusal is a refused request: its reason (a metric label) and the message for the caller.
type refusal struct {
	reason string
	err    error
}

func refuse(reason, format string, args ...any) *refusal {
	return &refusal{reason: reason, err: fmt.Errorf(format, args...)}
}

func (r *refusal) connectError() *connect.Error {
	code, ok := codes[r.reason]
	if !ok {
		code = connect.CodeInternal
	}
	ce := connect.NewError(code, r.err)
	ce.Meta().Set("veil-ca-reason", r.reason)
	return ce
}

// Reason returns the refusal reason the CA attached to err ("token_replayed",
// "escalation", ...), or "" if there is none.
func Reason(err error) string {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Meta().Get("veil-ca-reason")
	}
	return ""
}
