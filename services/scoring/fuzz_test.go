package scoring_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/veilrpc/veil/services/scoring"
)

// FuzzReadCSV: any input either parses into a consistent dataset or fails with a
// "scoring: " error; it never panics.
func FuzzReadCSV(f *testing.F) {
	f.Add("2,2,a,b\n1,2,0\n3.5,-4,1\n")
	f.Add("1,1,a,b\nNaN,0\n")
	f.Add("1,2\n1,2,3\n")
	f.Fuzz(func(t *testing.T, in string) {
		ds, err := scoring.ReadCSV(strings.NewReader(in))
		if err != nil {
			if !strings.HasPrefix(err.Error(), "scoring: ") {
				t.Fatalf("error without prefix: %v", err)
			}
			return
		}
		for i, x := range ds.X {
			if len(x) != len(ds.X[0]) || (ds.Y[i] != 0 && ds.Y[i] != 1) {
				t.Fatalf("inconsistent sample %d", i)
			}
		}
	})
}

// FuzzModelJSON: a model file that validates can be used without panicking.
func FuzzModelJSON(f *testing.F) {
	ds, _ := scoring.Synthetic(1, 50, 3)
	m, _ := scoring.Train(ds.X, ds.Y, scoring.TrainOptions{})
	b, _ := json.Marshal(m)
	f.Add(b)
	f.Add([]byte(`{"version":1,"features":1,"weights":[1],"bias":0,"mean":[0],"std":[0],"logit_bound":1}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		var m scoring.Model
		if json.NewDecoder(bytes.NewReader(in)).Decode(&m) != nil || m.Validate() != nil {
			return
		}
		x := make([]float64, m.Features)
		_ = m.Predict(x)
		_, _ = m.Folded()
	})
}
