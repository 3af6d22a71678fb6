package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/veilrpc/veil/services/scoring"
)

type scoreResult struct {
	Samples       int       `json:"samples"`
	Probabilities []float64 `json:"probabilities"`
	Accuracy      *float64  `json:"accuracy,omitempty"` // when the CSV has labels
	KeyBytes      int64     `json:"key_bytes"`
	KeyGenMillis  float64   `json:"key_gen_ms"`
	UploadMillis  float64   `json:"upload_ms"`
	ScoreMillis   float64   `json:"score_ms"`
	BytesSent     int64     `json:"bytes_sent"`
	BytesReceived int64     `json:"bytes_received"`
}

// runScore is the scoring client flow: generate CKKS keys for what the server's
// manifest asks, upload them (with a progress bar), encrypt the CSV's rows, have the
// server score them on ciphertexts, and decrypt the probabilities here.
func runScore(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("score", "score --identity DIR --addr URL --csv FILE [--server-id ID] [--pq-seal on|proxied|off] [--http3[=auto]] [--json]", stderr)
	identity := fs.String("identity", "", "identity directory (tls.crt, tls.key, ca.crt; pq.cred, pq.key for sealing)")
	addr := fs.String("addr", "", "scoring server base URL, e.g. https://127.0.0.1:8443")
	csvPath := fs.String("csv", "", "samples: a header line, then the features (and, optionally ignored for scoring, a 0/1 label) per line, as in wdbc.csv")
	serverID := fs.String("server-id", "", "SPIFFE ID the server must have (default: any ID in the identity's trust domain)")
	seal := addClientSeal(fs)
	asJSON := fs.Bool("json", false, "print the result as JSON")
	h3 := addHTTP3Flag(fs)
	tokens := addTokenClientFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "identity", "addr", "csv"); err != nil {
		return err
	}
	data, err := scoring.ReadCSVFile(*csvPath)
	if err != nil {
		return err
	}
	hc, _, err := newIdentityClient(*identity, *serverID, *seal, h3.options())
	if err != nil {
		return err
	}
	tokenOpts, _, err := tokens.options(*identity, *serverID, *seal)
	if err != nil {
		return err
	}
	var bars io.Writer
	if !*asJSON {
		bars = stderr
	}
	upload := newProgressBar(bars, "evaluation-key upload")
	encrypt := newProgressBar(bars, "encrypt and send")
	client, err := scoring.NewClient(ctx, hc, *addr, scoring.WithConnectOptions(tokenOpts...), scoring.WithProgress(func(p scoring.Progress) {
		switch p.Stage {
		case "upload":
			upload.set(p.Done, p.Total)
		case "encrypt":
			encrypt.set(p.Done, p.Total)
		}
	}))
	if err != nil {
		return err
	}
	if got, want := len(data.X[0]), client.Info().Features; got != want {
		return fmt.Errorf("%w: %s has %d features, the server's model %d", errUsage, *csvPath, got, want)
	}
	uploadTime, err := client.UploadKeys(ctx)
	if err != nil {
		return err
	}
	probs, st, err := client.Score(ctx, data.X)
	if err != nil {
		return err
	}
	res := scoreResult{
		Samples: len(probs), Probabilities: probs, KeyBytes: st.KeyBytes,
		KeyGenMillis: ms(st.KeyGen), UploadMillis: ms(uploadTime), ScoreMillis: ms(st.Total),
		BytesSent: st.BytesSent, BytesReceived: st.BytesReceived,
	}
	if len(data.Y) == len(probs) {
		right := 0
		for i, p := range probs {
			if (p >= 0.5) == (data.Y[i] == 1) {
				right++
			}
		}
		acc := float64(right) / float64(len(probs))
		res.Accuracy = &acc
	}
	return emit(stdout, *asJSON, res, func(w io.Writer) {
		for i, p := range probs {
			fmt.Fprintf(w, "%d\t%.4f\n", i, p)
		}
		fmt.Fprintf(stderr, "scored %d samples on ciphertexts in %s (keys %s, generated in %.0f ms, uploaded in %.0f ms)\n",
			res.Samples, st.Total.Round(time.Millisecond), fmtBytes(st.KeyBytes), res.KeyGenMillis, res.UploadMillis)
		if res.Accuracy != nil {
			fmt.Fprintf(stderr, "accuracy against the CSV's labels: %.2f%%\n", 100**res.Accuracy)
		}
	})
}
