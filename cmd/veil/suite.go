package main

import (
	"fmt"
	"strings"

	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
)

// suiteFlag is --pq-suite: the pqkex suite a sealing identity is issued for (veil ca issue),
// or the only suite a server accepts and a client uses (veil serve, veil call). Unset: the
// default suite for issuing, no restriction for serving and calling. Names are the suites'
// names or their short forms: x25519mlkem768, x448mlkem1024, sm2mlkem768 (or sm).
type suiteFlag struct{ s pqkex.Scheme }

const pqSuiteUsage = "pqkex suite: x25519mlkem768 (default), x448mlkem1024, or sm2mlkem768 (alias sm: the ShangMi suite SM2/SM3/SM4 with ML-KEM-768, see docs/compliance.md)"

func (f *suiteFlag) String() string {
	if f.s == nil {
		return ""
	}
	return f.s.Name()
}

func (f *suiteFlag) Set(v string) error {
	s := parseSuite(v)
	if s == nil {
		return fmt.Errorf("--pq-suite %q: want x25519mlkem768, x448mlkem1024 or sm2mlkem768 (sm)", v)
	}
	f.s = s
	return nil
}

// parseSuite reads a suite name or short form, or returns nil.
func parseSuite(v string) pqkex.Scheme {
	if s := pqkex.SchemeByName(v); s != nil {
		return s
	}
	switch strings.ToLower(v) {
	case "x25519mlkem768":
		return pqkex.X25519MLKEM768()
	case "x448mlkem1024":
		return pqkex.X448MLKEM1024()
	case "sm2mlkem768", "sm":
		return pqkex.SM2MLKEM768()
	}
	return nil
}

// policy is the pqkex option that restricts sessions to the flag's suite, or none when unset.
func (f suiteFlag) policy() []pqkex.Option {
	if f.s == nil {
		return nil
	}
	return []pqkex.Option{pqkex.RequireSuites(f.s)}
}

// serverPolicy is policy as server options.
func (f suiteFlag) serverPolicy() []pqkex.ServerOption {
	var out []pqkex.ServerOption
	for _, o := range f.policy() {
		out = append(out, o)
	}
	return out
}

// addSM2 gives the CA in dir an SM2 key unless it has one, and returns the CA reloaded.
func addSM2(dir string, ca *pki.CA) (*pki.CA, error) {
	if ca.SM2Signer() != nil {
		return ca, nil
	}
	if err := pki.AddSM2Key(dir); err != nil {
		return nil, err
	}
	return pki.LoadCA(dir)
}

// identitySuite names the suite of the sealing identity in dir.
func identitySuite(dir string) string {
	id, _, err := rpc.LoadSealingIdentity(dir)
	if err != nil {
		return "unknown suite"
	}
	return id.Credential().Suite().Name()
}
