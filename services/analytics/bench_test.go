package analytics_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/veilrpc/veil/services/analytics"
)

// benchStudy starts a durable service with a covariance study of dimension 5 and
// returns its analyst, one owner and the environment.
func benchStudy(b *testing.B) (*analytics.Analyst, *analytics.Owner, *env) {
	e, key := setup(b, b.TempDir())
	a := e.analyst(b, analyst, key)
	if err := a.CreateStudy(context.Background(), analytics.StudySpec{ID: "bench", OwnerPatterns: []string{owners[0], owners[1]}, Dimension: 5, Ranges: wide, Covariance: true}); err != nil {
		b.Fatal(err)
	}
	return a, e.owner(b, owners[0]), e
}

// BenchmarkSubmit measures one owner's submission of 200 records of dimension 5 with
// covariance: local sums, two public-key encryptions, the call, the server's
// additions and its atomic write.
func BenchmarkSubmit(b *testing.B) {
	_, o, _ := benchStudy(b)
	recs := records(1, 200, 5)
	i := 0
	for b.Loop() {
		i++
		if _, err := o.Submit(context.Background(), "bench", fmt.Sprint(i), recs); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkResult measures the analyst's fetch (the server's two scalar products) and
// the decryption of four vectors.
func BenchmarkResult(b *testing.B) {
	a, o, e := benchStudy(b)
	for _, o := range []*analytics.Owner{o, e.owner(b, owners[1])} {
		if _, err := o.Submit(context.Background(), "bench", "k", records(1, 200, 5)); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := a.Close(context.Background(), "bench"); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := a.Result(context.Background(), "bench"); err != nil {
			b.Fatal(err)
		}
	}
}
