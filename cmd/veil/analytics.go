package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
	"github.com/veilrpc/veil/transport"
)

func runAnalytics(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return runSub(ctx, "analytics", "Usage: veil analytics <create|submit|close|result> [flags]\n\n  create  create a study under your CKKS public key, signed with your SVID (analyst)\n  submit  submit encrypted records to a study (data owner)\n  close   end a study's submissions (analyst)\n  result  fetch and decrypt a closed study's statistics (analyst)",
		map[string]func(context.Context, []string, io.Writer, io.Writer) error{"create": runAnalyticsCreate, "submit": runAnalyticsSubmit, "close": runAnalyticsClose, "result": runAnalyticsResult}, args, stdout, stderr)
}

// clientFlags are the flags every analytics command takes.
type clientFlags struct {
	identity, addr, serverID *string
	seal                     *clientSeal
	tokens                   tokenClientFlags
}

func addClientFlags(fs interface {
	String(name, value, usage string) *string
	Var(value flag.Value, name, usage string)
}) clientFlags {
	return clientFlags{
		identity: fs.String("identity", "", "identity directory"),
		addr:     fs.String("addr", "", "analytics server base URL"),
		serverID: fs.String("server-id", "", "SPIFFE ID the server must have (default: any ID in the identity's trust domain)"),
		seal:     addClientSeal(fs),
		tokens:   addTokenClientFlags(fs),
	}
}

// client is the HTTP client and Connect options (rpc's, and access tokens with
// --token-from) of an analytics command.
func (cf clientFlags) client() (*http.Client, []connect.ClientOption, error) {
	hc, _, err := newIdentityClient(*cf.identity, *cf.serverID, *cf.seal, nil)
	if err != nil {
		return nil, nil, err
	}
	tokenOpts, _, err := cf.tokens.options(*cf.identity, *cf.serverID, *cf.seal)
	if err != nil {
		return nil, nil, err
	}
	return hc, append(rpc.ClientOptions(), tokenOpts...), nil
}

func runAnalyticsCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("analytics create", "analytics create --keys FILE --identity DIR --addr URL --study ID --owner PATTERN... --dimension N --range MIN:MAX... [--min-owners N] [--max-submissions N] [--covariance] [--json]", stderr)
	cf := addClientFlags(fs)
	keyFile := fs.String("keys", "", "the analyst's key file (veil keys gen)")
	study := fs.String("study", "", "study ID: lowercase letters, digits and dashes")
	var owners stringList
	fs.Var(&owners, "owner", "SPIFFE ID pattern of data owners who may submit; repeatable")
	dimension := fs.Int("dimension", 0, "values per record")
	covariance := fs.Bool("covariance", false, "owners also send pairwise products, for the covariance matrix")
	var rangeFlags stringList
	fs.Var(&rangeFlags, "range", "declared range MIN:MAX owners clip values to: once for every coordinate or once per coordinate")
	minOwners := fs.Int("min-owners", 0, "distinct owners a close needs (default 2; 1 is refused)")
	maxSubs := fs.Int("max-submissions", 0, "submissions counted per owner (default 1)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "keys", "identity", "addr", "study"); err != nil {
		return err
	}
	if len(owners) == 0 || *dimension < 1 || len(rangeFlags) == 0 {
		return fmt.Errorf("%w: veil analytics create needs --owner, --dimension and --range", errUsage)
	}
	ranges, err := parseRanges(rangeFlags)
	if err != nil {
		return err
	}
	key, err := he.LoadKeyFile(*keyFile)
	if err != nil {
		return err
	}
	hc, opts, err := cf.client()
	if err != nil {
		return err
	}
	id, err := transport.LoadFiles(*cf.identity)
	if err != nil {
		return err
	}
	spec := analytics.StudySpec{ID: *study, OwnerPatterns: owners, Dimension: *dimension, Covariance: *covariance,
		Ranges: ranges, MinOwners: *minOwners, MaxSubmissionsPerOwner: *maxSubs}
	if err := analytics.NewAnalyst(hc, *cf.addr, key, id, opts...).CreateStudy(ctx, spec); err != nil {
		return err
	}
	return emit(stdout, *asJSON, map[string]any{"study": *study, "owners": []string(owners), "dimension": *dimension}, func(w io.Writer) {
		fmt.Fprintf(w, "created study %s (%d values per record) for owners %s\n", *study, *dimension, owners.String())
	})
}

func runAnalyticsSubmit(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("analytics submit", "analytics submit --identity DIR --addr URL --study ID --analyst SPIFFE-ID --csv FILE --idempotency-key K [--json]", stderr)
	cf := addClientFlags(fs)
	study := fs.String("study", "", "study ID")
	analystID := fs.String("analyst", "", "SPIFFE ID of the analyst whose signed study (and public key) you accept")
	csvPath := fs.String("csv", "", "records, one per line, values separated by commas (no header)")
	key := fs.String("idempotency-key", "", "names this submission: a retry with the same key counts once")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "identity", "addr", "study", "analyst", "csv", "idempotency-key"); err != nil {
		return err
	}
	want, err := spiffeid.FromString(*analystID)
	if err != nil {
		return fmt.Errorf("%w: --analyst: %v", errUsage, err)
	}
	records, err := readRecords(*csvPath)
	if err != nil {
		return err
	}
	hc, opts, err := cf.client()
	if err != nil {
		return err
	}
	trust, err := transport.LoadFiles(*cf.identity)
	if err != nil {
		return err
	}
	res, err := analytics.NewOwner(hc, *cf.addr, trust, spiffeid.MatchID(want), opts...).Submit(ctx, *study, *key, records)
	if err != nil {
		return err
	}
	out := map[string]any{"study": *study, "records": len(records), "duplicate": res.Duplicate, "submissions": res.Submissions, "clipped": res.Clipped}
	return emit(stdout, *asJSON, out, func(w io.Writer) {
		if res.Duplicate {
			fmt.Fprintf(w, "already counted: %s was submitted before with key %s\n", *study, *key)
			return
		}
		fmt.Fprintf(w, "submitted %d encrypted records to %s (%d of your submissions counted)\n", len(records), *study, res.Submissions)
	})
}

func runAnalyticsResult(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("analytics result", "analytics result --keys FILE --identity DIR --addr URL --study ID [--json]", stderr)
	cf := addClientFlags(fs)
	keyFile := fs.String("keys", "", "the analyst's key file")
	study := fs.String("study", "", "study ID")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "keys", "identity", "addr", "study"); err != nil {
		return err
	}
	key, err := he.LoadKeyFile(*keyFile)
	if err != nil {
		return err
	}
	hc, opts, err := cf.client()
	if err != nil {
		return err
	}
	res, err := analytics.NewAnalyst(hc, *cf.addr, key, nil, opts...).Result(ctx, *study)
	if err != nil {
		return err
	}
	out := map[string]any{"study": *study, "release": res.Release, "submissions": res.Submissions, "count": res.Count, "mean": res.Mean, "variance": res.Variance, "sum": res.Sum}
	if res.Covariance != nil {
		out["covariance"] = res.Covariance
	}
	if res.Histogram != nil {
		out["histogram_mismatch"] = res.HistogramMismatch
	}
	if res.HistogramMismatch {
		fmt.Fprintf(stderr, "warning: study %s: the histogram does not add up to the %d records the owners reported: some owner misreported its count\n", *study, res.Count)
	}
	return emit(stdout, *asJSON, out, func(w io.Writer) {
		fmt.Fprintf(w, "study %s: %d records from %d submissions\n", *study, res.Count, res.Submissions)
		for i := range res.Mean {
			fmt.Fprintf(w, "  value %d: mean %.6g, variance %.6g\n", i, res.Mean[i], res.Variance[i])
		}
	})
}

func runAnalyticsClose(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("analytics close", "analytics close --identity DIR --addr URL --study ID [--json]", stderr)
	cf := addClientFlags(fs)
	study := fs.String("study", "", "study ID")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "identity", "addr", "study"); err != nil {
		return err
	}
	hc, opts, err := cf.client()
	if err != nil {
		return err
	}
	res, err := analytics.NewAnalyst(hc, *cf.addr, nil, nil, opts...).Close(ctx, *study)
	if err != nil {
		return err
	}
	return emit(stdout, *asJSON, map[string]any{"study": *study, "submissions": res.Submissions, "owners": res.Owners}, func(w io.Writer) {
		fmt.Fprintf(w, "closed study %s: %d submissions from %d owners\n", *study, res.Submissions, res.Owners)
	})
}

// parseRanges parses MIN:MAX flags.
func parseRanges(flags []string) ([]analytics.Range, error) {
	out := make([]analytics.Range, 0, len(flags))
	for _, f := range flags {
		lo, hi, ok := strings.Cut(f, ":")
		a, err1 := strconv.ParseFloat(lo, 64)
		b, err2 := strconv.ParseFloat(hi, 64)
		if !ok || err1 != nil || err2 != nil || !(a < b) {
			return nil, fmt.Errorf("%w: --range %q: want MIN:MAX with MIN < MAX", errUsage, f)
		}
		out = append(out, analytics.Range{Min: a, Max: b})
	}
	return out, nil
}

// readRecords reads comma-separated records, one per line; blank lines are skipped.
func readRecords(path string) ([][]float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var records [][]float64
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		var rec []float64
		for _, field := range strings.Split(line, ",") {
			v, err := strconv.ParseFloat(strings.TrimSpace(field), 64)
			if err != nil {
				return nil, fmt.Errorf("%w: %s line %d: %v", errUsage, path, n, err)
			}
			rec = append(rec, v)
		}
		records = append(records, rec)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(records) == 0 {
		return nil, fmt.Errorf("%w: %s has no records", errUsage, path)
	}
	return records, nil
}
