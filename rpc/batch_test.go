package rpc

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"testing"
	"testing/iotest"
)

// greedyBody fills the buffer across many small reads and reports the end with the
// last bytes, so HTTP/2 sends them with END_STREAM.
func TestGreedyBodyFillsAndEndsTogether(t *testing.T) {
	want := bytes.Repeat([]byte("sealed frame "), 100)
	b := greedyBody{io.NopCloser(iotest.HalfReader(iotest.OneByteReader(bytes.NewReader(want))))}
	buf := make([]byte, 4*len(want))
	n, err := b.Read(buf)
	if n != len(want) || !errors.Is(err, io.EOF) || !bytes.Equal(buf[:n], want) {
		t.Fatalf("Read = %d, %v; want %d, EOF", n, err, len(want))
	}
	small := greedyBody{io.NopCloser(iotest.OneByteReader(bytes.NewReader(want)))}
	if n, err := small.Read(buf[:10]); n != 10 || err != nil {
		t.Fatalf("Read into 10 bytes = %d, %v", n, err)
	}
}

type recordBody struct{ got io.ReadCloser }

func (r *recordBody) RoundTrip(req *http.Request) (*http.Response, error) {
	r.got = req.Body
	return nil, errors.New("recorded")
}

// Only bodies marked as in memory (replayable) are read greedily below the marker;
// streaming bodies pass unchanged.
func TestBatchingOnlyBufferedBodies(t *testing.T) {
	for _, c := range []struct {
		name     string
		buffered bool
	}{{"unary", true}, {"stream", false}} {
		t.Run(c.name, func(t *testing.T) {
			rec := &recordBody{}
			// The sealing layer sits between the two; the context carries the mark.
			rt := markBuffered{roundTripFunc(func(r *http.Request) (*http.Response, error) {
				out := r.Clone(r.Context())
				out.Body, out.GetBody, out.ContentLength = io.NopCloser(bytes.NewReader([]byte("sealed"))), nil, -1
				return greedyBodies{rec}.RoundTrip(out)
			})}
			req, _ := http.NewRequestWithContext(context.Background(), http.MethodPost, "https://x/p", bytes.NewReader([]byte("plain")))
			if !c.buffered {
				req.GetBody = nil
			}
			_, _ = rt.RoundTrip(req)
			if _, greedy := rec.got.(greedyBody); greedy != c.buffered {
				t.Fatalf("greedy = %v, want %v", greedy, c.buffered)
			}
		})
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
