package rpc

import (
	"context"
	"io"
	"net/http"

	"github.com/veilrpc/veil/pqkex"
)

// Sealed unary requests in one DATA frame.
//
// The sealing round tripper turns a request body into a stream of frames (hello, data,
// final) of unknown length, and HTTP/2 writes and flushes one DATA frame per Read of the
// body, then an empty one to end the stream: four flushed frames, four TLS records, for
// a unary call whose whole body is in memory. When the caller's body is replayable
// (GetBody set, as connect-go sets it for unary calls) it is in memory, so reading the
// sealed body greedily cannot wait on the caller: below the sealing layer such a body is
// read until the buffer is full or the body ends, and the request leaves as one DATA
// frame carrying END_STREAM. Streaming calls (no GetBody) are left alone, since reading
// them greedily would hold back messages their peer is waiting for.

type bufferedBodyKey struct{}

// sealBatched composes sealing over base so that buffered request bodies are batched.
func sealBatched(s *pqkex.Client, base http.RoundTripper, batch bool) http.RoundTripper {
	if !batch {
		return s.RoundTripper(base)
	}
	return markBuffered{s.RoundTripper(greedyBodies{base})}
}

// markBuffered (above sealing) marks requests whose body is held in memory.
type markBuffered struct{ next http.RoundTripper }

func (m markBuffered) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.GetBody != nil && r.ContentLength > 0 {
		r = r.WithContext(context.WithValue(r.Context(), bufferedBodyKey{}, true))
	}
	return m.next.RoundTrip(r)
}

// greedyBodies (below sealing) reads marked requests' bodies greedily.
type greedyBodies struct{ next http.RoundTripper }

func (g greedyBodies) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Body != nil && r.Body != http.NoBody && r.Context().Value(bufferedBodyKey{}) != nil {
		r2 := *r
		r2.Body = greedyBody{r.Body}
		r = &r2
	}
	return g.next.RoundTrip(r)
}

type greedyBody struct{ io.ReadCloser }

// Read fills p unless the body ends or fails first.
func (b greedyBody) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		m, err := b.ReadCloser.Read(p[n:])
		n += m
		if err != nil || m == 0 {
			return n, err
		}
	}
	return n, nil
}
