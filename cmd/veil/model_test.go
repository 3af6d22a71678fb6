package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/veilrpc/veil/services/scoring"
)

func TestModelTrain(t *testing.T) {
	dir := t.TempDir()
	wdbc := os.Getenv("VEIL_WDBC") // default: the repository's copy (testdata/README.md)
	if wdbc == "" {
		wdbc = filepath.Join("..", "..", "testdata", "wdbc.csv")
	}
	out := filepath.Join(dir, "model.json")
	var stdout, stderr bytes.Buffer
	if err := runModel(context.Background(), []string{"train", "--csv", wdbc, "--out", out, "--seed", "1", "--json"}, &stdout, &stderr); err != nil {
		t.Fatalf("%v: %s", err, stderr.String())
	}
	var res struct {
		TrainSamples  int     `json:"train_samples"`
		TestSamples   int     `json:"test_samples"`
		TestAccuracy  float64 `json:"test_accuracy"`
		TrainAccuracy float64 `json:"train_accuracy"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("%v: %s", err, stdout.String())
	}
	if res.TrainSamples != 455 || res.TestSamples != 114 || res.TestAccuracy < 0.95 || res.TrainAccuracy < 0.95 {
		t.Fatalf("result %+v", res)
	}
	m, err := scoring.LoadModel(out)
	if err != nil || m.Features != 30 {
		t.Fatalf("model: %v", err)
	}

	stdout.Reset()
	if err := runModel(context.Background(), []string{"train", "--synthetic", "300", "--features", "4", "--out", out}, &stdout, &stderr); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(stdout.Bytes(), []byte("test accuracy")) {
		t.Fatalf("text output: %s", stdout.String())
	}

	for _, args := range [][]string{
		nil,
		{"fit"},
		{"train"},
		{"train", "--csv", wdbc, "--synthetic", "10"},
		{"train", "--csv", wdbc, "--test-fraction", "1"},
		{"train", "--synthetic", "10", "--lambda", "-1"},
		{"train", "--bogus"},
	} {
		if err := runModel(context.Background(), args, &stdout, &stderr); !errors.Is(err, errUsage) {
			t.Errorf("%q: err = %v, want a usage error", args, err)
		}
	}
	if err := runModel(context.Background(), []string{"train", "--help"}, &stdout, &stderr); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("--help: %v", err)
	}
	if err := runModel(context.Background(), []string{"train", "--csv", filepath.Join(dir, "missing.csv")}, &stdout, &stderr); err == nil || errors.Is(err, errUsage) {
		t.Errorf("missing file: %v", err)
	}
}
