package scoring_test

import (
	"fmt"

	"github.com/veilrpc/veil/services/scoring"
)

// Train a model on synthetic data from a fixed seed, as the demo does without files.
func ExampleTrain() {
	ds, _ := scoring.Synthetic(1, 500, 4)
	train, test, _ := ds.Split(0.2, 1)
	m, err := scoring.Train(train.X, train.Y, scoring.TrainOptions{})
	if err != nil {
		panic(err)
	}
	fmt.Printf("%d features, %d test samples, test accuracy %.2f\n", m.Features, test.Len(), m.Accuracy(test.X, test.Y))
	// Output: 4 features, 100 test samples, test accuracy 0.88
}
