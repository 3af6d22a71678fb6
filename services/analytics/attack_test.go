package analytics_test

import (
	"context"
	"testing"

	"connectrpc.com/connect"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/services/analytics"
)

// Finding 1 (differencing): the analyst reads the result after one owner and after
// two; the difference is the second owner's contribution.
func TestAttackDifferencing(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "diff", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.owner(t, owners[0]).Submit(ctx, "diff", "k", records(1, 10, 2)); err != nil {
		t.Fatal(err)
	}
	_, err := a.Result(ctx, "diff")
	if err == nil {
		t.Fatal("the analyst read a result holding one owner's submission")
	}
}

// Finding 3 (poisoned submission): a well-formed vector with a doubled scale.
func TestAttackPoisonedSubmission(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "poison", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.owner(t, owners[0]).Submit(ctx, "poison", "k", records(1, 10, 2)); err != nil {
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
	if _, err := analytics.New(analytics.WithStore(dir)); err != nil {
		t.Fatalf("restart: %v", err)
	}
}
