package scoring

import (
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"strconv"
)

// Dataset is a labelled set of samples: X[i] holds sample i's features, Y[i] its
// label (0 or 1).
type Dataset struct {
	X [][]float64
	Y []int
}

// Len returns the number of samples.
func (d Dataset) Len() int { return len(d.X) }

// ReadCSVFile reads a dataset in the scikit-learn bundled format (see ReadCSV).
func ReadCSVFile(path string) (Dataset, error) {
	f, err := os.Open(path)
	if err != nil {
		return Dataset{}, fmt.Errorf("scoring: %w", err)
	}
	defer f.Close()
	return ReadCSV(f)
}

// ReadCSV reads a dataset in the format scikit-learn bundles (wdbc.csv): a header
// line "n_samples,n_features,..." then one line per sample, its features then a 0/1
// label. The header's counts are checked against the rows.
func ReadCSV(r io.Reader) (Dataset, error) {
	cr := csv.NewReader(r)
	cr.FieldsPerRecord = -1
	head, err := cr.Read()
	if err != nil {
		return Dataset{}, fmt.Errorf("scoring: csv header: %w", err)
	}
	if len(head) < 2 {
		return Dataset{}, errors.New("scoring: csv header needs n_samples,n_features")
	}
	n, err1 := strconv.Atoi(head[0])
	d, err2 := strconv.Atoi(head[1])
	if err1 != nil || err2 != nil || n < 1 || d < 1 || d > maxFeatures {
		return Dataset{}, fmt.Errorf("scoring: csv header %q: want n_samples,n_features", head[:2])
	}
	var ds Dataset
	for line := 2; ; line++ {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return Dataset{}, fmt.Errorf("scoring: csv: %w", err)
		}
		if len(rec) != d+1 {
			return Dataset{}, fmt.Errorf("scoring: csv line %d has %d fields, want %d", line, len(rec), d+1)
		}
		x := make([]float64, d)
		for j := range d {
			if x[j], err = strconv.ParseFloat(rec[j], 64); err != nil || !finite(x[j]) {
				return Dataset{}, fmt.Errorf("scoring: csv line %d field %d: not a finite number", line, j+1)
			}
		}
		label, err := strconv.Atoi(rec[d])
		if err != nil || (label != 0 && label != 1) {
			return Dataset{}, fmt.Errorf("scoring: csv line %d: label %q is not 0 or 1", line, rec[d])
		}
		ds.X = append(ds.X, x)
		ds.Y = append(ds.Y, label)
	}
	if ds.Len() != n {
		return Dataset{}, fmt.Errorf("scoring: csv header says %d samples, file has %d", n, ds.Len())
	}
	return ds, nil
}

// Split shuffles the samples with a PRNG seeded by seed and returns the first
// round(testFraction*n) as the test set and the rest as the training set. The same
// seed always gives the same split.
func (d Dataset) Split(testFraction float64, seed uint64) (train, test Dataset, err error) {
	if !(testFraction > 0 && testFraction < 1) {
		return Dataset{}, Dataset{}, fmt.Errorf("scoring: test fraction %v out of (0, 1)", testFraction)
	}
	nTest := int(math.Round(testFraction * float64(d.Len())))
	if nTest < 1 || nTest >= d.Len() {
		return Dataset{}, Dataset{}, fmt.Errorf("scoring: a test fraction of %v leaves an empty set of %d samples", testFraction, d.Len())
	}
	perm := rand.New(rand.NewPCG(seed, 0x7665696c)).Perm(d.Len())
	for k, i := range perm {
		dst := &train
		if k < nTest {
			dst = &test
		}
		dst.X = append(dst.X, d.X[i])
		dst.Y = append(dst.Y, d.Y[i])
	}
	return train, test, nil
}

// Synthetic returns n samples with the given number of features, generated from seed:
// two Gaussian classes whose means lie 3 standard deviations apart along a
// seed-chosen direction, on features of very different scales (as in real data). The
// same arguments give the same dataset. The best classifier is right about 93% of the
// time, so both classes and a spread of probabilities appear.
func Synthetic(seed uint64, n, features int) (Dataset, error) {
	if n < 2 || features < 1 || features > maxFeatures {
		return Dataset{}, fmt.Errorf("scoring: synthetic data needs n >= 2 and 1..%d features", maxFeatures)
	}
	rng := rand.New(rand.NewPCG(seed, 0x73796e74))
	shift := make([]float64, features)
	scale := make([]float64, features)
	offset := make([]float64, features)
	var norm float64
	for j := range features {
		shift[j] = rng.NormFloat64()
		norm += shift[j] * shift[j]
		scale[j] = math.Pow(10, rng.Float64()*3-1) // 0.1 .. 100
		offset[j] = rng.NormFloat64() * scale[j] * 3
	}
	// The class means lie 3 standard deviations apart along a random direction: the
	// best possible classifier is right with probability Phi(1.5), about 93%.
	for j := range shift {
		shift[j] *= 3 / math.Sqrt(norm)
	}
	var ds Dataset
	for range n {
		label := rng.IntN(2)
		x := make([]float64, features)
		for j := range x {
			v := rng.NormFloat64()
			if label == 1 {
				v += shift[j]
			}
			x[j] = offset[j] + scale[j]*v
		}
		ds.X = append(ds.X, x)
		ds.Y = append(ds.Y, label)
	}
	return ds, nil
}
