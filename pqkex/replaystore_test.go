package pqkex

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
)

// TestSharedReplayStore replays the first vector's call to a second replica: with a shared
// ReplayStore for the procedure it is refused there (replayed) before the handler runs;
// without one, or for a procedure the store does not cover, it runs again (spec 6.4).
func TestSharedReplayStore(t *testing.T) {
	v, replicaOf, send := katReplicas(t)
	var runs atomic.Int64
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		runs.Add(1)
	})
	replica := func(opts ...ServerOption) http.Handler { return replicaOf(handler, opts...) }
	call := func(h http.Handler) string { return send(h).Header().Get(headerError) }
	store := &MemoryReplayStore{}
	covered := func(p string) bool { return p == v.Procedure }
	a, b := replica(WithReplayStore(store, covered)), replica(WithReplayStore(store, covered))
	if got := call(a); got != "" {
		t.Fatalf("first execution refused: %q", got)
	}
	if got := call(b); got != string(reasonReplayed) || runs.Load() != 1 {
		t.Fatalf("replay to the other replica: %q, handler ran %d times", got, runs.Load())
	}
	other := replica(WithReplayStore(store, func(string) bool { return false }))
	if got := call(other); got != "" || runs.Load() != 2 {
		t.Fatalf("procedure outside the store: %q", got)
	}
	broken := replica(WithReplayStore(failingStore{}, nil))
	if got := call(broken); got != string(reasonReplayStore) || runs.Load() != 2 || callRefusal(got).code != connect.CodeUnavailable {
		t.Fatalf("store failure: %q (handler ran %d times), want replay_store (unavailable)", got, runs.Load())
	}
}

type failingStore struct{}

func (failingStore) Accept(context.Context, []byte, time.Time) (bool, error) {
	return false, errors.New("store down")
}

// katReplicas prepares the first vector's sealed call, with its ticket, for replicas of its
// server: replica makes one (a Server on the vector's identity, roots, ticket keys and time)
// around a handler, call sends the call to one.
func katReplicas(t *testing.T) (v katVector, replica func(http.Handler, ...ServerOption) http.Handler, call func(http.Handler) *httptest.ResponseRecorder) {
	t.Helper()
	v = loadKAT(t)[0]
	suite := SchemeByName(v.Suite)
	keys := katKeysOf(t, v)
	sh, err := parseServerHello(v.ServerHello, suite, aeadByName(v.AEAD), helloFlags(v))
	if err != nil {
		t.Fatal(err)
	}
	replica = func(h http.Handler, opts ...ServerOption) http.Handler {
		opts = append(keys.serverOptions(v), opts...)
		s, err := NewServer(opts...)
		if err != nil {
			t.Fatal(err)
		}
		return s.Handler(h)
	}
	call = func(h http.Handler) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodPost, v.Procedure, bytes.NewReader(v.RequestBody))
		req.Header.Set(headerTicket, base64.RawURLEncoding.EncodeToString(sh.ticket))
		req.Header.Set("Content-Type", "application/proto") // the clear copy of the sealed one
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	return v, replica, call
}
