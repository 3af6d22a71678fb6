package he

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"
)

// heError is every error this package returns. Its text starts with "he: " and never
// holds key material; its code is the Connect code a handler returns for it.
type heError struct {
	code connect.Code
	msg  string
	key  KeyID // set on not_found for evaluation keys
}

func (e *heError) Error() string { return "he: " + e.msg }

func newErr(code connect.Code, format string, args ...any) error {
	return &heError{code: code, msg: fmt.Sprintf(format, args...)}
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

func keysMissing(id KeyID, why string) error {
	return &heError{code: connect.CodeNotFound, key: id,
		msg: fmt.Sprintf("evaluation keys %s %s: upload them again", id.short(), why)}
}

func paramMismatch(what string, got, want ParamID) error {
	return preconditionf("%s has parameter ID %s, expected %s", what, got, want)
}

func levelsf(op string, need, have int) error {
	return preconditionf("%s needs %d levels, ciphertext has %d", op, need, have)
}

// recoverInto turns a panic inside lattigo into an internal error, so that no
// library panic reaches a handler. Use as: defer recoverInto(&err, "op").
func recoverInto(err *error, op string) {
	if r := recover(); r != nil {
		*err = internalf("%s failed", op)
	}
}

// CodeOf returns the Connect code for err: the code of an error from this package,
// connect.CodeOf for other *connect.Error values, and CodeUnknown otherwise.
func CodeOf(err error) connect.Code {
	var he *heError
	if errors.As(err, &he) {
		return he.code
	}
	return connect.CodeOf(err)
}

// ConnectError converts err into a *connect.Error with the right code (returned as an
// error, so that nil stays a nil interface). Handlers return its result. For missing evaluation keys it attaches a
// veil.he.v1.EvaluationKeysMissing detail naming the key ID, which the client library
// reads to re-upload the keys.
func ConnectError(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce
	}
	var he *heError
	switch {
	case errors.As(err, &he):
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, errors.New("he: canceled"))
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, errors.New("he: deadline exceeded"))
	default:
		// Foreign errors may carry internal state: the peer gets a fixed text.
		return connect.NewError(connect.CodeInternal, errors.New("he: internal error"))
	}
	out := connect.NewError(he.code, he)
	if he.key != "" {
		addMissingDetail(out, he.key)
	}
	return out
}

// IsKeysMissing reports whether err says that the server no longer holds (or never
// held) the evaluation keys it names, and returns that key ID. It recognises both
// errors from this package and *connect.Error values received from a server.
func IsKeysMissing(err error) (KeyID, bool) {
	var he *heError
	if errors.As(err, &he) && he.key != "" {
		return he.key, true
	}
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Code() == connect.CodeNotFound {
		return missingDetail(ce)
	}
	return "", false
}

// abortedCode marks an upload stream superseded by a newer one.
const abortedCode = connect.CodeAborted

// unavailableCode marks a failing key store: retry later.
const unavailableCode = connect.CodeUnavailable
