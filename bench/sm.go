package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/pqkex/pqkextest"
)

// smSuite compares the ShangMi suite (SM2MLKEM768-SM3 with SM4-GCM) with the default suite
// (X25519MLKEM768-SHA256 with AES-256-GCM) in one run, interleaved round by round: the CPU of
// a pqkex handshake (both sides), the CPU of a sealed unary call, and the throughput of one
// sealed stream. Both run the same pqkex client and server over the same loopback HTTP/2
// mTLS connection pool, so the ratios are the suites' own difference.
func smSuite(cfg *config) (*Report, error) {
	ca, err := pqkextest.NewCA()
	if err != nil {
		return nil, err
	}
	type system struct {
		sys    *System
		client *pqkex.Client
		base   http.RoundTripper
		hc     *http.Client
		url    string
		stop   func()
	}
	now := time.Now()
	mk := func(name, label string, suite pqkex.Scheme) (*system, error) {
		sid, err := ca.Identity(suite, serverID, now.Add(-time.Hour), now.Add(24*time.Hour), nil)
		if err != nil {
			return nil, err
		}
		cid, err := ca.Identity(suite, clientID, now.Add(-time.Hour), now.Add(24*time.Hour), nil)
		if err != nil {
			return nil, err
		}
		ps, err := pqkex.NewServer(pqkex.WithIdentity(sid), pqkex.WithRoots(ca.Roots()), pqkex.RequireSuites(suite))
		if err != nil {
			return nil, err
		}
		ts := httptest.NewUnstartedServer(ps.Handler(http.HandlerFunc(smEcho)))
		ts.EnableHTTP2 = true
		if ts.TLS, err = ca.ServerTLSConfig(serverID); err != nil {
			return nil, err
		}
		ts.StartTLS()
		ccfg, err := ca.ClientTLSConfig(clientID)
		if err != nil {
			ts.Close()
			return nil, err
		}
		base := &http.Transport{TLSClientConfig: ccfg, ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 64}
		pc, err := pqkex.NewClient(pqkex.WithIdentity(cid), pqkex.WithRoots(ca.Roots()), pqkex.WithAuthorizer(pqkex.AuthorizeID(serverID)),
			pqkex.RequireSuites(suite), pqkex.WithChannelBinding())
		if err != nil {
			ts.Close()
			return nil, err
		}
		return &system{sys: newSystem(name, label), client: pc, base: base, hc: &http.Client{Transport: pc.RoundTripper(base)}, url: ts.URL,
			stop: func() { base.CloseIdleConnections(); ts.Close() }}, nil
	}
	def, err := mk("default", "X25519MLKEM768-SHA256 + AES-256-GCM (default suite)", pqkex.X25519MLKEM768())
	if err != nil {
		return nil, err
	}
	defer def.stop()
	sm, err := mk("sm", "SM2MLKEM768-SM3 + SM4-GCM (ShangMi suite)", pqkex.SM2MLKEM768())
	if err != nil {
		return nil, err
	}
	defer sm.stop()
	systems := selected(cfg, []*system{def, sm}, func(s *system) (string, func()) { return s.sys.Name, s.stop })

	ctx := context.Background()
	msg := bytes.Repeat([]byte("v"), cfg.msgSize)
	call := func(s *system) error {
		res, err := s.hc.Post(s.url+"/bench.v1.Echo/Echo", "application/proto", bytes.NewReader(msg))
		if err != nil {
			return err
		}
		defer res.Body.Close()
		got, err := io.ReadAll(res.Body)
		if err != nil {
			return err
		}
		if res.StatusCode != http.StatusOK || !bytes.Equal(got, msg) {
			return fmt.Errorf("echo: status %d, %d bytes", res.StatusCode, len(got))
		}
		return nil
	}
	const conc = 8
	calls := func(s *system, n int) (wall, cpu time.Duration, err error) {
		var next atomic.Int64
		var first atomic.Value
		var wg sync.WaitGroup
		m := startMeter()
		for range conc {
			wg.Go(func() {
				for next.Add(1) <= int64(n) {
					if err := call(s); err != nil {
						first.CompareAndSwap(nil, err)
						return
					}
				}
			})
		}
		wg.Wait()
		wall, cpu, _ = m.stop()
		if err, ok := first.Load().(error); ok {
			return 0, 0, err
		}
		return wall, cpu, nil
	}
	handshakes := func(s *system, n int) (time.Duration, error) {
		m := startMeter()
		for range n {
			if err := s.client.Handshake(ctx, s.base, s.url); err != nil {
				return 0, err
			}
		}
		_, cpu, _ := m.stop()
		return cpu, nil
	}
	streamBytes := int64(cfg.streamMiB) << 20
	stream := func(s *system) (time.Duration, error) {
		start := time.Now()
		res, err := s.hc.Post(s.url+"/bench.v1.Echo/Upload", "application/proto", io.LimitReader(zeros{}, streamBytes))
		if err != nil {
			return 0, err
		}
		defer res.Body.Close()
		got, err := io.ReadAll(res.Body)
		if err != nil {
			return 0, err
		}
		if res.StatusCode != http.StatusOK || string(got) != strconv.FormatInt(streamBytes, 10) {
			return 0, fmt.Errorf("upload: status %d, %q", res.StatusCode, got)
		}
		return time.Since(start), nil
	}

	for _, s := range systems { // warm-up: credentials fetched, connections open
		if _, err := handshakes(s, 5); err != nil {
			return nil, fmt.Errorf("%s warm-up: %w", s.sys.Name, err)
		}
		if _, _, err := calls(s, 200); err != nil {
			return nil, fmt.Errorf("%s warm-up: %w", s.sys.Name, err)
		}
	}
	n, nCalls := cfg.handshakes, 2000
	for range cfg.reps {
		for _, s := range systems {
			runtime.GC()
			cpu, err := handshakes(s, n)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.sys.Name, err)
			}
			s.sys.add("cpu_us_per_handshake", float64(cpu.Microseconds())/float64(n))
			runtime.GC()
			wall, ccpu, err := calls(s, nCalls)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.sys.Name, err)
			}
			s.sys.add("calls_per_s", float64(nCalls)/wall.Seconds())
			s.sys.add("cpu_us_per_call", float64(ccpu.Microseconds())/float64(nCalls))
			runtime.GC()
			swall, err := stream(s)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.sys.Name, err)
			}
			s.sys.add("mb_per_s", float64(streamBytes)/1e6/swall.Seconds())
			cfg.logf("sm %-8s handshake cpu %6.0f us  call cpu %5.0f us  %7.0f calls/s  stream %6.1f MB/s", s.sys.Name,
				float64(cpu.Microseconds())/float64(n), float64(ccpu.Microseconds())/float64(nCalls), float64(nCalls)/wall.Seconds(), float64(streamBytes)/1e6/swall.Seconds())
		}
	}
	rep := newReport("sm")
	rep.Config = map[string]any{
		"handshakes_per_round": n, "calls_per_round": nCalls, "concurrent_calls": conc, "msg_bytes": cfg.msgSize,
		"stream_mib": cfg.streamMiB, "reps": cfg.reps,
		"cpu": "process CPU (client and server together) from getrusage",
	}
	for _, s := range systems {
		rep.Systems = append(rep.Systems, s.sys)
	}
	d, m := rep.system("default"), rep.system("sm")
	rep.ratio("sm_vs_default_cpu_per_handshake", m, "cpu_us_per_handshake", d, "cpu_us_per_handshake")
	rep.ratio("sm_vs_default_cpu_per_call", m, "cpu_us_per_call", d, "cpu_us_per_call")
	rep.ratio("sm_vs_default_calls_per_s", m, "calls_per_s", d, "calls_per_s")
	rep.ratio("sm_vs_default_mb_per_s", m, "mb_per_s", d, "mb_per_s")
	rep.Notes = append(rep.Notes,
		"a handshake is pqkex's alone (Client.Handshake over an open HTTP/2 mTLS connection, channel-bound, credentials already verified), both sides: ML-KEM-768 with X25519 vs with SM2 ECDH, SHA-256 vs SM3",
		"a call is a sealed unary POST echoing msg_bytes over the same connections: per-call key derivation (HKDF-SHA256 vs HKDF-SM3) and AES-256-GCM vs SM4-GCM over both bodies",
		"the stream is one sealed request body of stream_mib MiB, read by the server: AEAD throughput (AES-256-GCM vs SM4-GCM, gmsm's SM4 with its assembly where the CPU has it) plus framing")
	return rep, nil
}

// smEcho is the sm suite's handler: Echo answers the request body, Upload its length.
func smEcho(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/proto")
	switch r.URL.Path {
	case "/bench.v1.Echo/Echo":
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		_, _ = w.Write(b)
	case "/bench.v1.Echo/Upload":
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		_, _ = io.WriteString(w, strconv.FormatInt(n, 10))
	default:
		http.NotFound(w, r)
	}
}

// zeros is an endless source of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
