package main

import (
	"context"
	"fmt"
	"io"

	"github.com/veilrpc/veil/services/scoring"
)

func runModel(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	sub := map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"train": runModelTrain,
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprintln(stderr, "Usage: veil model <train> [flags]\n\n  train  train a logistic-regression model for the scoring service (plaintext)")
		if len(args) == 0 {
			return fmt.Errorf("%w: veil model needs a subcommand", errUsage)
		}
		return nil
	}
	f, ok := sub[args[0]]
	if !ok {
		return fmt.Errorf("%w: unknown subcommand 'veil model %s'", errUsage, args[0])
	}
	return f(ctx, args[1:], stdout, stderr)
}

func runModelTrain(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("model train", "model train (--csv FILE | --synthetic N) [--out model.json] [--test-fraction 0.2] [--seed N] [--lambda L] [--json]", stderr)
	csvPath := fs.String("csv", "", "training data: header 'n_samples,n_features,...', then features and a 0/1 label per line (wdbc.csv)")
	synthetic := fs.Int("synthetic", 0, "train on N synthetic samples generated from --seed instead of --csv")
	features := fs.Int("features", 8, "features of the synthetic samples")
	out := fs.String("out", "model.json", "where to write the model (0600)")
	testFraction := fs.Float64("test-fraction", 0.2, "fraction of the samples held out for the test accuracy")
	seed := fs.Uint64("seed", 1, "seed of the train/test split (and of synthetic data): the same seed gives the same split")
	lambda := fs.Float64("lambda", scoring.DefaultLambda, "L2 penalty on the standardized weights (larger: smaller logits)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if (*csvPath == "") == (*synthetic == 0) {
		return fmt.Errorf("%w: veil model train needs exactly one of --csv and --synthetic", errUsage)
	}
	if !(*testFraction > 0 && *testFraction < 1) {
		return fmt.Errorf("%w: --test-fraction %v must lie strictly between 0 and 1", errUsage, *testFraction)
	}
	if *lambda < 0 {
		return fmt.Errorf("%w: --lambda must not be negative", errUsage)
	}
	var ds scoring.Dataset
	var err error
	source := *csvPath
	if *csvPath != "" {
		ds, err = scoring.ReadCSVFile(*csvPath)
	} else {
		if *synthetic < 2 || *features < 1 {
			return fmt.Errorf("%w: --synthetic needs at least 2 samples and --features at least 1", errUsage)
		}
		source = fmt.Sprintf("synthetic(seed=%d, n=%d, features=%d)", *seed, *synthetic, *features)
		ds, err = scoring.Synthetic(*seed, *synthetic, *features)
	}
	if err != nil {
		return err
	}
	train, test, err := ds.Split(*testFraction, *seed)
	if err != nil {
		return err
	}
	m, err := scoring.Train(train.X, train.Y, scoring.TrainOptions{Lambda: *lambda})
	if err != nil {
		return err
	}
	if err := m.Save(*out); err != nil {
		return err
	}
	res := map[string]any{
		"data":           source,
		"out":            *out,
		"features":       m.Features,
		"train_samples":  train.Len(),
		"test_samples":   test.Len(),
		"train_accuracy": m.Accuracy(train.X, train.Y),
		"test_accuracy":  m.Accuracy(test.X, test.Y),
		"logit_bound":    m.LogitBound,
		"lambda":         m.Lambda,
		"seed":           *seed,
	}
	return emit(stdout, *asJSON, res, func(w io.Writer) {
		fmt.Fprintf(w, "trained on %d samples of %d features from %s (seed %d, lambda %g)\n", train.Len(), m.Features, source, *seed, m.Lambda)
		fmt.Fprintf(w, "train accuracy %.4f, test accuracy %.4f on %d held-out samples\n", m.Accuracy(train.X, train.Y), m.Accuracy(test.X, test.Y), test.Len())
		fmt.Fprintf(w, "training logits within [-%.2f, %.2f] (with margin); wrote %s\n", m.LogitBound, m.LogitBound, *out)
	})
}
