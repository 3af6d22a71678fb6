package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// countingConn counts the bytes a connection moves in both directions.
type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n.Add(int64(n))
	return n, err
}

func (c countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.n.Add(int64(n))
	return n, err
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countingConn{c, l.n}, nil
}

// handshakeSuite compares full (not resumed) session setups, client and server in this
// process, handshakeConc at a time.
func handshakeSuite(cfg *config) (*Report, error) {
	e, err := newEnv()
	if err != nil {
		return nil, err
	}
	defer e.close()
	const conc = 2
	type system struct {
		sys   *System
		bytes *atomic.Int64
		// prepare returns n setups to run; what it builds (clients) is not measured.
		prepare func(n int) ([]func() error, error)
		stop    func()
	}
	var systems []*system
	defer func() {
		for _, s := range systems {
			s.stop()
		}
	}()

	// Raw TLS 1.3 mutual handshakes on loopback TCP: the server handshakes and closes.
	rawTLS := func(name, label string, curves []tls.CurveID) error {
		// Permissive, so that the classic system may offer X25519 alone.
		scfg := transport.ServerConfig(e.serverSrc, transport.WithPQMode(transport.PQPermissive))
		scfg.CurvePreferences = curves
		scfg.SessionTicketsDisabled = true
		ccfg := transport.ClientConfig(e.clientSrc, transport.WithPQMode(transport.PQPermissive),
			transport.WithAuthorizer(transport.AuthorizeID(spiffeid.RequireFromString(serverID))))
		ccfg.CurvePreferences = curves
		ccfg.ClientSessionCache = nil
		ln, err := listen()
		if err != nil {
			return err
		}
		counter := new(atomic.Int64)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					tc := tls.Server(c, scfg)
					_ = tc.Handshake()
					_ = tc.Close()
				}()
			}
		}()
		addr := ln.Addr().String()
		once := func() error {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				return err
			}
			tc := tls.Client(countingConn{c, counter}, ccfg)
			err = tc.Handshake()
			if err == nil && tc.ConnectionState().CurveID != curves[0] {
				err = fmt.Errorf("negotiated %v, want %v", tc.ConnectionState().CurveID, curves[0])
			}
			// Read the server's close_notify so its bytes count too.
			var b [1]byte
			_, _ = tc.Read(b[:])
			_ = tc.Close()
			return err
		}
		systems = append(systems, &system{sys: newSystem(name, label), bytes: counter, stop: func() { _ = ln.Close() },
			prepare: func(n int) ([]func() error, error) { return repeat(n, once), nil }})
		return nil
	}
	if err := rawTLS("classic", "classic mTLS 1.3 (X25519, ECDSA P-256)", []tls.CurveID{tls.X25519}); err != nil {
		return nil, err
	}
	if err := rawTLS("pqtls", "PQ mTLS 1.3 (X25519MLKEM768, ECDSA P-256)", []tls.CurveID{tls.X25519MLKEM768}); err != nil {
		return nil, err
	}

	// Veil: a new client (new connection, new pqkex client) making its first call.
	veil := func(name, label string, o veilOptions) error {
		counter := new(atomic.Int64)
		o.wrapListener = func(ln net.Listener) net.Listener { return countingListener{ln, counter} }
		srv, err := e.startVeil(o)
		if err != nil {
			return err
		}
		systems = append(systems, &system{sys: newSystem(name, label), bytes: counter, stop: srv.stop,
			prepare: func(n int) ([]func() error, error) {
				calls := make([]func() error, n)
				for i := range calls {
					hc, err := e.veilClient(o)
					if err != nil {
						return nil, err
					}
					c := echov1connect.NewEchoServiceClient(hc, srv.url, rpc.ClientOptions()...)
					calls[i] = func() error {
						defer hc.CloseIdleConnections()
						res, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "v"}))
						if err != nil {
							return err
						}
						return check(res.Msg.GetMessage(), "v")
					}
				}
				return calls, nil
			}})
		return nil
	}
	if err := veil("veil_http2", "PQ mTLS + HTTP/2 + first unsealed call (Veil client and server)", veilOptions{coalesce: true}); err != nil {
		return nil, err
	}
	if err := veil("veil", "Veil session setup: PQ mTLS + pqkex credential fetch and handshake + first sealed call", veilOptions{sealed: true, coalesce: true}); err != nil {
		return nil, err
	}

	run := func(s *system, n int) (time.Duration, time.Duration, error) {
		calls, err := s.prepare(n)
		if err != nil {
			return 0, 0, err
		}
		var wg sync.WaitGroup
		var next atomic.Int64
		var firstErr atomic.Value
		m := startMeter()
		for range conc {
			wg.Go(func() {
				for i := next.Add(1) - 1; i < int64(n); i = next.Add(1) - 1 {
					if err := calls[i](); err != nil {
						firstErr.CompareAndSwap(nil, err)
						return
					}
				}
			})
		}
		wg.Wait()
		wall, cpu, _ := m.stop()
		if err, ok := firstErr.Load().(error); ok {
			return 0, 0, err
		}
		return wall, cpu, nil
	}
	systems = selected(cfg, systems, func(s *system) (string, func()) { return s.sys.Name, s.stop })
	for _, s := range systems {
		if _, _, err := run(s, 20); err != nil {
			return nil, fmt.Errorf("%s warm-up: %w", s.sys.Name, err)
		}
	}
	n := cfg.handshakes
	for range cfg.reps {
		for _, s := range systems {
			runtime.GC()
			// Connections close asynchronously: let the previous system's finish.
			time.Sleep(50 * time.Millisecond)
			s.bytes.Store(0)
			wall, cpu, err := run(s, n)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.sys.Name, err)
			}
			time.Sleep(20 * time.Millisecond)
			s.sys.add("handshakes_per_s", float64(n)/wall.Seconds())
			s.sys.add("cpu_us_per_handshake", float64(cpu.Microseconds())/float64(n))
			s.sys.add("bytes_per_handshake", float64(s.bytes.Load())/float64(n))
			cfg.logf("handshake %-10s %7.0f /s cpu %7.0f us bytes %6.0f", s.sys.Name, float64(n)/wall.Seconds(), float64(cpu.Microseconds())/float64(n), float64(s.bytes.Load())/float64(n))
		}
	}
	rep := newReport("handshake")
	rep.Config = map[string]any{
		"handshakes_per_round": n, "concurrent": conc, "reps": cfg.reps, "resumption": "off (full handshakes)",
		"certificates": "ECDSA P-256 SPIFFE X.509-SVIDs, chain of one leaf under the root",
		"cpu":          "process CPU (client and server together) from getrusage",
		"bytes":        "TCP payload both directions, counted on one side",
	}
	for _, s := range systems {
		rep.Systems = append(rep.Systems, s.sys)
	}
	classic := rep.system("classic")
	rep.ratio("veil_vs_classic_cpu_per_handshake", rep.system("veil"), "cpu_us_per_handshake", classic, "cpu_us_per_handshake")
	rep.ratio("pqtls_vs_classic_cpu_per_handshake", rep.system("pqtls"), "cpu_us_per_handshake", classic, "cpu_us_per_handshake")
	rep.ratio("veil_vs_pq_http2_cpu_per_handshake", rep.system("veil"), "cpu_us_per_handshake", rep.system("veil_http2"), "cpu_us_per_handshake")
	rep.Notes = append(rep.Notes, "classic and pqtls are bare TLS handshakes; veil and veil_http2 are a new client's first call, so they also pay for HTTP/2 connection setup, the call itself and closing; veil minus veil_http2 is what pqkex adds (credential fetch and verify, one-round-trip handshake, sealing)")
	return rep, nil
}

func repeat(n int, f func() error) []func() error {
	fs := make([]func() error, n)
	for i := range fs {
		fs[i] = f
	}
	return fs
}
