package pqkex_test

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/veilrpc/veil/pqkex"
)

func TestSessionRekey(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, echoMux())
	clk := &clock{now: testNow}
	tests := []struct {
		name           string
		policy         pqkex.RekeyPolicy
		advance        time.Duration
		calls          int
		wantHandshakes float64
	}{
		{"every two calls", pqkex.RekeyPolicy{Calls: 2}, 0, 5, 3},
		{"every few bytes", pqkex.RekeyPolicy{Bytes: 10}, 0, 3, 3},
		{"by age", pqkex.RekeyPolicy{Age: time.Minute}, 45 * time.Second, 4, 2},
		{"never by calls", pqkex.RekeyPolicy{Calls: -1}, 0, 4, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk.now = testNow
			reg := prometheus.NewRegistry()
			hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithRekeyPolicy(tt.policy), pqkex.WithMetrics(reg), pqkex.WithClock(clk.Now))
			for range tt.calls {
				if err := unaryCall(hc, ts.URL); err != nil {
					t.Fatal(err)
				}
				clk.now = clk.now.Add(tt.advance)
			}
			got := counter(t, reg, "veil_pqkex_handshakes_total", map[string]string{"side": "client", "result": "ok"})
			if got != tt.wantHandshakes {
				t.Errorf("handshakes = %v, want %v", got, tt.wantHandshakes)
			}
			rekeys := counter(t, reg, "veil_pqkex_rekeys_total", map[string]string{"side": "client", "kind": "session"})
			if rekeys != tt.wantHandshakes-1 {
				t.Errorf("session rekeys = %v, want %v", rekeys, tt.wantHandshakes-1)
			}
		})
	}
}

// TestStreamRekey sends long streams in both directions with a tiny in-stream rekey budget:
// the data must arrive intact across many REKEY frames from both sides.
func TestStreamRekey(t *testing.T) {
	for _, suite := range pqkex.Schemes() {
		t.Run(suite.Name(), func(t *testing.T) {
			e := newEnv(t, suite)
			policy := pqkex.WithRekeyPolicy(pqkex.RekeyPolicy{Stream: pqkex.StreamRekeyPolicy{Bytes: 200}})
			reg := prometheus.NewRegistry()
			ts := e.startServer(t, echoMux(), policy, pqkex.WithMetrics(reg))
			hc, _ := e.httpClient(t, e.transport(t, clientID), policy, pqkex.WithMetrics(reg))
			for _, p := range protocols {
				bs := connect.NewClient[str, str](hc, ts.URL+procBidi, p.opts...).CallBidiStream(context.Background())
				for i := range 12 {
					msg := strings.Repeat(string(rune('a'+i)), 100)
					if err := bs.Send(strMsg(msg)); err != nil {
						t.Fatal(err)
					}
					got, err := bs.Receive()
					if err != nil {
						t.Fatalf("%s message %d: %v", p.name, i, err)
					}
					if got.Value != "echo:"+msg {
						t.Fatalf("%s message %d = %q", p.name, i, got.Value)
					}
				}
				if err := bs.CloseRequest(); err != nil {
					t.Fatal(err)
				}
				if _, err := bs.Receive(); !errors.Is(err, io.EOF) {
					t.Fatalf("%s end of stream: %v", p.name, err)
				}
				_ = bs.CloseResponse()
			}
			for _, side := range []string{"client", "server"} {
				if n := counter(t, reg, "veil_pqkex_rekeys_total", map[string]string{"side": side, "kind": "stream"}); n < 3*4 {
					t.Errorf("%s stream rekeys = %v, want at least 12", side, n)
				}
			}
		})
	}
}

// TestStreamRekeyByAge: with only an age limit, a stream rekeys when the clock passes it.
func TestStreamRekeyByAge(t *testing.T) {
	e := newEnv(t, testSuite(t))
	var mu sync.Mutex
	now := testNow
	clk := func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return now
	}
	policy := pqkex.WithRekeyPolicy(pqkex.RekeyPolicy{Stream: pqkex.StreamRekeyPolicy{Bytes: -1, Age: time.Minute}})
	reg := prometheus.NewRegistry()
	ts := e.startServer(t, echoMux(), policy, pqkex.WithClock(clk))
	hc, _ := e.httpClient(t, e.transport(t, clientID), policy, pqkex.WithMetrics(reg), pqkex.WithClock(clk))
	bs := connect.NewClient[str, str](hc, ts.URL+procBidi).CallBidiStream(context.Background())
	for i := range 5 {
		if err := bs.Send(strMsg("m")); err != nil {
			t.Fatal(err)
		}
		if _, err := bs.Receive(); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		mu.Lock()
		now = now.Add(45 * time.Second)
		mu.Unlock()
	}
	_ = bs.CloseRequest()
	_ = bs.CloseResponse()
	// Sends at 0, 45, 90, 135, 180 s: the clock passes the minute before the sends at 90 and
	// 180 s (counting from the last rekey), so two rekeys.
	if n := counter(t, reg, "veil_pqkex_rekeys_total", map[string]string{"side": "client", "kind": "stream"}); n != 2 {
		t.Fatalf("client stream rekeys = %v, want 2", n)
	}
}
