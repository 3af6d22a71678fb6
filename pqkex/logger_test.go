package pqkex_test

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/veilrpc/veil/pqkex"
)

// TestWithLogger: the warning of an insecure client goes to the logger WithLogger sets.
func TestWithLogger(t *testing.T) {
	e := newEnv(t, testSuite(t))
	var buf bytes.Buffer
	if _, err := pqkex.NewClient(pqkex.WithIdentity(e.client), pqkex.WithRoots(e.ca.Roots()), pqkex.InsecureAcceptAnyServer(),
		pqkex.WithLogger(slog.New(slog.NewTextHandler(&buf, nil)))); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "InsecureAcceptAnyServer") {
		t.Fatalf("logged %q, want the InsecureAcceptAnyServer warning", buf.String())
	}
}
