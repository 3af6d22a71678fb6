package he

import (
	"fmt"
)

// Kind classifies the errors of this package, so that a caller maps them to its own
// codes in one place: package he/keys maps each Kind to a Connect code (keys.ConnectError,
// keys.CodeOf), as the gRPC and Connect code of the same name.
type Kind uint8

const (
	// KindInternal is a failure inside the package or lattigo (a recovered panic): internal.
	// It is the zero value, so an unclassified error maps to internal, never to a code
	// that blames or reassures the caller.
	KindInternal Kind = iota
	// KindInvalid is malformed input: invalid_argument.
	KindInvalid
	// KindPrecondition is well-formed input that does not fit the parameters, keys or
	// levels at hand: failed_precondition.
	KindPrecondition
	// KindCanceled is a call canceled while it waited for an evaluator: canceled.
	KindCanceled
	// KindDeadline is a deadline that passed while a call waited: deadline_exceeded.
	KindDeadline
)

// Error is every error this package returns. Its text starts with "he: " and never
// holds key material.
type Error struct {
	kind Kind
	msg  string
}

func (e *Error) Error() string { return "he: " + e.msg }

// Kind returns the error's class.
func (e *Error) Kind() Kind { return e.kind }

func newErr(kind Kind, format string, args ...any) error {
	return &Error{kind: kind, msg: fmt.Sprintf(format, args...)}
}

func invalidf(format string, args ...any) error {
	return newErr(KindInvalid, format, args...)
}

func preconditionf(format string, args ...any) error {
	return newErr(KindPrecondition, format, args...)
}

func internalf(format string, args ...any) error {
	return newErr(KindInternal, format, args...)
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
