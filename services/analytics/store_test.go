package analytics_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/internal/testpki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
)

// Two replicas over one store: a study created through one is used through the other,
// a retry through the other replica counts once, and each replica's result holds every
// submission.
func TestReplicasShareStore(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	srv2 := serve(t, e.pki, dir)
	ctx := context.Background()
	if err := e.analyst(t, analyst, key).CreateStudy(ctx, analytics.StudySpec{ID: "shared", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	owner2 := func(id string) *analytics.Owner {
		return analytics.NewOwner(e.pki.Client(t, id, srv2), srv2.URL, e.pki.Identity(t, id), spiffeid.MatchID(spiffeid.RequireFromString(analyst)))
	}
	r0, r1 := records(7, 25, 2), records(8, 35, 2)
	if got, err := e.owner(t, owners[0]).Submit(ctx, "shared", "k1", r0); err != nil || got.Duplicate || got.Submissions != 1 {
		t.Fatalf("replica 1 submit = %+v, %v", got, err)
	}
	if got, err := owner2(owners[0]).Submit(ctx, "shared", "k1", r0); err != nil || !got.Duplicate || got.Submissions != 1 {
		t.Fatalf("retry through replica 2 = %+v, %v (want a duplicate)", got, err)
	}
	if got, err := owner2(owners[1]).Submit(ctx, "shared", "k1", r1); err != nil || got.Duplicate || got.Submissions != 1 { // its own, not the study's 2
		t.Fatalf("replica 2 submit = %+v, %v", got, err)
	}
	// Closed through replica 2; both replicas then answer the closed set.
	if _, err := analytics.NewAnalyst(e.pki.Client(t, analyst, srv2), srv2.URL, key, e.pki.Identity(t, analyst)).Close(ctx, "shared"); err != nil {
		t.Fatal(err)
	}
	for i, s := range []*testpki.Server{e.srv, srv2} {
		res, err := analytics.NewAnalyst(e.pki.Client(t, analyst, s), s.URL, key, e.pki.Identity(t, analyst)).Result(ctx, "shared")
		if err != nil {
			t.Fatalf("replica %d: %v", i+1, err)
		}
		check(t, res, append(r0, r1...), 2)
	}
}

// flakyStore fails every call while down is set.
type flakyStore struct {
	analytics.Store
	down atomic.Bool
}

var errDown = errors.New("down")

func (f *flakyStore) CreateStudy(ctx context.Context, id string, b []byte) error {
	if f.down.Load() {
		return errDown
	}
	return f.Store.CreateStudy(ctx, id, b)
}

func (f *flakyStore) AddSubmission(ctx context.Context, study, name string, b []byte) (bool, error) {
	if f.down.Load() {
		return false, errDown
	}
	return f.Store.AddSubmission(ctx, study, name, b)
}

func (f *flakyStore) Submissions(ctx context.Context, study string) ([]string, error) {
	if f.down.Load() {
		return nil, errDown
	}
	return f.Store.Submissions(ctx, study)
}

// A store outage is unavailable (retry), and what was not acknowledged is not counted:
// the retry after the outage is counted once.
func TestStoreOutageUnavailable(t *testing.T) {
	pki := testpki.New(t, "example.org")
	key, err := he.NewClient(he.ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	dirStore, err := analytics.NewDirStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	store := &flakyStore{Store: dirStore}
	svc, err := analytics.New(analytics.WithStudyStore(store, time.Second))
	if err != nil {
		t.Fatal(err)
	}
	srv := pki.Serve(t, serverID, svc.Register, append(analytics.ServerOptions(he.ParamsN13()), rpc.WithPolicy(policy()))...)
	e := &env{pki: pki, srv: srv}
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	store.down.Store(true)
	err = a.CreateStudy(ctx, analytics.StudySpec{ID: "o", OwnerPatterns: []string{owners[0]}, Dimension: 2, Ranges: wide})
	wantCode(t, "create during an outage", err, connect.CodeUnavailable)
	store.down.Store(false)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "o", OwnerPatterns: []string{owners[0], owners[1]}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	recs := records(9, 10, 2)
	store.down.Store(true)
	_, err = e.owner(t, owners[0]).Submit(ctx, "o", "k", recs)
	wantCode(t, "submit during an outage", err, connect.CodeUnavailable)
	_, err = a.Close(ctx, "o")
	wantCode(t, "close during an outage", err, connect.CodeUnavailable)
	store.down.Store(false)
	if got, err := e.owner(t, owners[0]).Submit(ctx, "o", "k", recs); err != nil || got.Duplicate || got.Submissions != 1 {
		t.Fatalf("retry after the outage = %+v, %v", got, err)
	}
	recs2 := records(10, 10, 2)
	if _, err := e.owner(t, owners[1]).Submit(ctx, "o", "k", recs2); err != nil {
		t.Fatal(err)
	}
	store.down.Store(true)
	_, err = a.Result(ctx, "o")
	wantCode(t, "result during an outage", err, connect.CodeUnavailable)
	store.down.Store(false)
	check(t, closeAndResult(t, a, "o"), append(recs, recs2...), 2)
}
