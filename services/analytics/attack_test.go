package analytics_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/gen/veil/analytics/v1/analyticsv1connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
)

// Finding 1 (differencing): the analyst reads the result after one owner and after
// two; the difference is the second owner's contribution. Now no result exists before
// the close, a close needs two distinct owners, an owner cannot submit twice, nothing
// counts after the close, and every release answers the same closed set.
func TestAttackDifferencing(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "diff", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	r0, r1 := records(1, 10, 2), records(2, 15, 2)
	if _, err := e.owner(t, owners[0]).Submit(ctx, "diff", "k", r0); err != nil {
		t.Fatal(err)
	}
	_, err := a.Result(ctx, "diff")
	wantCode(t, "result of an open study", err, connect.CodeFailedPrecondition)
	_, err = a.Close(ctx, "diff")
	wantCode(t, "close with one owner", err, connect.CodeFailedPrecondition)
	_, err = e.owner(t, owners[0]).Submit(ctx, "diff", "another-key", r1)
	wantCode(t, "second submission of one owner", err, connect.CodeResourceExhausted)
	if _, err := e.owner(t, owners[1]).Submit(ctx, "diff", "k", r1); err != nil {
		t.Fatal(err)
	}
	if c, err := a.Close(ctx, "diff"); err != nil || c.Owners != 2 || c.Submissions != 2 {
		t.Fatalf("close = %+v, %v", c, err)
	}
	_, err = e.owner(t, owners[2]).Submit(ctx, "diff", "k", records(3, 5, 2))
	wantCode(t, "submission after the close", err, connect.CodeFailedPrecondition)
	first, err := a.Result(ctx, "diff")
	if err != nil {
		t.Fatal(err)
	}
	check(t, first, append(r0, r1...), 2)
	second, err := a.Result(ctx, "diff")
	if err != nil {
		t.Fatal(err)
	}
	check(t, second, append(r0, r1...), 2)
	if first.Release != 1 || second.Release != 2 {
		t.Fatalf("releases numbered %d, %d", first.Release, second.Release)
	}
	st, err := e.raw(t, analyst).GetStudy(ctx, connect.NewRequest(&analyticsv1.GetStudyRequest{StudyId: "diff"}))
	if err != nil || st.Msg.GetStudy().GetState() != analyticsv1.StudyState_STUDY_STATE_RELEASED {
		t.Fatalf("state after release: %v, %v", st.Msg.GetStudy().GetState(), err)
	}
	err = a.CreateStudy(ctx, analytics.StudySpec{ID: "one", OwnerPatterns: []string{owners[0]}, Dimension: 2, Ranges: wide, MinOwners: 1})
	wantCode(t, "min owners 1", err, connect.CodeInvalidArgument)
}

// Finding 3 (poisoned submission): a well-formed vector with a doubled scale. It is
// refused; forced into the store, it is quarantined with a log line when the service
// loads, and the study goes on.
func TestAttackPoisonedSubmission(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "poison", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	r0 := records(1, 10, 2)
	if _, err := e.owner(t, owners[0]).Submit(ctx, "poison", "k", r0); err != nil {
		t.Fatal(err)
	}
	enc, err := he.NewEncryptor(key.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	req := &analyticsv1.SubmitRequest{StudyId: "poison", IdempotencyKey: "bad", Count: 1}
	for _, dst := range []**hev1.EncryptedVector{&req.Sums, &req.Products} {
		v, err := enc.Encrypt([]float64{1, 2})
		if err != nil {
			t.Fatal(err)
		}
		m, err := he.MarshalVector(v)
		if err != nil {
			t.Fatal(err)
		}
		m.Ciphertexts[0].Scale *= 2
		*dst = m
	}
	_, err = e.raw(t, owners[1]).Submit(ctx, connect.NewRequest(req))
	wantCode(t, "doubled scale", err, connect.CodeInvalidArgument)

	// Forced into the store behind the service's back.
	store, err := analytics.NewDirStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := proto.Marshal(&analyticsv1.StoredSubmission{Owner: owners[1], Request: req})
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256([]byte(owners[1] + "\x00bad"))
	if added, err := store.AddSubmission(ctx, "poison", hex.EncodeToString(h[:]), b); err != nil || !added {
		t.Fatalf("forcing the record: %v %v", added, err)
	}
	if added, err := store.AddSubmission(ctx, "poison", strings.Repeat("ab", 32), []byte("garbage")); err != nil || !added {
		t.Fatalf("forcing garbage: %v %v", added, err)
	}
	e.srv.Stop()
	var logs bytes.Buffer
	svc, err := analytics.New(analytics.WithStore(dir), analytics.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	if n := strings.Count(logs.String(), "quarantined"); n != 2 {
		t.Fatalf("%d quarantine log lines:\n%s", n, logs.String())
	}
	e.srv = e.pki.Serve(t, serverID, svc.Register, append(analytics.ServerOptions(he.ParamsN13()), rpc.WithPolicy(policy()))...)
	r2 := records(2, 12, 2)
	if _, err := e.owner(t, owners[2]).Submit(ctx, "poison", "k", r2); err != nil {
		t.Fatal(err)
	}
	check(t, closeAndResult(t, e.analyst(t, analyst, key), "poison"), append(r0, r2...), 2)
}

// substitutingServer is the curious server of finding 2: GetStudy hands out its own
// public key (keeping, dropping or replacing the analyst's signature).
type substitutingServer struct {
	*analytics.Service
	pk   *hev1.PublicKey
	mode string
	pki  func(*analyticsv1.Study)
}

func (s *substitutingServer) GetStudy(ctx context.Context, req *connect.Request[analyticsv1.GetStudyRequest]) (*connect.Response[analyticsv1.GetStudyResponse], error) {
	res, err := s.Service.GetStudy(ctx, req)
	if err != nil {
		return nil, err
	}
	m := proto.CloneOf(res.Msg.GetStudy())
	switch s.mode {
	case "swap-key":
		m.PublicKey = s.pk
	case "drop-signature":
		m.PublicKey, m.AnalystSignature = s.pk, nil
	case "server-signs":
		m.PublicKey = s.pk
		s.pki(m)
	case "widen-owners":
		m.MinOwners = 0
		m.OwnerPatterns = append(m.OwnerPatterns, "spiffe://example.org")
	}
	return connect.NewResponse(&analyticsv1.GetStudyResponse{Study: m}), nil
}

// Finding 2 (key substitution): the server returns its own key; the owner detects it
// and sends nothing.
func TestAttackKeySubstitution(t *testing.T) {
	e, key := setup(t, "")
	svc, err := analytics.New()
	if err != nil {
		t.Fatal(err)
	}
	serverKey, err := he.NewClient(he.ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	pk, err := he.MarshalPublicKey(serverKey.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	evil := &substitutingServer{Service: svc, pk: pk}
	// The server re-signs with its own SVID (a valid chain, the wrong identity).
	serverSVID, err := e.pki.Identity(t, serverID).GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	evil.pki = func(m *analyticsv1.Study) {
		m.Analyst = serverID
		if err := analytics.SignStudyForTest(m, serverSVID); err != nil {
			t.Fatal(err)
		}
	}
	srv := e.pki.Serve(t, serverID, func(s *rpc.Server) {
		rpc.Register[analyticsv1connect.AnalyticsServiceHandler](s, analyticsv1connect.NewAnalyticsServiceHandler, evil)
	}, append(analytics.ServerOptions(he.ParamsN13()), rpc.WithPolicy(policy()))...)
	e.srv = srv
	ctx := context.Background()
	if err := e.analyst(t, analyst, key).CreateStudy(ctx, analytics.StudySpec{ID: "swap", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"swap-key", "drop-signature", "server-signs", "widen-owners"} {
		evil.mode = mode
		_, err := e.owner(t, owners[0]).Submit(ctx, "swap", "k-"+mode, records(1, 5, 2))
		if !errors.Is(err, analytics.ErrUntrustedStudy) {
			t.Errorf("%s: owner submitted (err %v)", mode, err)
		}
	}
	// An owner trusting the server's ID as analyst still refuses the analyst's key
	// swapped under the analyst's signature.
	evil.mode = ""
	if _, err := e.owner(t, owners[0]).Submit(ctx, "swap", "k", records(1, 5, 2)); err != nil {
		t.Fatalf("honest server: %v", err)
	}
	wrongTrust := analytics.NewOwner(e.pki.Client(t, owners[1], e.srv), e.srv.URL, e.pki.Identity(t, owners[1]), spiffeid.MatchID(spiffeid.RequireFromString(other)))
	if _, err := wrongTrust.Submit(ctx, "swap", "k", records(2, 5, 2)); !errors.Is(err, analytics.ErrUntrustedStudy) {
		t.Fatalf("an owner expecting another analyst submitted (err %v)", err)
	}
}

// encryptedSubmission builds a raw submission of sums and products encrypted under pk,
// with the record count claimed.
func encryptedSubmission(t *testing.T, pk *he.PublicKey, study, key string, count uint64, sums, products []float64) *analyticsv1.SubmitRequest {
	t.Helper()
	enc, err := he.NewEncryptor(pk)
	if err != nil {
		t.Fatal(err)
	}
	req := &analyticsv1.SubmitRequest{StudyId: study, IdempotencyKey: key, Count: count}
	for _, p := range []struct {
		values []float64
		dst    **hev1.EncryptedVector
	}{{sums, &req.Sums}, {products, &req.Products}} {
		v, err := enc.Encrypt(p.values)
		if err != nil {
			t.Fatal(err)
		}
		if *p.dst, err = he.MarshalVector(v); err != nil {
			t.Fatal(err)
		}
	}
	return req
}

// Issue 18 (key fingerprints): a submission encrypted under another key, or naming
// none, is refused before anything is added or stored; honest submissions after it
// still aggregate correctly, and a restart finds nothing to quarantine. Before the
// check, the wrong-key submission was counted and every honest one after it failed
// the evaluator's fingerprint check.
func TestAttackWrongKeySubmission(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "wrongkey", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	otherKey, err := he.NewClient(he.ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	raw := e.raw(t, owners[0])
	bad := encryptedSubmission(t, otherKey.PublicKey(), "wrongkey", "bad", 1, []float64{1, 2}, []float64{1, 4})
	_, err = raw.Submit(ctx, connect.NewRequest(bad))
	wantCode(t, "vectors under another key", err, connect.CodeFailedPrecondition)

	// One vector under the right key and one under another: still refused whole.
	mixed := encryptedSubmission(t, key.PublicKey(), "wrongkey", "mixed", 1, []float64{1, 2}, []float64{1, 4})
	mixed.Products = bad.Products
	_, err = raw.Submit(ctx, connect.NewRequest(mixed))
	wantCode(t, "products under another key", err, connect.CodeFailedPrecondition)

	// No fingerprint at all: refused (the owners' client always sends one).
	none := encryptedSubmission(t, key.PublicKey(), "wrongkey", "none", 1, []float64{1, 2}, []float64{1, 4})
	none.Sums.KeyFingerprint = nil
	_, err = raw.Submit(ctx, connect.NewRequest(none))
	wantCode(t, "no key fingerprint", err, connect.CodeInvalidArgument)

	// Nothing was stored or counted: owners[0] still has its one submission.
	r0, r1 := records(1, 10, 2), records(2, 12, 2)
	if _, err := e.owner(t, owners[0]).Submit(ctx, "wrongkey", "k", r0); err != nil {
		t.Fatalf("honest submission after the refused ones: %v", err)
	}
	if _, err := e.owner(t, owners[1]).Submit(ctx, "wrongkey", "k", r1); err != nil {
		t.Fatalf("second honest submission: %v", err)
	}
	store, err := analytics.NewDirStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if names, err := store.Submissions(ctx, "wrongkey"); err != nil || len(names) != 2 {
		t.Fatalf("stored records %v (%v), want the 2 honest submissions", names, err)
	}
	e.srv.Stop()
	var logs bytes.Buffer
	svc, err := analytics.New(analytics.WithStore(dir), analytics.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	if strings.Contains(logs.String(), "quarantined") {
		t.Fatalf("restart quarantined records:\n%s", logs.String())
	}
	e.srv = e.pki.Serve(t, serverID, svc.Register, append(analytics.ServerOptions(he.ParamsN13()), rpc.WithPolicy(policy()))...)
	check(t, closeAndResult(t, e.analyst(t, analyst, key), "wrongkey"), append(r0, r1...), 2)
}

// Stored records and key fingerprints: a record written before fingerprints existed
// (none on its vectors) still counts on load, so a closed study's result does not
// change; a stored record under another key is quarantined, never added.
func TestStoredRecordsKeyFingerprint(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "legacy", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	r0 := records(1, 10, 2)
	if _, err := e.owner(t, owners[0]).Submit(ctx, "legacy", "k", r0); err != nil {
		t.Fatal(err)
	}
	otherKey, err := he.NewClient(he.ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	r1 := records(2, 12, 2)
	sums, products, err := analytics.Contribution(r1, 2, false)
	if err != nil {
		t.Fatal(err)
	}
	legacy := encryptedSubmission(t, key.PublicKey(), "legacy", "old", uint64(len(r1)), sums, products)
	legacy.Sums.KeyFingerprint, legacy.Products.KeyFingerprint = nil, nil
	wrong := encryptedSubmission(t, otherKey.PublicKey(), "legacy", "wrong", 1, []float64{1, 2}, []float64{1, 4})
	store, err := analytics.NewDirStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		owner string
		req   *analyticsv1.SubmitRequest
	}{{owners[1], legacy}, {owners[2], wrong}} {
		b, err := proto.Marshal(&analyticsv1.StoredSubmission{Owner: f.owner, Request: f.req})
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.Sum256([]byte(f.owner + "\x00" + f.req.GetIdempotencyKey()))
		if added, err := store.AddSubmission(ctx, "legacy", hex.EncodeToString(h[:]), b); err != nil || !added {
			t.Fatalf("storing a record: %v %v", added, err)
		}
	}
	e.srv.Stop()
	var logs bytes.Buffer
	svc, err := analytics.New(analytics.WithStore(dir), analytics.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	if n := strings.Count(logs.String(), "quarantined"); n != 1 || !strings.Contains(logs.String(), "not the study's public key") {
		t.Fatalf("%d quarantine log lines, want 1 for the wrong key:\n%s", n, logs.String())
	}
	e.srv = e.pki.Serve(t, serverID, svc.Register, append(analytics.ServerOptions(he.ParamsN13()), rpc.WithPolicy(policy()))...)
	check(t, closeAndResult(t, e.analyst(t, analyst, key), "legacy"), append(r0, r1...), 2)
}

// The record count is self-reported: an owner that claims 1000 records for a
// contribution of 12 drags the mean towards zero, and neither the server nor the
// analyst can check the count itself. In a study with a histogram the analyst's
// client detects it: the bins no longer add up to the count.
func TestAttackMisreportedCount(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	edges := []float64{-50, 0, 50, 100, 150}
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "liar", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide, HistogramEdges: edges}); err != nil {
		t.Fatal(err)
	}
	r0, r1 := records(1, 10, 2), records(2, 12, 2)
	if _, err := e.owner(t, owners[0]).Submit(ctx, "liar", "k", r0); err != nil {
		t.Fatal(err)
	}
	sums, products, err := analytics.Contribution(r1, 2, false)
	if err != nil {
		t.Fatal(err)
	}
	req := encryptedSubmission(t, key.PublicKey(), "liar", "k", 1000, sums, products)
	enc, err := he.NewEncryptor(key.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	v, err := enc.Encrypt(analytics.HistogramCounts(r1, edges))
	if err != nil {
		t.Fatal(err)
	}
	if req.Histogram, err = he.MarshalVector(v); err != nil {
		t.Fatal(err)
	}
	if _, err := e.raw(t, owners[1]).Submit(ctx, connect.NewRequest(req)); err != nil {
		t.Fatalf("the server cannot refuse a misreported count: %v", err)
	}
	res := closeAndResult(t, a, "liar")
	if res.Count != 1010 {
		t.Fatalf("count %d, want the 1010 claimed", res.Count)
	}
	if !res.HistogramMismatch {
		t.Fatalf("a count of 1010 for histograms of 22 records went unnoticed: %v", res.Histogram)
	}
}
