package pqkex_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/veilrpc/veil/pqkex"
)

// router is an attacker between a pqkex client and two replicas sharing ticket keys (a
// TLS-terminating proxy has exactly these powers over sealed calls): it routes each sealed
// call of procUnary by a script, delivers it now, later or never, and may answer the client
// with a forged session refusal instead of the server's answer. Everything else goes to
// replica "a".
type router struct {
	base  http.RoundTripper
	hosts map[string]string
	mu    sync.Mutex
	steps []routeStep
	seen  []http.Header // the clear headers of each scripted call, as sent
	held  []*http.Request
}

type routeStep struct {
	to    string // replica the call goes to
	send  bool   // deliver it now
	hold  bool   // keep it, to deliver later (deliver)
	forge string // answer the client with this Veil-Pqkex-Error instead
	race  bool   // deliver the calls held back at the same time as this one (raced)
}

func (rt *router) RoundTrip(r *http.Request) (*http.Response, error) {
	var body []byte
	if r.Body != nil {
		var err error
		if body, err = io.ReadAll(r.Body); err != nil {
			return nil, err
		}
		_ = r.Body.Close()
	}
	rt.mu.Lock()
	step := routeStep{to: "a", send: true}
	if r.URL.Path == procUnary && len(rt.steps) > 0 {
		step, rt.steps = rt.steps[0], rt.steps[1:]
		rt.seen = append(rt.seen, r.Header.Clone())
	}
	rt.mu.Unlock()
	out := r.Clone(context.Background())
	out.URL.Host = rt.hosts[step.to]
	out.Host = ""
	out.Body, out.ContentLength = io.NopCloser(bytes.NewReader(body)), int64(len(body))
	out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	if step.hold {
		rt.mu.Lock()
		rt.held = append(rt.held, out)
		rt.mu.Unlock()
	}
	var resp *http.Response
	var raced sync.WaitGroup
	if step.race {
		rt.mu.Lock()
		held := rt.held
		rt.held = nil
		rt.mu.Unlock()
		for _, h := range held {
			raced.Go(func() {
				if r, err := rt.base.RoundTrip(h); err == nil {
					_, _ = io.Copy(io.Discard, r.Body)
					_ = r.Body.Close()
				}
			})
		}
	}
	if step.send {
		var err error
		resp, err = rt.base.RoundTrip(out)
		if err != nil {
			raced.Wait()
			return nil, err
		}
	}
	raced.Wait()
	if step.forge == "" {
		return resp, nil
	}
	if resp != nil {
		// The server answered (its handler ran): the attacker drops the answer.
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
	}
	return &http.Response{
		StatusCode: http.StatusPreconditionFailed, Status: "412 Precondition Failed",
		Proto: "HTTP/2.0", ProtoMajor: 2,
		Header:        http.Header{"Veil-Pqkex-Error": {step.forge}, "Content-Type": {"application/json"}},
		Body:          io.NopCloser(strings.NewReader(`{"code":"failed_precondition"}`)),
		ContentLength: -1, Request: r,
	}, nil
}

func (rt *router) script(steps ...routeStep) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.steps, rt.seen = steps, nil
}

// deliver sends the calls held back, in order, and returns each one's Veil-Pqkex-Error.
func (rt *router) deliver(t *testing.T) []string {
	t.Helper()
	rt.mu.Lock()
	held := rt.held
	rt.held = nil
	rt.mu.Unlock()
	var refusals []string
	for _, r := range held {
		resp, err := rt.base.RoundTrip(r)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		refusals = append(refusals, resp.Header.Get("Veil-Pqkex-Error"))
	}
	return refusals
}

// replicaPair starts two replicas sharing ticket keys (and store, when not nil), both
// counting the unary handler's runs in runs, and a router between them and a client.
func replicaPair(t *testing.T, e *env, runs *atomic.Int64, store pqkex.ReplayStore, opts ...pqkex.ServerOption) (*router, *http.Client, string) {
	t.Helper()
	shared := sharedTicketKeys(t)
	if store != nil {
		opts = append(opts, pqkex.WithReplayStore(store, nil))
	}
	a := e.startServer(t, countingEcho(runs), append([]pqkex.ServerOption{pqkex.WithTicketKeys(shared())}, opts...)...)
	b := e.startServer(t, countingEcho(runs), append([]pqkex.ServerOption{pqkex.WithTicketKeys(shared())}, opts...)...)
	rt := &router{base: e.transport(t, clientID), hosts: map[string]string{"a": hostOf(t, a.URL), "b": hostOf(t, b.URL)}}
	hc, _ := e.httpClient(t, rt, pqkex.WithoutChannelBinding())
	return rt, hc, a.URL
}

func hostOf(t *testing.T, u string) string {
	t.Helper()
	r, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r.URL.Host
}

// TestForgedRefusalChainAcrossReplicas: the longest chain of resends a proxy can draw from
// one unary call. The call goes in the short form (6.6) to replica a, which runs it; the
// proxy forges unknown_session, so the client resends the same sealed request with the
// ticket, which the proxy delivers to replica b (whose window never saw it); it forges
// unknown_ticket on b's answer, so the client makes a new session and resends once more,
// to a. With a shared replay store the three deliveries carry one attempt and the handler
// runs once (the caller sees data_loss naming the replay). Without a store it runs three
// times and the caller sees success: spec 6.4 and 9 (a replay to another replica, plus one
// session resend).
func TestForgedRefusalChainAcrossReplicas(t *testing.T) {
	for _, tc := range []struct {
		name  string
		store pqkex.ReplayStore
		runs  int64
	}{
		{"with a replay store", &pqkex.MemoryReplayStore{}, 1},
		{"without a store", nil, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, pqkex.X25519MLKEM768())
			var runs atomic.Int64
			rt, hc, url := replicaPair(t, e, &runs, tc.store)
			if err := unaryCall(hc, url); err != nil { // a session that a holds: the short form next
				t.Fatal(err)
			}
			runs.Store(0)
			rt.script(routeStep{to: "a", send: true, forge: "unknown_session"},
				routeStep{to: "b", send: true, forge: "unknown_ticket"},
				routeStep{to: "a", send: true})
			err := unaryCall(hc, url)
			rt.mu.Lock()
			seen := rt.seen
			rt.mu.Unlock()
			if len(seen) != 3 || seen[0].Get("Veil-Pqkex-Session") == "" || seen[1].Get("Veil-Pqkex-Ticket") == "" ||
				seen[2].Get("Veil-Pqkex-Ticket") == "" || seen[1].Get("Veil-Pqkex-Ticket") == seen[2].Get("Veil-Pqkex-Ticket") {
				t.Fatalf("the client did not go short form, same session with the ticket, new session: %v", seen)
			}
			if runs.Load() != tc.runs {
				t.Fatalf("the handler ran %d times, want %d", runs.Load(), tc.runs)
			}
			if tc.store == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if connect.CodeOf(err) != connect.CodeDataLoss || !strings.Contains(err.Error(), "replayed") {
				t.Fatalf("call: %v, want data_loss naming the replay", err)
			}
		})
	}
}

// TestResendBeforeTheOriginal: the proxy holds a unary call back and forges unknown_ticket
// at once, so the client's resend (on a new session, with the same attempt) runs first and
// the caller sees its success; then the proxy delivers the original to the other replica.
// With a shared store the original is refused as replayed: the handler ran once. Without one
// it runs again (spec 6.4).
func TestResendBeforeTheOriginal(t *testing.T) {
	for _, tc := range []struct {
		name    string
		store   pqkex.ReplayStore
		refusal string
		runs    int64
	}{
		{"with a replay store", &pqkex.MemoryReplayStore{}, "replayed", 1},
		{"without a store", nil, "", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, pqkex.X25519MLKEM768())
			var runs atomic.Int64
			rt, hc, url := replicaPair(t, e, &runs, tc.store)
			rt.script(routeStep{to: "b", hold: true, forge: "unknown_ticket"}, routeStep{to: "a", send: true})
			if err := unaryCall(hc, url); err != nil {
				t.Fatalf("call: %v", err)
			}
			if runs.Load() != 1 {
				t.Fatalf("the resend ran the handler %d times, want 1", runs.Load())
			}
			if got := rt.deliver(t); len(got) != 1 || got[0] != tc.refusal || runs.Load() != tc.runs {
				t.Fatalf("the original, delivered late: refusal %q, handler ran %d times; want %q and %d", got, runs.Load(), tc.refusal, tc.runs)
			}
		})
	}
}

// TestResendRacingTheOriginal: the proxy holds a unary call back, forges unknown_ticket,
// and delivers the original to replica a at the same time as the client's resend (new
// session, same attempt) to replica b. With a shared store exactly one of the two runs,
// whichever the store records first: the caller sees that run's answer (success) or, if
// the original won, data_loss naming the replay. Without a store both run (spec 6.4).
func TestResendRacingTheOriginal(t *testing.T) {
	for _, tc := range []struct {
		name  string
		store pqkex.ReplayStore
		runs  int64
	}{
		{"with a replay store", &pqkex.MemoryReplayStore{}, 1},
		{"without a store", nil, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, pqkex.X25519MLKEM768())
			var runs atomic.Int64
			rt, hc, url := replicaPair(t, e, &runs, tc.store)
			rt.script(routeStep{to: "a", hold: true, forge: "unknown_ticket"}, routeStep{to: "b", send: true, race: true})
			err := unaryCall(hc, url)
			if runs.Load() != tc.runs {
				t.Fatalf("the handler ran %d times, want %d", runs.Load(), tc.runs)
			}
			if err != nil && (tc.store == nil || connect.CodeOf(err) != connect.CodeDataLoss || !strings.Contains(err.Error(), "replayed")) {
				t.Fatalf("call: %v, want success or (the original first) data_loss naming the replay", err)
			}
		})
	}
}

// TestStreamReplayedToAnotherReplica: a client-streaming call (never resent by the client,
// always with its ticket) recorded and replayed verbatim to the other replica is refused
// there as replayed when the procedure has a shared store: the attempt is in every request
// head, not only in resendable ones (spec 6.4).
func TestStreamReplayedToAnotherReplica(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	var runs atomic.Int64
	streamRuns := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == procClient {
				runs.Add(1)
			}
			next.ServeHTTP(w, r)
		})
	}
	shared := sharedTicketKeys(t)
	store := &pqkex.MemoryReplayStore{}
	a := e.startServer(t, streamRuns(echoMux()), pqkex.WithTicketKeys(shared()), pqkex.WithReplayStore(store, nil))
	b := e.startServer(t, streamRuns(echoMux()), pqkex.WithTicketKeys(shared()), pqkex.WithReplayStore(store, nil))
	base := e.transport(t, clientID)
	m := &mitm{base: base}
	hc, _ := e.httpClient(t, m, pqkex.WithoutChannelBinding())
	if err := clientStreamCall(hc, a.URL, "one", "two"); err != nil {
		t.Fatal(err)
	}
	rec := m.last()
	if !strings.HasSuffix(rec.url, procClient) || rec.header.Get("Veil-Pqkex-Ticket") == "" {
		t.Fatalf("last request %s is not the stream with its ticket", rec.url)
	}
	req, err := http.NewRequest(http.MethodPost, b.URL+procClient, bytes.NewReader(rec.body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header = rec.header.Clone()
	resp, err := base.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if got := resp.Header.Get("Veil-Pqkex-Error"); got != "replayed" || runs.Load() != 1 {
		t.Fatalf("stream replayed to the other replica: refusal %q, handler ran %d times", got, runs.Load())
	}
}

// forgetfulStore keeps each record exactly until its expiry, by clk: the least a
// ReplayStore may do (a NATS bucket's TTL, measured from a write that left slightly after
// the server's clock read, is this plus the write's latency).
type forgetfulStore struct {
	clk  *clock
	mu   sync.Mutex
	seen map[string]time.Time
}

func (s *forgetfulStore) Accept(_ context.Context, call []byte, expiry time.Time) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if exp, ok := s.seen[string(call)]; ok && s.clk.now.Before(exp) {
		return false, nil
	}
	if s.seen == nil {
		s.seen = map[string]time.Time{}
	}
	s.seen[string(call)] = expiry
	return true, nil
}

// TestAttemptAtTheEdgeOfItsRecord: a client whose clock is AttemptWindow ahead of the
// servers' makes a call on replica a; a proxy replays it to replica b at the instant its
// record (kept ReplayRecordLifetime from the call) may be gone. The attempt must be stale by
// then: the handler runs at most once (spec 6.4). Before the fix the window included its
// ends ("more than AttemptWindow" was stale), so a call exactly AttemptWindow ahead was
// accepted, its record could go at exactly AttemptWindow past its attempt time, which was
// still accepted, and the replay ran the handler again.
func TestAttemptAtTheEdgeOfItsRecord(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	clk := &clock{now: testNow}
	store := &forgetfulStore{clk: clk}
	var runs atomic.Int64
	shared := sharedTicketKeys(t)
	opts := []pqkex.ServerOption{pqkex.WithClock(clk.Now), pqkex.WithReplayStore(store, nil), pqkex.WithTicketLifetime(time.Hour)}
	a := e.startServer(t, countingEcho(&runs), append([]pqkex.ServerOption{pqkex.WithTicketKeys(shared())}, opts...)...)
	b := e.startServer(t, countingEcho(&runs), append([]pqkex.ServerOption{pqkex.WithTicketKeys(shared())}, opts...)...)
	base := e.transport(t, clientID)
	m := &mitm{base: base}
	ahead := func() time.Time { return testNow.Add(pqkex.AttemptWindow) }
	hc, _ := e.httpClient(t, m, pqkex.WithoutChannelBinding(), pqkex.WithClock(ahead))
	err := unaryCall(hc, a.URL)
	ran := runs.Load()
	if (err == nil) != (ran == 1) {
		t.Fatalf("call: %v, handler ran %d times", err, ran)
	}
	rec := m.last()
	clk.now = testNow.Add(pqkex.ReplayRecordLifetime)
	req, err := http.NewRequest(http.MethodPost, b.URL+procUnary, bytes.NewReader(rec.body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header = rec.header.Clone()
	resp, err := base.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if got := resp.Header.Get("Veil-Pqkex-Error"); got != "stale_attempt" || runs.Load() != ran {
		t.Fatalf("replay when the record may be gone: refusal %q, handler ran %d times in all; want stale_attempt and %d", got, runs.Load(), ran)
	}
}

// TestForgedVersionHeaderStaysOutOfTheMessage: a handshake refusal is unauthenticated, and
// its `version` form puts the server's Veil-Pqkex-Version header in the caller's error
// message (spec 5.5, 9). A proxy that forges the refusal chooses that header: before the
// fix, any text up to the HTTP header limit (megabytes) reached the caller's error, and so
// its logs, as if pqkex had said it ("it speaks wire version <the proxy's words>"). Now a
// header that is not a list of at most 8 versions (decimal numbers 1 to 255) is shown as "?".
func TestForgedVersionHeaderStaysOutOfTheMessage(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	srv, err := pqkex.NewServer(pqkex.WithIdentity(e.server), pqkex.WithRoots(e.ca.Roots()), pqkex.WithClock(fixedClock))
	if err != nil {
		t.Fatal(err)
	}
	real := srv.Handler(echoMux())
	var versions string
	ts := e.serveTLS(t, serverID, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != pqkex.HandshakePath {
			real.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Veil-Pqkex-Error", "version")
		w.Header().Set("Veil-Pqkex-Version", versions)
		w.WriteHeader(http.StatusNotImplemented)
	}))
	const injected = "ALERT: credentials compromised, call +1-555-0100"
	for _, tc := range []struct {
		header, want string
	}{
		{"3,2", "speaks wire version 3,2,"},
		{injected, "speaks wire version ?,"},
		{strings.Repeat("9", 64<<10), "speaks wire version ?,"},
		{"3,2,1,4,5,6,7,8,9", "speaks wire version ?,"},
		{"256", "speaks wire version ?,"},
	} {
		versions = tc.header
		_, pc := e.httpClient(t, e.transport(t, clientID))
		err := pc.Handshake(context.Background(), e.transport(t, clientID), ts.URL)
		if connect.CodeOf(err) != connect.CodeUnavailable || !strings.Contains(err.Error(), tc.want) || len(err.Error()) > 256 {
			t.Errorf("Veil-Pqkex-Version %.40q: %.200v, want unavailable saying %q", tc.header, err, tc.want)
		}
	}
}

// TestIntermediaryStatusTextStaysOutOfTheMessage: an unsealed 429, 502, 503 or 504 is an
// intermediary's own error and reaches the caller as unavailable (spec 9). Over HTTP/1.1 its
// status line carries a reason phrase the proxy writes; before the fix the client put
// resp.Status, phrase and all, in the caller's error. Now the message names the code and
// its standard text only.
func TestIntermediaryStatusTextStaysOutOfTheMessage(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	srv, err := pqkex.NewServer(pqkex.WithIdentity(e.server), pqkex.WithRoots(e.ca.Roots()), pqkex.WithClock(fixedClock))
	if err != nil {
		t.Fatal(err)
	}
	real := srv.Handler(echoMux())
	const injected = "ALERT credentials compromised call +1-555-0100"
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != procUnary {
			real.ServeHTTP(w, r)
			return
		}
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		_, _ = buf.WriteString("HTTP/1.1 503 " + injected + "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		_ = buf.Flush()
	}))
	cfg, err := e.ca.ServerTLSConfig(serverID)
	if err != nil {
		t.Fatal(err)
	}
	cfg.NextProtos = []string{"http/1.1"}
	ts.TLS = cfg
	ts.StartTLS()
	t.Cleanup(ts.Close)
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding())
	err = unaryCall(hc, ts.URL)
	if connect.CodeOf(err) != connect.CodeUnavailable || strings.Contains(err.Error(), "ALERT") || !strings.Contains(err.Error(), "503 Service Unavailable") {
		t.Fatalf("call answered by an intermediary's 503: %v, want unavailable naming 503 Service Unavailable and nothing the proxy wrote", err)
	}
}
