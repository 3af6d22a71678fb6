package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pqkex"
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
	// With setup, each connection then carries one pqkex handshake (see pqkexOverTLS).
	rawTLS := func(name, label string, curves []tls.CurveID, setup afterTLS) error {
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
					if tc.Handshake() == nil && setup != nil {
						setup.serve(tc)
					}
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
			if err == nil && setup != nil {
				err = setup.handshake(tc, "https://"+addr)
				_ = tc.CloseWrite() // ends the server's record loop
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
	if err := rawTLS("classic", "classic mTLS 1.3 (X25519, ECDSA P-256)", []tls.CurveID{tls.X25519}, nil); err != nil {
		return nil, err
	}
	if err := rawTLS("pqtls", "PQ mTLS 1.3 (X25519MLKEM768, ECDSA P-256)", []tls.CurveID{tls.X25519MLKEM768}, nil); err != nil {
		return nil, err
	}
	setup, err := e.pqkexOverTLS()
	if err != nil {
		return nil, err
	}
	if err := rawTLS("veil_setup", "Veil session setup (the target): PQ mTLS 1.3 + channel-bound pqkex handshake on that connection, both sides, credentials already held", []tls.CurveID{tls.X25519MLKEM768}, setup); err != nil {
		return nil, err
	}
	// The same round trip with no pqkex in it: what the extra round trip alone costs.
	if err := rawTLS("pqtls_rtt", "PQ mTLS 1.3 + one record round trip of pqkex's sizes, no pqkex work (diagnostic)", []tls.CurveID{tls.X25519MLKEM768}, &roundTripOnly{}); err != nil {
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
	if err := veil("veil", "Veil new client's first sealed call: PQ mTLS + HTTP/2 + pqkex credential fetch and verification + handshake + the call", veilOptions{sealed: true, coalesce: true}); err != nil {
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
	// The target (docs/pqkex.md section 4): full Veil session setup (PQ TLS + pqkex, both
	// sides) <= 1.5x a classic mTLS handshake.
	rep.ratio("setup_vs_classic_cpu_per_handshake", rep.system("veil_setup"), "cpu_us_per_handshake", classic, "cpu_us_per_handshake")
	rep.ratio("pqtls_vs_classic_cpu_per_handshake", rep.system("pqtls"), "cpu_us_per_handshake", classic, "cpu_us_per_handshake")
	rep.ratio("setup_vs_pqtls_cpu_per_handshake", rep.system("veil_setup"), "cpu_us_per_handshake", rep.system("pqtls"), "cpu_us_per_handshake")
	rep.ratio("pqtls_rtt_vs_classic_cpu_per_handshake", rep.system("pqtls_rtt"), "cpu_us_per_handshake", classic, "cpu_us_per_handshake")
	// A new client's whole first call (not the target's figure: it adds HTTP/2, the
	// credential fetch and verification, and the call).
	rep.ratio("veil_vs_classic_cpu_per_handshake", rep.system("veil"), "cpu_us_per_handshake", classic, "cpu_us_per_handshake")
	rep.ratio("veil_vs_pq_http2_cpu_per_handshake", rep.system("veil"), "cpu_us_per_handshake", rep.system("veil_http2"), "cpu_us_per_handshake")
	rep.Notes = append(rep.Notes,
		"setup_vs_classic_cpu_per_handshake is the target's figure (<= 1.5): veil_setup is a PQ mTLS handshake plus a channel-bound pqkex handshake over that TLS connection (length-prefixed records, no HTTP), both sides, with each side already holding the other's verified credential, as after first contact (credentials live for hours); classic is a bare X25519 mTLS handshake; both include TCP connect and close",
		"pqtls_rtt is PQ mTLS plus one request and response of the sizes of a pqkex handshake (ClientHello, ServerHello) over the same record framing, with no pqkex work: veil_setup minus pqtls_rtt is pqkex's own CPU, pqtls_rtt minus pqtls the cost of the extra round trip",
		"veil_vs_classic_cpu_per_handshake is a new client's whole first call, not a handshake: veil and veil_http2 also pay for HTTP/2 connection setup, the call itself and closing, and veil for fetching and verifying the server's credential (ML-DSA-65 + ECDSA, once per server and credential lifetime); veil minus veil_http2 is what pqkex adds to a first call")
	return rep, nil
}

// afterTLS is what a raw TLS system does on each connection after the handshake.
type afterTLS interface {
	handshake(tc *tls.Conn, serverURL string) error // client side
	serve(tc *tls.Conn)                             // server side, until the client closes
}

// roundTripOnly sends one record of a ClientHello's size and answers with one of a
// ServerHello's (sizes of a channel-bound pqkex handshake on PQ TLS), doing nothing else.
type roundTripOnly struct{}

const (
	rttRequestBytes  = 5500 + 1200 // client credential and the encapsulation to the server key
	rttResponseBytes = 1100 + 1400 // the encapsulation to the client key and the ticket
)

func (roundTripOnly) handshake(tc *tls.Conn, _ string) error {
	if err := writeRecord(tc, http.MethodPost, pqkex.HandshakePath, make([]byte, rttRequestBytes)); err != nil {
		return err
	}
	_, _, body, err := readRecord(bufio.NewReader(tc))
	if err == nil && len(body) != rttResponseBytes {
		err = fmt.Errorf("bench: round trip answered %d bytes", len(body))
	}
	return err
}

func (roundTripOnly) serve(tc *tls.Conn) {
	r := bufio.NewReader(tc)
	for {
		if _, _, _, err := readRecord(r); err != nil {
			return
		}
		if err := writeRecord(tc, "200", "", make([]byte, rttResponseBytes)); err != nil {
			return
		}
	}
}

func repeat(n int, f func() error) []func() error {
	fs := make([]func() error, n)
	for i := range fs {
		fs[i] = f
	}
	return fs
}

// pqkexOverTLS runs pqkex handshakes over an established TLS connection without HTTP:
// each request and response is one length-prefixed record, so that the veil_setup system
// adds exactly the pqkex handshake (both sides, with its channel binding to the TLS
// connection) to a PQ mTLS handshake. The client and server are long-lived, as in a
// service: each holds the other's verified credential after the warm-up.
type pqkexOverTLS struct {
	client  *pqkex.Client
	handler http.Handler
}

func (e *env) pqkexOverTLS() (*pqkexOverTLS, error) {
	sid, roots, err := rpc.LoadSealingIdentity(e.serverDir)
	if err != nil {
		return nil, err
	}
	ps, err := pqkex.NewServer(pqkex.WithIdentity(sid), pqkex.WithRoots(roots), pqkex.WithChannelBinding())
	if err != nil {
		return nil, err
	}
	cid, roots, err := rpc.LoadSealingIdentity(e.clientDir)
	if err != nil {
		return nil, err
	}
	pc, err := pqkex.NewClient(pqkex.WithIdentity(cid), pqkex.WithRoots(roots),
		pqkex.WithAuthorizer(pqkex.AuthorizeID(serverID)), pqkex.WithChannelBinding())
	if err != nil {
		return nil, err
	}
	return &pqkexOverTLS{client: pc, handler: ps.Handler(http.NotFoundHandler())}, nil
}

// handshake runs one pqkex handshake over tc (client side).
func (p *pqkexOverTLS) handshake(tc *tls.Conn, serverURL string) error {
	return p.client.Handshake(context.Background(), recordTransport{tc, bufio.NewReader(tc)}, serverURL)
}

// serve answers pqkex requests on tc (server side) until the client closes it.
func (p *pqkexOverTLS) serve(tc *tls.Conn) {
	state := tc.ConnectionState()
	r := bufio.NewReader(tc)
	for {
		method, path, body, err := readRecord(r)
		if err != nil {
			return
		}
		req := &http.Request{Method: method, URL: &url.URL{Path: path}, RequestURI: path, Proto: "HTTP/2.0", ProtoMajor: 2,
			Header: http.Header{"Content-Type": {"application/octet-stream"}}, Body: io.NopCloser(bytes.NewReader(body)),
			ContentLength: int64(len(body)), TLS: &state, Host: "veil"}
		req = req.WithContext(context.Background())
		w := &recordWriter{h: http.Header{}, status: http.StatusOK}
		p.handler.ServeHTTP(w, req)
		if err := writeRecord(tc, strconv.Itoa(w.status), w.h.Get("Veil-Pqkex-Error"), w.body.Bytes()); err != nil {
			return
		}
	}
}

// A record is three u32-length-prefixed fields: method and path, then the body, for
// requests; status and error reason, then the body, for responses.
func writeRecord(w io.Writer, a, b string, body []byte) error {
	var out []byte
	for _, f := range [][]byte{[]byte(a), []byte(b), body} {
		out = binary.BigEndian.AppendUint32(out, uint32(len(f)))
		out = append(out, f...)
	}
	_, err := w.Write(out)
	return err
}

func readRecord(r io.Reader) (a, b string, body []byte, err error) {
	var fields [3][]byte
	for i := range fields {
		var n [4]byte
		if _, err := io.ReadFull(r, n[:]); err != nil {
			return "", "", nil, err
		}
		size := binary.BigEndian.Uint32(n[:])
		if size > 1<<20 {
			return "", "", nil, errors.New("bench: record too large")
		}
		fields[i] = make([]byte, size)
		if _, err := io.ReadFull(r, fields[i]); err != nil {
			return "", "", nil, err
		}
	}
	return string(fields[0]), string(fields[1]), fields[2], nil
}

type recordWriter struct {
	h      http.Header
	status int
	body   bytes.Buffer
}

func (w *recordWriter) Header() http.Header         { return w.h }
func (w *recordWriter) WriteHeader(code int)        { w.status = code }
func (w *recordWriter) Write(p []byte) (int, error) { return w.body.Write(p) }

// recordTransport is the client side: one request at a time over a TLS connection, read
// through a buffer as the server side is (fewer read syscalls).
type recordTransport struct {
	tc *tls.Conn
	br *bufio.Reader
}

func (t recordTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil {
		b, err := io.ReadAll(req.Body)
		_ = req.Body.Close()
		if err != nil {
			return nil, err
		}
		body = b
	}
	if err := writeRecord(t.tc, req.Method, req.URL.Path, body); err != nil {
		return nil, err
	}
	status, reason, rbody, err := readRecord(t.br)
	if err != nil {
		return nil, err
	}
	code, err := strconv.Atoi(status)
	if err != nil {
		return nil, err
	}
	h := http.Header{}
	if reason != "" {
		h.Set("Veil-Pqkex-Error", reason)
	}
	state := t.tc.ConnectionState()
	return &http.Response{StatusCode: code, Header: h, Body: io.NopCloser(bytes.NewReader(rbody)),
		ContentLength: int64(len(rbody)), TLS: &state, Request: req}, nil
}
