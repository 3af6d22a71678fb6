package pqkex_test

import (
	"flag"
	"os"
	"testing"

	"github.com/veilrpc/veil/pqkex"
)

// suiteFlag picks the suite of the tests that are not about one suite's specifics (session
// setup, calls, streams, attacks, tickets, replicas, rekeys, proxies): the default suite, or
// with -suite (or PQKEX_TEST_SUITE) another, so that one table of tests covers every suite.
// `make unit` runs the package once more with the ShangMi suite.
var suiteFlag = flag.String("suite", os.Getenv("PQKEX_TEST_SUITE"), "suite name for the suite-generic tests (default X25519MLKEM768-SHA256)")

// testSuite is the suite under test (see suiteFlag).
func testSuite(t testing.TB) pqkex.Scheme {
	t.Helper()
	if *suiteFlag == "" {
		return pqkex.X25519MLKEM768()
	}
	s := pqkex.SchemeByName(*suiteFlag)
	if s == nil {
		t.Fatalf("-suite %q: no such suite", *suiteFlag)
	}
	return s
}
