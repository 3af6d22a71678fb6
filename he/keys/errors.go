package keys

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
)

// keyError is every error this package returns. Its text starts with "he: " (the
// layer's prefix, which peers already see on the wire) and never holds key material;
// its code is the Connect code a handler returns for it.
type keyError struct {
	code connect.Code
	msg  string
	key  he.KeyID // set on not_found for evaluation keys
}

func (e *keyError) Error() string { return "he: " + e.msg }

func newErr(code connect.Code, format string, args ...any) error {
	return &keyError{code: code, msg: fmt.Sprintf(format, args...)}
}

func invalidf(format string, args ...any) error {
	return newErr(connect.CodeInvalidArgument, format, args...)
}

func preconditionf(format string, args ...any) error {
	return newErr(connect.CodeFailedPrecondition, format, args...)
}

func permissionf(format string, args ...any) error {
	return newErr(connect.CodePermissionDenied, format, args...)
}

func exhaustedf(format string, args ...any) error {
	return newErr(connect.CodeResourceExhausted, format, args...)
}

func internalf(format string, args ...any) error {
	return newErr(connect.CodeInternal, format, args...)
}

func keysMissing(id he.KeyID, why string) error {
	return &keyError{code: connect.CodeNotFound, key: id,
		msg: fmt.Sprintf("evaluation keys %s %s: upload them again", short(id), why)}
}

func paramMismatch(what string, got, want he.ParamID) error {
	return preconditionf("%s has parameter ID %s, expected %s", what, got, want)
}

// abortedCode marks an upload stream superseded by a newer one.
const abortedCode = connect.CodeAborted

// unavailableCode marks a failing key store: retry later.
const unavailableCode = connect.CodeUnavailable

// kindCodes maps the classes of package he's errors to Connect codes.
var kindCodes = [...]connect.Code{
	he.KindInternal:     connect.CodeInternal,
	he.KindInvalid:      connect.CodeInvalidArgument,
	he.KindPrecondition: connect.CodeFailedPrecondition,
	he.KindCanceled:     connect.CodeCanceled,
	he.KindDeadline:     connect.CodeDeadlineExceeded,
}

func heCode(e *he.Error) connect.Code {
	if k := int(e.Kind()); k < len(kindCodes) {
		return kindCodes[k]
	}
	return connect.CodeInternal
}

// CodeOf returns the Connect code for err: the code of an error from this package or
// package he, connect.CodeOf for other *connect.Error values, and CodeUnknown otherwise.
func CodeOf(err error) connect.Code {
	var ke *keyError
	if errors.As(err, &ke) {
		return ke.code
	}
	var he *he.Error
	if errors.As(err, &he) {
		return heCode(he)
	}
	return connect.CodeOf(err)
}

// ConnectError converts an error of this package or of package he into a
// *connect.Error with the right code (returned as an error, so that nil stays a nil
// interface). Handlers return its result. For missing evaluation keys it attaches a
// veil.he.v1.EvaluationKeysMissing detail naming the key ID, which the Uploader reads
// to upload the keys again.
func ConnectError(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce
	}
	var (
		ke   *keyError
		heEr *he.Error
	)
	switch {
	case errors.As(err, &ke):
		out := connect.NewError(ke.code, ke)
		if ke.key != "" {
			if d, derr := connect.NewErrorDetail(&hev1.EvaluationKeysMissing{KeyId: string(ke.key)}); derr == nil {
				out.AddDetail(d)
			}
		}
		return out
	case errors.As(err, &heEr):
		return connect.NewError(heCode(heEr), heEr)
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, errors.New("he: canceled"))
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, errors.New("he: deadline exceeded"))
	default:
		// Foreign errors may carry internal state: the peer gets a fixed text.
		return connect.NewError(connect.CodeInternal, errors.New("he: internal error"))
	}
}

// IsKeysMissing reports whether err says that the server no longer holds (or never
// held) the evaluation keys it names, and returns that key ID. It recognises both
// errors from this package and *connect.Error values received from a server.
func IsKeysMissing(err error) (he.KeyID, bool) {
	var ke *keyError
	if errors.As(err, &ke) && ke.key != "" {
		return ke.key, true
	}
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Code() == connect.CodeNotFound {
		for _, d := range ce.Details() {
			v, err := d.Value()
			if err != nil {
				continue
			}
			if m, ok := v.(*hev1.EvaluationKeysMissing); ok && validKeyID(m.GetKeyId()) {
				return he.KeyID(m.GetKeyId()), true
			}
		}
	}
	return "", false
}
