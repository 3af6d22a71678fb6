package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/scoring"
)

func runKeys(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return runSub(ctx, "keys", "Usage: veil keys <gen|upload> [flags]\n\n  gen     create a CKKS key file (secret and public key, 0600)\n  upload  upload the evaluation keys a server's procedure needs, with progress",
		map[string]func(context.Context, []string, io.Writer, io.Writer) error{"gen": runKeysGen, "upload": runKeysUpload}, args, stdout, stderr)
}

// runSub dispatches "veil NAME SUB ...".
func runSub(ctx context.Context, name, usage string, subs map[string]func(context.Context, []string, io.Writer, io.Writer) error, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprintln(stderr, usage)
		if len(args) == 0 {
			return fmt.Errorf("%w: veil %s needs a subcommand", errUsage, name)
		}
		return nil
	}
	f, ok := subs[args[0]]
	if !ok {
		return fmt.Errorf("%w: unknown subcommand 'veil %s %s'", errUsage, name, args[0])
	}
	return f(ctx, args[1:], stdout, stderr)
}

// paramsByName maps --params values to presets.
func paramsByName(name string) (*he.Parameters, error) {
	switch name {
	case "n13":
		return he.ParamsN13(), nil
	case "n14":
		return he.ParamsN14(), nil
	case "n15":
		return he.ParamsN15(), nil
	}
	return nil, fmt.Errorf("%w: --params %q: want n13, n14 or n15", errUsage, name)
}

func runKeysGen(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("keys gen", "keys gen --out FILE [--params n13|n14|n15] [--json]", stderr)
	out := fs.String("out", "", "key file to write (mode 0600); keep it: it decrypts everything encrypted under its public key")
	params := fs.String("params", "n13", "CKKS preset: n13, n14 or n15 (see docs/he.md)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "out"); err != nil {
		return err
	}
	p, err := paramsByName(*params)
	if err != nil {
		return err
	}
	start := time.Now()
	c, err := he.NewClient(p)
	if err != nil {
		return err
	}
	if err := c.SaveKeyFile(*out); err != nil {
		return err
	}
	res := map[string]any{"file": *out, "params": *params, "param_id": string(p.ID()), "ms": ms(time.Since(start))}
	return emit(stdout, *asJSON, res, func(w io.Writer) {
		fmt.Fprintf(w, "wrote CKKS keys (%s, parameters %s) to %s\n", *params, p.ID(), *out)
	})
}

func runKeysUpload(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("keys upload", "keys upload --keys FILE --identity DIR --addr URL [--procedure P] [--server-id ID] [--pq-seal on|proxied|off] [--json]", stderr)
	keyFile := fs.String("keys", "", "key file from 'veil keys gen'")
	identity := fs.String("identity", "", "identity directory")
	addr := fs.String("addr", "", "server base URL")
	procedure := fs.String("procedure", scoring.ScoreStreamProcedure, "the procedure whose key manifest to satisfy")
	serverID := fs.String("server-id", "", "SPIFFE ID the server must have (default: any ID in the identity's trust domain)")
	seal := addClientSeal(fs)
	asJSON := fs.Bool("json", false, "print the result as JSON")
	tokens := addTokenClientFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "keys", "identity", "addr"); err != nil {
		return err
	}
	c, err := he.LoadKeyFile(*keyFile)
	if err != nil {
		return err
	}
	hc, _, err := newIdentityClient(*identity, *serverID, *seal, nil)
	if err != nil {
		return err
	}
	tokenOpts, _, err := tokens.options(*identity, *serverID, *seal)
	if err != nil {
		return err
	}
	ks := hev1connect.NewKeyServiceClient(hc, *addr, append(rpc.ClientOptions(), tokenOpts...)...)
	manifest, err := keys.FetchManifest(ctx, ks, c.Params(), *procedure)
	if err != nil {
		return err
	}
	start := time.Now()
	evk, err := c.GenEvaluationKeys(manifest)
	if err != nil {
		return err
	}
	genTime := time.Since(start)
	var bars io.Writer
	if !*asJSON {
		bars = stderr
	}
	bar := newProgressBar(bars, "evaluation-key upload")
	start = time.Now()
	id, err := keys.NewUploader(ks, evk, keys.WithProgress(bar.set)).Upload(ctx)
	if err != nil {
		return err
	}
	size := he.EncodedSize(manifest)
	res := map[string]any{"key_id": string(id), "bytes": size, "gen_ms": ms(genTime), "upload_ms": ms(time.Since(start)), "procedure": *procedure}
	return emit(stdout, *asJSON, res, func(w io.Writer) {
		fmt.Fprintf(w, "uploaded %s of evaluation keys for %s as %s (generated in %.0f ms)\n", fmtBytes(size), *procedure, id, ms(genTime))
	})
}
