package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/ca"
	"github.com/veilrpc/veil/transport"
)

func runCAServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca serve", "ca serve --dir DIR --listen ADDR [--max-ttl 24h] [--default-ttl D] [--rate N --burst N] [--dns NAME] [--ip ADDR] [--metrics ADDR]", stderr)
	dir := fs.String("dir", "", "the CA's directory (from 'veil ca init')")
	listen := fs.String("listen", "127.0.0.1:8440", "address to serve the CA on")
	maxTTL := fs.Duration("max-ttl", ca.DefaultMaxTTL, "longest certificate lifetime the CA issues")
	defTTL := fs.Duration("default-ttl", 0, "lifetime of requests that ask for none (default: --max-ttl)")
	rate := fs.Float64("rate", 0.2, "certificates per second per SPIFFE ID, sustained")
	burst := fs.Int("burst", 5, "certificates per SPIFFE ID at once")
	metrics := fs.String("metrics", "", "serve Prometheus metrics on this address (plain HTTP)")
	var dns, ips stringList
	fs.Var(&dns, "dns", "DNS name for the CA's own certificate (clients verify its SPIFFE ID, spiffe://TD/veil/ca); repeatable")
	fs.Var(&ips, "ip", "IP address for the CA's own certificate; repeatable")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "dir"); err != nil {
		return err
	}
	var ipAddrs []net.IP
	for _, s := range ips {
		ip := net.ParseIP(s)
		if ip == nil {
			return fmt.Errorf("%w: --ip %q is not an IP address", errUsage, s)
		}
		ipAddrs = append(ipAddrs, ip)
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	svc, err := ca.New(*dir, ca.WithMaxTTL(*maxTTL), ca.WithDefaultTTL(*defTTL), ca.WithRateLimit(*rate, *burst), ca.WithLogger(logger))
	if err != nil {
		return err
	}
	opts := []rpc.ServerOption{rpc.WithLogger(logger)}
	if *metrics != "" {
		opts = append(opts, rpc.WithMetricsAddr(*metrics))
	}
	srv, err := ca.NewServer(svc, dns, ipAddrs, opts...)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	c, _ := svc.CA()
	logger.Info("veil ca serving", "addr", ln.Addr().String(), "id", ca.ServerID(c.TrustDomain()).String(),
		"max_ttl", maxTTL.String(), "bundle", filepath.Join(*dir, "bundle.crt"))
	if err := srv.Serve(ctx, ln); err != nil {
		return err
	}
	logger.Info("veil ca stopped")
	return nil
}

func runCAToken(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca token", "ca token --dir DIR --id SPIFFE_ID|PATTERN [--ttl 10m] [--json]", stderr)
	dir := fs.String("dir", "", "the CA's directory")
	id := fs.String("id", "", "SPIFFE ID the token may request, or a pattern (spiffe://TD/ns/*/sa/api)")
	ttl := fs.Duration("ttl", ca.DefaultTokenTTL, "how long the token stays usable (it is also single use)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "dir", "id"); err != nil {
		return err
	}
	if _, err := transport.ParsePattern(*id); err != nil {
		return fmt.Errorf("%w: --id: %v", errUsage, err)
	}
	now := time.Now()
	token, err := ca.NewToken(*dir, *id, *ttl, now)
	if err != nil {
		return err
	}
	out := map[string]any{"token": token, "id": *id, "expires": now.Add(*ttl).UTC().Format(time.RFC3339)}
	return emit(stdout, *asJSON, out, func(w io.Writer) { fmt.Fprintln(w, token) })
}

func runCARotate(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca rotate", "ca rotate --dir DIR --step prepare|activate|finish|status [--force] [--json]", stderr)
	dir := fs.String("dir", "", "the CA's directory")
	step := fs.String("step", "status", "prepare: add a new root to the bundle; activate: sign with it; finish: drop the old root; status: show the phase")
	force := fs.Bool("force", false, "with finish: drop the old root even though leaves it signed are still valid (they stop working)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "dir"); err != nil {
		return err
	}
	var msg string
	switch *step {
	case "prepare":
		root, err := pki.PrepareRotation(*dir)
		if err != nil {
			return err
		}
		msg = fmt.Sprintf("prepared root %s: trusted now, signing after 'activate'. Wait until every workload has the new bundle (one trust refresh or renewal), then activate.", serialOf(root.SerialNumber.Text(16)))
	case "activate":
		root, err := pki.ActivateRotation(*dir)
		if err != nil {
			return err
		}
		msg = fmt.Sprintf("root %s signs new leaves; the old root stays trusted until 'finish'.", serialOf(root.SerialNumber.Text(16)))
	case "finish":
		dropped, err := pki.FinishRotation(*dir, time.Now(), *force)
		if err != nil {
			return err
		}
		var names []string
		for _, r := range dropped {
			names = append(names, serialOf(r.SerialNumber.Text(16)))
		}
		msg = "dropped root(s) " + strings.Join(names, ", ") + " from the bundle."
	case "status":
	default:
		return fmt.Errorf("%w: --step %q: want prepare, activate, finish or status", errUsage, *step)
	}
	c, err := pki.LoadCA(*dir)
	if err != nil {
		return err
	}
	st, err := c.Rotation()
	if err != nil {
		return err
	}
	var trusted []string
	for _, r := range st.Trusted {
		trusted = append(trusted, serialOf(r.SerialNumber.Text(16)))
	}
	out := map[string]any{"step": *step, "phase": string(st.Phase), "signing_root": serialOf(st.Signing.SerialNumber.Text(16)), "trusted_roots": trusted}
	if !st.RetiringUntil.IsZero() {
		out["finish_after"] = st.RetiringUntil.UTC().Format(time.RFC3339)
	}
	return emit(stdout, *asJSON, out, func(w io.Writer) {
		if msg != "" {
			fmt.Fprintln(w, msg)
		}
		fmt.Fprintf(w, "phase %s; signing root %s; trusted roots %s\n", st.Phase, serialOf(st.Signing.SerialNumber.Text(16)), strings.Join(trusted, ", "))
		if !st.RetiringUntil.IsZero() {
			fmt.Fprintf(w, "finish allowed after %s (when the old root's last leaf expires)\n", st.RetiringUntil.UTC().Format(time.RFC3339))
		}
	})
}

func serialOf(hex string) string { return "serial:" + hex }

func runCARevoke(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca revoke", "ca revoke --dir DIR [--serial HEX ...] [--id SPIFFE_ID ...] [--json]", stderr)
	dir := fs.String("dir", "", "the CA's directory")
	var serials, ids stringList
	fs.Var(&serials, "serial", "certificate serial number to refuse, hexadecimal; repeatable")
	fs.Var(&ids, "id", "SPIFFE ID to refuse entirely; repeatable")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "dir"); err != nil {
		return err
	}
	if len(serials)+len(ids) == 0 {
		return fmt.Errorf("%w: veil ca revoke needs --serial or --id", errUsage)
	}
	for _, s := range ids {
		if _, err := spiffeid.FromString(s); err != nil {
			return fmt.Errorf("%w: --id: %v", errUsage, err)
		}
	}
	d, err := pki.Revoke(*dir, serials, ids)
	if err != nil {
		if strings.Contains(err.Error(), "hexadecimal") {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		return err
	}
	out := map[string]any{"denied_serials": d.Serials(), "denied_ids": d.IDs()}
	return emit(stdout, *asJSON, out, func(w io.Writer) {
		fmt.Fprintf(w, "denylist: %d serial(s), %d ID(s); workloads receive it with their next trust refresh\n", len(d.Serials()), len(d.IDs()))
	})
}

func runCAIntermediate(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca intermediate", "ca intermediate --dir DIR [--ttl 8760h] [--json]", stderr)
	dir := fs.String("dir", "", "the CA's directory")
	ttl := fs.Duration("ttl", pki.DefaultIntermediateTTL, "the intermediate's lifetime (never past the root's)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "dir"); err != nil {
		return err
	}
	cert, err := pki.CreateIntermediate(*dir, *ttl)
	if err != nil {
		return err
	}
	out := map[string]any{"serial": cert.SerialNumber.Text(16), "not_after": cert.NotAfter.UTC().Format(time.RFC3339),
		"certificate": filepath.Join(*dir, "intermediate.crt")}
	return emit(stdout, *asJSON, out, func(w io.Writer) {
		fmt.Fprintf(w, "intermediate %s signs new leaves until %s; workloads keep trusting the root\n", serialOf(cert.SerialNumber.Text(16)), cert.NotAfter.UTC().Format(time.RFC3339))
	})
}
