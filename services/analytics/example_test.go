package analytics_test

import (
	"fmt"

	"github.com/veilrpc/veil/services/analytics"
)

// An owner's contribution: per-coordinate sums and sums of squares, or of all pairwise
// products for a covariance study. They are encrypted before they leave the owner.
func ExampleContribution() {
	records := [][]float64{{1, 2}, {3, 4}}
	sums, squares, _ := analytics.Contribution(records, 2, false)
	_, products, _ := analytics.Contribution(records, 2, true)
	fmt.Println(sums, squares, products)
	// Output: [4 6] [10 20] [10 14 14 20]
}

// Histogram counts per coordinate: bins [0,10), [10,20), [20,30]; values outside go to
// the first or last bin.
func ExampleHistogramCounts() {
	records := [][]float64{{-5, 10}, {10, 29.9}, {30, 31}}
	fmt.Println(analytics.HistogramCounts(records, []float64{0, 10, 20, 30}))
	// Output: [1 1 1 0 1 2]
}
