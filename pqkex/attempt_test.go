package pqkex_test

import (
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/veilrpc/veil/pqkex"
)

// TestForgedRefusalAfterExecution: a TLS-terminating proxy forwards a unary call, lets the
// handler run, and answers the client with a forged unknown_ticket refusal. The client
// cannot tell it from a real one (it is unauthenticated) and resends the request on a new
// session (spec 9). With a replay store for the procedure, the resend carries the same
// attempt (spec 6.4) and is refused as replayed: the handler has run once and the caller
// sees data_loss (the path tampered), never a success of a second execution. Without a
// store the handler runs twice, the limit docs/pqkex.md 6.4 states.
func TestForgedRefusalAfterExecution(t *testing.T) {
	for _, tc := range []struct {
		name     string
		opts     []pqkex.ServerOption
		wantRuns int64
		wantCode connect.Code // 0: success
	}{
		{"with a replay store", []pqkex.ServerOption{pqkex.WithReplayStore(&pqkex.MemoryReplayStore{}, nil)}, 1, connect.CodeDataLoss},
		{"without a store", nil, 2, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, pqkex.X25519MLKEM768())
			var runs atomic.Int64
			backend := e.startServer(t, countingEcho(&runs), tc.opts...)
			var mu sync.Mutex
			forge := false
			proxy, _ := e.startRewritingProxy(t, backend.URL, nil, func(r *http.Response) error {
				mu.Lock()
				defer mu.Unlock()
				if !forge || r.Header.Get("Veil-Pqkex-Sealed") == "" {
					return nil
				}
				forge = false // once: the resend gets the server's own answer
				// The server answered: the handler ran. Drop its answer, forge a refusal.
				_, _ = io.Copy(io.Discard, r.Body)
				_ = r.Body.Close()
				r.StatusCode, r.Status = http.StatusPreconditionFailed, "412 Precondition Failed"
				r.Header = http.Header{"Veil-Pqkex-Error": {"unknown_ticket"}, "Content-Type": {"application/json"}}
				r.Body = io.NopCloser(strings.NewReader(`{"code":"failed_precondition"}`))
				r.ContentLength = -1
				return nil
			})
			hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding())
			if err := unaryCall(hc, proxy.URL); err != nil { // a session, no forgery
				t.Fatal(err)
			}
			runs.Store(0)
			mu.Lock()
			forge = true
			mu.Unlock()
			err := unaryCall(hc, proxy.URL)
			if got := connect.CodeOf(err); (tc.wantCode == 0 && err != nil) || (tc.wantCode != 0 && got != tc.wantCode) {
				t.Fatalf("call after a forged refusal: %v, want code %v", err, tc.wantCode)
			}
			if runs.Load() != tc.wantRuns {
				t.Fatalf("the handler ran %d times, want %d", runs.Load(), tc.wantRuns)
			}
			if err == nil {
				return
			}
			if !strings.Contains(err.Error(), "replayed") {
				t.Fatalf("refusal %q does not name the replay", err)
			}
			// Calls after it run normally.
			if err := unaryCall(hc, proxy.URL); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestAttemptWindow: a server with a replay store refuses a call whose attempt time is
// more than AttemptWindow from its clock (a call held back, or a client whose clock is that
// far apart) as stale_attempt, before its handler runs; within the window the call runs
// (spec 6.4). Procedures without a store do not look at the attempt time.
func TestAttemptWindow(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	var runs atomic.Int64
	stored := e.startServer(t, countingEcho(&runs), pqkex.WithReplayStore(&pqkex.MemoryReplayStore{}, nil))
	plain := e.startServer(t, countingEcho(&runs))
	for _, tc := range []struct {
		name   string
		skew   time.Duration
		server string
		ok     bool
	}{
		{"in step", 0, stored.URL, true},
		{"just inside the window, behind", -pqkex.AttemptWindow + time.Minute, stored.URL, true},
		{"just inside the window, ahead", pqkex.AttemptWindow - time.Minute, stored.URL, true},
		{"behind by more than the window", -pqkex.AttemptWindow - time.Minute, stored.URL, false},
		{"ahead by more than the window", pqkex.AttemptWindow + time.Minute, stored.URL, false},
		{"behind, procedure without a store", -pqkex.AttemptWindow - time.Minute, plain.URL, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			skewed := func() time.Time { return testNow.Add(tc.skew) }
			hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithClock(skewed))
			before := runs.Load()
			err := unaryCall(hc, tc.server)
			if tc.ok {
				if err != nil || runs.Load() != before+1 {
					t.Fatalf("call: %v (handler ran %d times)", err, runs.Load()-before)
				}
				return
			}
			if connect.CodeOf(err) != connect.CodeDataLoss || !strings.Contains(err.Error(), "stale_attempt") || runs.Load() != before {
				t.Fatalf("call with a stale attempt: %v (handler ran %d times), want data_loss naming stale_attempt before the handler", err, runs.Load()-before)
			}
		})
	}
}

// countingEcho is echoMux counting the unary handler's runs.
func countingEcho(runs *atomic.Int64) http.Handler {
	mux := echoMux()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == procUnary {
			runs.Add(1)
		}
		mux.ServeHTTP(w, r)
	})
}
