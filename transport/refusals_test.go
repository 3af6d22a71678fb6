package transport

import (
	"testing"

	"github.com/veilrpc/veil/internal/refusals"
)

// TestRefusalReasons: docs/refusals.md lists every reason this package can emit, and
// only those.
func TestRefusalReasons(t *testing.T) {
	refusals.Check(t, "transport", "Reason", "")
}
