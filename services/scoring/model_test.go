package scoring_test

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/veilrpc/veil/services/scoring"
)

func TestTrainIsDeterministicAndRoundTrips(t *testing.T) {
	ds, err := scoring.ReadCSVFile(wdbcPath(t))
	if err != nil {
		t.Fatal(err)
	}
	tr1, te1, err := ds.Split(0.2, 42)
	if err != nil {
		t.Fatal(err)
	}
	tr2, te2, _ := ds.Split(0.2, 42)
	if !reflect.DeepEqual(te1, te2) || te1.Len() != 114 || tr1.Len() != 455 {
		t.Fatalf("split not deterministic or wrong sizes: %d/%d", tr1.Len(), te1.Len())
	}
	_, te3, _ := ds.Split(0.2, 43)
	if reflect.DeepEqual(te1.X, te3.X) {
		t.Fatal("different seeds gave the same split")
	}
	m1, err := scoring.Train(tr1.X, tr1.Y, scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m2, _ := scoring.Train(tr2.X, tr2.Y, scoring.TrainOptions{})
	if !reflect.DeepEqual(m1, m2) {
		t.Fatal("training is not deterministic")
	}
	if acc := m1.Accuracy(te1.X, te1.Y); acc < 0.95 {
		t.Errorf("test accuracy %.4f", acc)
	}
	// The bound covers every training logit with the margin.
	for _, x := range tr1.X {
		if l := m1.Logit(x); l > m1.LogitBound/scoring.LogitMargin+1e-9 || l < -m1.LogitBound/scoring.LogitMargin-1e-9 {
			t.Fatalf("training logit %g outside bound %g / margin", l, m1.LogitBound)
		}
	}
	// Folded weights give the same logits.
	w, b := m1.Folded()
	for _, x := range te1.X[:10] {
		z := b
		for j := range w {
			z += w[j] * x[j]
		}
		if d := z - m1.Logit(x); d > 1e-9 || d < -1e-9 {
			t.Fatalf("folded logit differs by %g", d)
		}
	}
	path := filepath.Join(t.TempDir(), "model.json")
	if err := m1.Save(path); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("model file mode %v", fi.Mode().Perm())
	}
	back, err := scoring.LoadModel(path)
	if err != nil || !reflect.DeepEqual(back, m1) {
		t.Fatalf("round trip: %v", err)
	}
}

func TestSyntheticIsDeterministicAndLearnable(t *testing.T) {
	a, err := scoring.Synthetic(5, 600, 8)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := scoring.Synthetic(5, 600, 8)
	c, _ := scoring.Synthetic(6, 600, 8)
	if !reflect.DeepEqual(a, b) || reflect.DeepEqual(a.X, c.X) {
		t.Fatal("synthetic data does not follow its seed")
	}
	tr, te, _ := a.Split(0.25, 1)
	m, err := scoring.Train(tr.X, tr.Y, scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if acc := m.Accuracy(te.X, te.Y); acc < 0.8 || acc > 0.995 {
		t.Errorf("synthetic test accuracy %.3f outside [0.8, 0.995]", acc)
	}
}

func TestBadInputs(t *testing.T) {
	for name, csv := range map[string]string{
		"short header": "5\n",
		"wrong count":  "2,2,a,b\n1,2,0\n",
		"bad label":    "1,2,a,b\n1,2,3\n",
		"bad number":   "1,2,a,b\n1,x,0\n",
		"wrong width":  "1,2,a,b\n1,0\n",
	} {
		if _, err := scoring.ReadCSV(strings.NewReader(csv)); err == nil || !strings.HasPrefix(err.Error(), "scoring: ") {
			t.Errorf("%s: err = %v", name, err)
		}
	}
	ds, _ := scoring.Synthetic(1, 10, 2)
	for _, f := range []float64{0, 1, -0.5, 0.01} {
		if _, _, err := ds.Split(f, 1); err == nil {
			t.Errorf("split %v accepted", f)
		}
	}
	if _, err := scoring.Train(ds.X, []int{0, 1}, scoring.TrainOptions{}); err == nil {
		t.Error("labels of the wrong length accepted")
	}
	bad := &scoring.Model{Version: 1, Features: 2, Weights: []float64{1}, Mean: []float64{0, 0}, Std: []float64{1, 1}, LogitBound: 1}
	if err := bad.Validate(); err == nil {
		t.Error("model with too few weights accepted")
	}
	if _, err := scoring.New(&scoring.Model{Version: 1, Features: 1, Weights: []float64{1}, Mean: []float64{0}, Std: []float64{0}, LogitBound: 1}); err == nil {
		t.Error("model with a zero std accepted")
	}
}
