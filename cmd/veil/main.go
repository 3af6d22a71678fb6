// Command veil runs Veil services and manages their identities.
//
//	veil demo         run a CA and services on loopback, call them end to end, and report
//	veil ca           certificate authority: init, issue, serve, token, rotate, revoke,
//	                  intermediate, bundle
//	veil serve        serve built-in services (echo, scoring, analytics) over strict mTLS
//	veil call         call a procedure of a compiled-in service with JSON (sealed end to end)
//	veil score        score a CSV of samples on a scoring server without revealing them
//	veil keys         CKKS key files: gen, upload (evaluation keys)
//	veil analytics    encrypted analytics: create a study, submit records, fetch the result
//	veil model        train a scoring model in plaintext: train
//	veil ticket-keys  create or rotate a pqkex ticket-key file shared by replicas
//	veil version      print the version
//
// Every command takes --help. Errors go to stderr; the exit code is 0 on success,
// 1 on failure and 2 on a usage error. Commands with --json print one JSON object.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// version is set at link time (-ldflags "-X main.version=...").
var version = "dev"

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"demo", "run a CA and services on loopback, call them end to end, and print a report", runDemo},
		{"ca", "manage a certificate authority (init, issue, serve, token, rotate, revoke)", runCA},
		{"serve", "serve built-in services over strict mutual TLS", runServe},
		{"score", "score a CSV of samples on a scoring server without revealing them (CKKS)", runScore},
		{"keys", "create CKKS key files and upload evaluation keys (gen, upload)", runKeys},
		{"analytics", "encrypted analytics: create a study, submit records, fetch the result", runAnalytics},
		{"model", "train a scoring model in plaintext (veil model train)", runModel},
		{"ticket-keys", "create or rotate a pqkex ticket-key file shared by one service's replicas", runTicketKeys},
		{"call", "call a procedure of a compiled-in service with JSON (sealed end to end)", runCall},
		{"version", "print the version", func(_ context.Context, _ []string, stdout, _ io.Writer) error {
			_, err := fmt.Fprintln(stdout, "veil", version)
			return err
		}},
	}
}

// errHelp is returned by a flag set when --help is asked for.
var errHelp = flag.ErrHelp

// errUsage marks errors caused by the command line; they exit with status 2.
var errUsage = errors.New("usage")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			err := c.run(ctx, args[1:], stdout, stderr)
			switch {
			case err == nil:
				return 0
			case errors.Is(err, flag.ErrHelp):
				return 0
			case errors.Is(err, errUsage):
				fmt.Fprintln(stderr, "veil:", err)
				return 2
			default:
				fmt.Fprintln(stderr, "veil:", err)
				return 1
			}
		}
	}
	fmt.Fprintf(stderr, "veil: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "Veil: post-quantum, end-to-end sealed, homomorphically encrypted RPC.")
	fmt.Fprintln(w, "\nUsage: veil <command> [flags]\n\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'veil <command> --help' for a command's flags.")
}

// newFlags returns a flag set that reports errors instead of exiting, printing its
// usage to stderr.
func newFlags(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: veil %s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parse parses args, turning flag errors into usage errors.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	return nil
}

// required reports a missing required flag as a usage error.
func required(fs *flag.FlagSet, names ...string) error {
	for _, n := range names {
		if f := fs.Lookup(n); f != nil && f.Value.String() == "" {
			return fmt.Errorf("%w: veil %s needs --%s", errUsage, fs.Name(), n)
		}
	}
	return nil
}
