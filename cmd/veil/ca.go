package main

import (
	"context"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

func runCA(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	sub := map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"init":         runCAInit,
		"issue":        runCAIssue,
		"serve":        runCAServe,
		"token":        runCAToken,
		"rotate":       runCARotate,
		"revoke":       runCARevoke,
		"intermediate": runCAIntermediate,
		"bundle":       runCABundle,
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprintln(stderr, `Usage: veil ca <init|issue|serve|token|rotate|revoke|intermediate|bundle> [flags]

  init    create a root CA (ECDSA P-256 + ML-DSA-65) in a directory
  issue   issue a workload identity (tls.crt, tls.key, ca.crt; pq.cred, pq.key, ca-mldsa65.pub)
  serve   run the online CA: join with a token, renew with the current certificate
  token   print a single-use join token for a SPIFFE ID (or pattern)
  rotate  rotate the root: --step prepare, activate, finish (or status)
  revoke  deny certificate serials or SPIFFE IDs (sent to workloads with the bundle)
  intermediate  create an intermediate CA that signs leaves from now on
  bundle  print the trust bundle (every trusted root, PEM) for workloads' --ca-bundle

See docs/ca.md.`)
		if len(args) == 0 {
			return fmt.Errorf("%w: veil ca needs a subcommand", errUsage)
		}
		return nil
	}
	f, ok := sub[args[0]]
	if !ok {
		return fmt.Errorf("%w: unknown subcommand 'veil ca %s'", errUsage, args[0])
	}
	return f(ctx, args[1:], stdout, stderr)
}

func runCAInit(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca init", "ca init --dir DIR --trust-domain TD [--sm2] [--if-missing] [--json]", stderr)
	dir := fs.String("dir", "", "directory for the CA's files (keys are written 0600)")
	td := fs.String("trust-domain", "", "SPIFFE trust domain, e.g. example.org")
	withSM2 := fs.Bool("sm2", false, "also give the CA an SM2 key (root-sm2.key, 0600) that signs ShangMi sealing credentials (--pq-suite sm2mlkem768; docs/compliance.md); adds one to an existing CA with --if-missing")
	ifMissing := fs.Bool("if-missing", false, "succeed without change when dir already holds a CA for this trust domain (for init containers)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "dir", "trust-domain"); err != nil {
		return err
	}
	created := true
	ca, err := pki.InitCA(*dir, *td)
	if err != nil && *ifMissing {
		existing, lerr := pki.LoadCA(*dir)
		if lerr != nil {
			return err // not a CA: the init error says why
		}
		if existing.TrustDomain().Name() != *td {
			return fmt.Errorf("%s holds a CA for %s, not %s", *dir, existing.TrustDomain().Name(), *td)
		}
		ca, err, created = existing, nil, false
	}
	if err != nil {
		return err
	}
	if *withSM2 {
		if ca, err = addSM2(*dir, ca); err != nil {
			return err
		}
	}
	out := map[string]any{
		"sm2":          ca.SM2Signer() != nil,
		"dir":          *dir,
		"trust_domain": ca.TrustDomain().String(),
		"root":         filepath.Join(*dir, "root.crt"),
		"not_after":    ca.Root().NotAfter.UTC().Format(time.RFC3339),
		"created":      created,
	}
	return emit(stdout, *asJSON, out, func(w io.Writer) {
		verb := "created"
		if !created {
			verb = "kept the existing"
		}
		fmt.Fprintf(w, "%s CA for %s in %s (root valid until %s)\n", verb, ca.TrustDomain(), *dir, ca.Root().NotAfter.UTC().Format(time.RFC3339))
	})
}

// runCABundle prints the CA's trust bundle: what workloads pass as --ca-bundle.
func runCABundle(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca bundle", "ca bundle --dir DIR [--json]", stderr)
	dir := fs.String("dir", "", "the CA's directory")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "dir"); err != nil {
		return err
	}
	ca, err := pki.LoadCA(*dir)
	if err != nil {
		return err
	}
	var b strings.Builder
	for _, c := range ca.Bundle() {
		b.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	out := map[string]any{"trust_domain": ca.TrustDomain().String(), "roots": len(ca.Bundle()), "bundle": b.String()}
	return emit(stdout, *asJSON, out, func(w io.Writer) { _, _ = io.WriteString(w, b.String()) })
}

func runCAIssue(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca issue", "ca issue --dir DIR --id SPIFFE_ID --out OUTDIR [--ttl 24h] [--dns NAME] [--ip ADDR] [--pq-suite SUITE] [--json]", stderr)
	var suite suiteFlag
	fs.Var(&suite, "pq-suite", pqSuiteUsage+"; sm2mlkem768 needs a CA made with --sm2")
	dir := fs.String("dir", "", "the CA's directory")
	id := fs.String("id", "", "SPIFFE ID of the workload, e.g. spiffe://example.org/echo")
	out := fs.String("out", "", "directory for tls.crt, tls.key (0600) and ca.crt")
	ttl := fs.Duration("ttl", pki.DefaultLeafTTL, "certificate lifetime")
	var dns, ips stringList
	fs.Var(&dns, "dns", "DNS name to add as a SAN (for clients that check host names, like curl); repeatable")
	fs.Var(&ips, "ip", "IP address to add as a SAN; repeatable")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "dir", "id", "out"); err != nil {
		return err
	}
	sid, err := spiffeid.FromString(*id)
	if err != nil {
		return fmt.Errorf("%w: --id: %v", errUsage, err)
	}
	ca, err := pki.LoadCA(*dir)
	if err != nil {
		return err
	}
	leafOpts := []pki.LeafOption{pki.WithDNSNames(dns...)}
	for _, s := range ips {
		ip := net.ParseIP(s)
		if ip == nil {
			return fmt.Errorf("%w: --ip %q is not an IP address", errUsage, s)
		}
		leafOpts = append(leafOpts, pki.WithIPAddresses(ip))
	}
	if err := ca.IssueFiles(sid, *out, *ttl, leafOpts...); err != nil {
		return err
	}
	// The sealing identity (pqkex): a static hybrid KEM key certified by the CA's
	// ML-DSA-65 and classical keys, valid as long as the certificate.
	if err := rpc.IssueSealingIdentity(ca, sid, *out, *ttl, suite.s); err != nil {
		return err
	}
	src, err := transport.LoadFiles(*out)
	if err != nil {
		return err
	}
	svid, _ := src.GetX509SVID()
	leaf := svid.Certificates[0]
	res := map[string]any{
		"id":        sid.String(),
		"out":       *out,
		"serial":    leaf.SerialNumber.Text(16),
		"not_after": leaf.NotAfter.UTC().Format(time.RFC3339),
	}
	return emit(stdout, *asJSON, res, func(w io.Writer) {
		fmt.Fprintf(w, "issued %s into %s (valid until %s)\n", sid, *out, leaf.NotAfter.UTC().Format(time.RFC3339))
	})
}
