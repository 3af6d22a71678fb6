package he

import "errors"

// kindNone is what kindOf returns for an error that is not this package's.
const kindNone Kind = 255

// kindOf returns the Kind of an error of this package, and kindNone for any other.
func kindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.kind
	}
	return kindNone
}
