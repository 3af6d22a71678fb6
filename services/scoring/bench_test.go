package scoring_test

import (
	"context"
	"testing"

	"github.com/veilrpc/veil/services/scoring"
)

// BenchmarkScoreWDBC scores the 114 wdbc test samples end to end over loopback mTLS
// (keys uploaded before the timer): client encryption of 30 ciphertexts, the server's
// linear layer on ParamsN13 (the encrypted logits), decryption and the sigmoid.
func BenchmarkScoreWDBC(b *testing.B) {
	ds, err := scoring.ReadCSVFile(wdbcPath(b))
	if err != nil {
		b.Fatal(err)
	}
	train, test, _ := ds.Split(0.2, 1)
	m, err := scoring.Train(train.X, train.Y, scoring.TrainOptions{})
	if err != nil {
		b.Fatal(err)
	}
	benchScore(b, m, test.X)
}

// BenchmarkScoreTwoBlocks scores 4096+37 synthetic samples of 3 features (two blocks).
func BenchmarkScoreTwoBlocks(b *testing.B) {
	ds, _ := scoring.Synthetic(7, 400+4096+37, 3)
	m, err := scoring.Train(ds.X[:400], ds.Y[:400], scoring.TrainOptions{})
	if err != nil {
		b.Fatal(err)
	}
	benchScore(b, m, ds.X[400:])
}

func benchScore(b *testing.B, m *scoring.Model, x [][]float64) {
	e := start(b, m)
	c := e.client(b, alice)
	ctx := context.Background()
	if _, err := c.UploadKeys(ctx); err != nil {
		b.Fatal(err)
	}
	var st scoring.Stats
	b.ResetTimer()
	for b.Loop() {
		var err error
		if _, st, err = c.Score(ctx, x); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(st.Encrypt.Milliseconds()), "encrypt-ms")
	b.ReportMetric(float64((st.Total - st.Encrypt - st.Decrypt).Milliseconds()), "server+wire-ms")
	b.ReportMetric(float64(st.Decrypt.Milliseconds()), "decrypt-ms")
	b.ReportMetric(float64(st.BytesSent), "sent-B")
	b.ReportMetric(float64(st.BytesReceived), "received-B")
}
