package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
	"github.com/veilrpc/veil/transport"
)

func runAnalytics(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return runSub(ctx, "analytics", "Usage: veil analytics <create|join|submit|close|result> [flags]\n\n  create  create a study under your CKKS public key, or a committee study (--member, --threshold), signed with your SVID (analyst)\n  join    hold a committee study's key as a member: join, deal the key shares, then release once closed (member)\n  submit  submit encrypted records to a study (data owner)\n  close   end a study's submissions (analyst)\n  result  fetch and decrypt a closed study's statistics (analyst)",
		map[string]func(context.Context, []string, io.Writer, io.Writer) error{"create": runAnalyticsCreate, "join": runAnalyticsJoin, "submit": runAnalyticsSubmit, "close": runAnalyticsClose, "result": runAnalyticsResult}, args, stdout, stderr)
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
	fs := newFlags("analytics create", "analytics create --keys FILE --identity DIR --addr URL --study ID --owner PATTERN... --dimension N --range MIN:MAX... [--member SPIFFE-ID... --threshold T] [--epsilon E [--epsilon-per-release E1]] [--min-owners N] [--max-submissions N] [--covariance] [--json]", stderr)
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
	var members stringList
	fs.Var(&members, "member", "SPIFFE ID of a committee member, in index order (member 1 first); repeatable: makes a committee study, whose key no party holds (--keys is then the reader key results are re-encrypted to)")
	threshold := fs.Int("threshold", 0, "committee members whose release shares a result needs")
	epsilon := fs.Float64("epsilon", 0, "differential privacy budget of the study's releases (0: none)")
	perRelease := fs.Float64("epsilon-per-release", 0, "privacy budget each release spends (default: --epsilon, one release)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "keys", "identity", "addr", "study"); err != nil {
		return err
	}
	if (len(members) == 0) != (*threshold == 0) || *threshold < 0 || *threshold > len(members) {
		return fmt.Errorf("%w: a committee study needs --member (one or more) and 1 <= --threshold <= members", errUsage)
	}
	if *epsilon < 0 || *perRelease < 0 || (*perRelease > 0 && *epsilon == 0) {
		return fmt.Errorf("%w: --epsilon-per-release needs a positive --epsilon", errUsage)
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
	if *epsilon > 0 {
		p := &analytics.Privacy{Epsilon: *epsilon, EpsilonPerRelease: *perRelease}
		if p.EpsilonPerRelease == 0 {
			p.EpsilonPerRelease = p.Epsilon
		}
		spec.Privacy = p
	}
	a := analytics.NewAnalyst(hc, *cf.addr, key, id, opts...)
	out := map[string]any{"study": *study, "owners": []string(owners), "dimension": *dimension}
	if len(members) > 0 {
		err = a.CreateCommitteeStudy(ctx, spec, analytics.CommitteeSpec{Members: members, Threshold: *threshold})
		out["members"], out["threshold"] = []string(members), *threshold
	} else {
		err = a.CreateStudy(ctx, spec)
	}
	if err != nil {
		return err
	}
	return emit(stdout, *asJSON, out, func(w io.Writer) {
		fmt.Fprintf(w, "created study %s (%d values per record) for owners %s\n", *study, *dimension, owners.String())
		if len(members) > 0 {
			fmt.Fprintf(w, "committee: %d of %s\n", *threshold, members.String())
		}
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

// runAnalyticsJoin is a committee member's whole part in one process (its key shares
// never leave it): join, deal and collect the Shamir shares, wait for the study to
// close, and send its release share for the active set.
func runAnalyticsJoin(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("analytics join", "analytics join --identity DIR --addr URL --study ID --analyst SPIFFE-ID (--active I,J,... | --setup-only) [--poll DURATION] [--json]", stderr)
	cf := addClientFlags(fs)
	study := fs.String("study", "", "study ID")
	analystID := fs.String("analyst", "", "SPIFFE ID of the analyst whose signed committee study you accept")
	activeFlag := fs.String("active", "", "member indices (1-based) that release together: exactly the threshold, this member included")
	setupOnly := fs.Bool("setup-only", false, "exit once the key shares are dealt: this member takes no part in releases (its shares die with the process)")
	poll := fs.Duration("poll", 2*time.Second, "how often to ask the server while other members or the analyst lag")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "identity", "addr", "study", "analyst"); err != nil {
		return err
	}
	if (*activeFlag == "") != *setupOnly {
		return fmt.Errorf("%w: veil analytics join needs --active or --setup-only", errUsage)
	}
	want, err := spiffeid.FromString(*analystID)
	if err != nil {
		return fmt.Errorf("%w: --analyst: %v", errUsage, err)
	}
	var active []int
	for _, f := range strings.Split(*activeFlag, ",") {
		if *setupOnly {
			break
		}
		i, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || i < 1 {
			return fmt.Errorf("%w: --active %q: want member indices such as 1,2", errUsage, *activeFlag)
		}
		active = append(active, i)
	}
	if *poll <= 0 {
		return fmt.Errorf("%w: --poll must be positive", errUsage)
	}
	hc, opts, err := cf.client()
	if err != nil {
		return err
	}
	id, err := transport.LoadFiles(*cf.identity)
	if err != nil {
		return err
	}
	m := analytics.NewMember(hc, *cf.addr, id, id, spiffeid.MatchID(want), opts...)
	idx, err := m.Join(ctx, *study)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "joined study %s as member %d\n", *study, idx)
	// wait runs step until it stops answering "not yet" (pending), polling; an
	// unavailable server (restarting) is waited for too: this process holds key
	// shares that die with it.
	wait := func(what string, step func() (pending bool, err error)) error {
		for said := false; ; {
			pending, err := step()
			if connect.CodeOf(err) == connect.CodeUnavailable {
				fmt.Fprintf(stderr, "server unavailable, retrying: %v\n", err)
				pending, err = true, nil
			}
			if err != nil || !pending {
				return err
			}
			if !said {
				fmt.Fprintf(stderr, "waiting: %s\n", what)
				said = true
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(*poll):
			}
		}
	}
	if err := wait("the other members' joins and Shamir shares", func() (bool, error) {
		err := m.Setup(ctx, *study)
		return errors.Is(err, analytics.ErrSetupPending), ignore(err, analytics.ErrSetupPending)
	}); err != nil {
		return err
	}
	if *setupOnly {
		fmt.Fprintf(stderr, "key shares ready; leaving (--setup-only)\n")
		return emit(stdout, *asJSON, map[string]any{"study": *study, "member": idx, "setup": "done"}, func(w io.Writer) {
			fmt.Fprintf(w, "member %d of %s: key shares dealt; this process takes no part in releases\n", idx, *study)
		})
	}
	fmt.Fprintf(stderr, "key shares ready; waiting for the study to close\n")
	var rel analytics.Released
	if err := wait("the analyst's close", func() (bool, error) {
		rel, err = m.Release(ctx, *study, active)
		return errors.Is(err, analytics.ErrStudyOpen), ignore(err, analytics.ErrStudyOpen)
	}); err != nil {
		return err
	}
	out := map[string]any{"study": *study, "member": idx, "round": rel.Round, "active": active, "shares": rel.Shares, "ready": rel.Ready}
	return emit(stdout, *asJSON, out, func(w io.Writer) {
		fmt.Fprintf(w, "member %d released round %d of %s for active set %v: %d shares in, result ready: %v\n", idx, rel.Round, *study, active, rel.Shares, rel.Ready)
	})
}

// ignore returns err unless it is target.
func ignore(err, target error) error {
	if errors.Is(err, target) {
		return nil
	}
	return err
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
