package rpc_test

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// transportCase is a wire transport the protocol tests run over: HTTP/2 over TCP, or
// HTTP/3 over QUIC (the server serving both, the client dialing HTTP/3 only).
type transportCase struct {
	name   string
	server []rpc.ServerOption
	client []rpc.ClientOption
}

var transports = []transportCase{
	{name: "h2"},
	{name: "h3", server: []rpc.ServerOption{rpc.WithHTTP3()}, client: []rpc.ClientOption{rpc.WithHTTP3()}},
}

func overTransports(t *testing.T, f func(*testing.T, transportCase)) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) { f(t, tr) })
	}
}

func (tr transportCase) start(t *testing.T, opts ...rpc.ServerOption) *env {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	return tr.startWith(t, dir, ca, opts...)
}

func (tr transportCase) startWith(t *testing.T, dir string, ca *pki.CA, opts ...rpc.ServerOption) *env {
	t.Helper()
	e := startWith(t, dir, ca, append(append([]rpc.ServerOption{}, tr.server...), opts...)...)
	e.copts = tr.client
	if tr.name == "h3" {
		e.waitQUIC(t)
		// Every call of the test went over QUIC: the h3-only client cannot fall back.
		t.Cleanup(func() {
			if h2 := metricValue(t, e, "veil_rpc_requests_total", "transport", "h2"); h2 != 0 {
				t.Errorf("%v requests came over HTTP/2 in an HTTP/3 test", h2)
			}
		})
	}
	return e
}

// connState records the protocol and TLS state of the client's last response.
type connState struct {
	mu    sync.Mutex
	proto string
	tls   *tls.ConnectionState
}

func (c *connState) wrap(next http.RoundTripper) http.RoundTripper {
	return roundTripFunc(func(r *http.Request) (*http.Response, error) {
		res, err := next.RoundTrip(r)
		if err == nil {
			c.mu.Lock()
			c.proto, c.tls = res.Proto, res.TLS
			c.mu.Unlock()
		}
		return res, err
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func TestHTTP3NextToHTTP2(t *testing.T) {
	e := start(t, rpc.WithHTTP3())
	e.waitQUIC(t)
	serverAuth := transport.AuthorizeID(spiffeid.RequireFromString(serverID))
	src := identity(t, e.ca, e.dir, clientID)
	for _, tc := range []struct {
		name      string
		opts      []rpc.ClientOption
		wantProto string
	}{
		{"h2", nil, "HTTP/2.0"},
		{"h3", []rpc.ClientOption{rpc.WithHTTP3()}, "HTTP/3.0"},
		{"auto", []rpc.ClientOption{rpc.WithHTTP3Auto(0)}, "HTTP/3.0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var st connState
			reg := prometheus.NewRegistry()
			hc := rpc.NewHTTPClient(src, serverAuth, append(tc.opts, rpc.WithRoundTripper(st.wrap), rpc.WithMetrics(reg))...)
			res, err := echov1connect.NewEchoServiceClient(hc, e.url, rpc.ClientOptions()...).Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
			if err != nil || res.Msg.GetMessage() != "hi" {
				t.Fatalf("Echo = %v, %v", res, err)
			}
			if st.proto != tc.wantProto {
				t.Fatalf("protocol %s, want %s", st.proto, tc.wantProto)
			}
			// The key exchange of the QUIC handshake is the post-quantum hybrid, seen on the
			// client's connection state.
			if st.tls == nil || st.tls.CurveID != tls.X25519MLKEM768 || st.tls.Version != tls.VersionTLS13 {
				t.Fatalf("TLS state %+v", st.tls)
			}
			if tc.name == "h2" {
				if alt := res.Header().Get("Alt-Svc"); !strings.HasPrefix(alt, `h3=":`) {
					t.Fatalf("Alt-Svc = %q", alt)
				}
			}
			if v, _ := rpc.CounterValue(reg, "veil_rpc_http3_fallbacks_total", "side", "client"); v != 0 {
				t.Fatalf("%v fallbacks with UDP open", v)
			}
		})
	}
	if h2, h3 := metricValue(t, e, "veil_rpc_requests_total", "transport", "h2"), metricValue(t, e, "veil_rpc_requests_total", "transport", "h3"); h2 != 1 || h3 != 2 {
		t.Fatalf("requests by transport: h2 %v, h3 %v; want 1 and 2", h2, h3)
	}
	// Both listeners shut down cleanly.
	e.cancel()
	err := <-e.done
	e.done <- err // for the cleanup
	if err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

// TestHTTP3RefusalsMatchHTTP2: a wrong server identity and an untrusted CA fail with the
// same code over both transports (an unauthorized procedure: TestPolicyDeniesByDefault).
func TestHTTP3RefusalsMatchHTTP2(t *testing.T) {
	e := transports[1].start(t)
	otherDir := t.TempDir()
	otherCA, err := pki.InitCA(filepath.Join(otherDir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		src  transport.Source
		auth transport.Authorizer
	}{
		{"wrong server identity", identity(t, e.ca, e.dir, clientID), transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/other"))},
		{"untrusted CA", identity(t, otherCA, otherDir, clientID), transport.AuthorizeID(spiffeid.RequireFromString(serverID))},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			codes := map[string]connect.Code{}
			for _, tr := range []struct {
				name string
				opts []rpc.ClientOption
			}{{"h2", nil}, {"h3", []rpc.ClientOption{rpc.WithHTTP3()}}, {"auto", []rpc.ClientOption{rpc.WithHTTP3Auto(0)}}} {
				reg := prometheus.NewRegistry()
				hc := rpc.NewHTTPClient(c.src, c.auth, append(tr.opts, rpc.WithMetrics(reg))...)
				_, err := echov1connect.NewEchoServiceClient(hc, e.url, rpc.ClientOptions()...).Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
				if err == nil {
					t.Fatalf("%s: call succeeded", tr.name)
				}
				codes[tr.name] = connect.CodeOf(err)
				// A TLS refusal is not a blocked UDP path: auto mode must not retry over HTTP/2.
				if v, _ := rpc.CounterValue(reg, "veil_rpc_http3_fallbacks_total", "side", "client"); v != 0 {
					t.Fatalf("%s: refusal counted as %v fallbacks", tr.name, v)
				}
			}
			if codes["h2"] != codes["h3"] || codes["h2"] != codes["auto"] {
				t.Fatalf("codes differ: %v", codes)
			}
		})
	}
}

// TestHTTP3AutoFallsBackWhenUDPIsBlocked: a server with HTTP/2 only has nothing on its
// UDP port; an auto client falls back, counts it once, and stays on HTTP/2.
func TestHTTP3AutoFallsBackWhenUDPIsBlocked(t *testing.T) {
	e := transports[0].start(t)
	var st connState
	reg := prometheus.NewRegistry()
	hc := rpc.NewHTTPClient(identity(t, e.ca, e.dir, clientID), transport.AuthorizeID(spiffeid.RequireFromString(serverID)),
		rpc.WithHTTP3Auto(200*time.Millisecond), rpc.WithMetrics(reg), rpc.WithRoundTripper(st.wrap))
	c := echov1connect.NewEchoServiceClient(hc, e.url, rpc.ClientOptions()...)
	for i := range 3 {
		res, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "body kept"}))
		if err != nil || res.Msg.GetMessage() != "body kept" {
			t.Fatalf("call %d: %v, %v", i, res, err)
		}
		if st.proto != "HTTP/2.0" {
			t.Fatalf("call %d over %s", i, st.proto)
		}
	}
	if v, _ := rpc.CounterValue(reg, "veil_rpc_http3_fallbacks_total", "side", "client"); v != 1 {
		t.Fatalf("fallbacks %v, want 1", v)
	}
	// An HTTP/3-only client does not fall back.
	h3only := rpc.NewHTTPClient(identity(t, e.ca, e.dir, clientID), transport.AuthorizeID(spiffeid.RequireFromString(serverID)), rpc.WithHTTP3())
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := echov1connect.NewEchoServiceClient(h3only, e.url).Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "x"})); err == nil {
		t.Fatal("HTTP/3-only call reached an HTTP/2-only server")
	}
}

// waitQUIC waits until the server's QUIC listener, which Serve opens after the TCP one,
// answers: it sends a padded long-header packet of a reserved version (RFC 9000 15:
// 0x?a?a?a?a) until the server answers with a Version Negotiation packet. The probe
// starts no handshake, so it spends no Retry budget and counts nothing. Raw datagrams
// sent before the listener is up are refused (ICMP), which the hostile-input tests would
// read as their own failure.
func (e *env) waitQUIC(t *testing.T) {
	t.Helper()
	probe := make([]byte, 1200)
	probe[0] = 0xc0
	copy(probe[1:], []byte{0x1a, 0x2a, 0x3a, 0x4a, 8, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 7, 6, 5, 4, 3, 2, 1})
	deadline := time.Now().Add(time.Minute) // a hang guard, not a timing expectation
	for {
		if answered(e.udpAddr(t), probe) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the server's QUIC listener never answered")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// answered reports whether addr answers probe with a Version Negotiation packet (a long
// header whose version is 0).
func answered(addr *net.UDPAddr, probe []byte) bool {
	c, err := net.DialUDP("udp", nil, addr)
	if err != nil {
		return false
	}
	defer c.Close()
	if _, err := c.Write(probe); err != nil {
		return false
	}
	buf := make([]byte, 1500)
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	n, err := c.Read(buf)
	return err == nil && n >= 5 && buf[0]&0x80 != 0 && buf[1]|buf[2]|buf[3]|buf[4] == 0
}

// udpAddr is the server's UDP address (the TCP port's number).
func (e *env) udpAddr(t *testing.T) *net.UDPAddr {
	t.Helper()
	a, err := net.ResolveUDPAddr("udp", strings.TrimPrefix(e.url, "https://"))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// clientInitials returns n first datagrams (QUIC Initial packets, each with its own
// connection ID) of real client handshakes, captured on a socket that never answers.
func clientInitials(t *testing.T, n int) [][]byte {
	t.Helper()
	sink, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	var out [][]byte
	for range n {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			_, _ = quic.DialAddr(ctx, sink.LocalAddr().String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{http3.NextProtoH3}, MinVersion: tls.VersionTLS13, CurvePreferences: []tls.CurveID{tls.X25519}}, nil) //nolint:gosec // captures a ClientHello only
		}()
		buf := make([]byte, 65536)
		for {
			k, _, err := sink.ReadFromUDP(buf)
			if err != nil {
				t.Fatal(err)
			}
			// The first packet of a handshake: long header, type Initial (QUIC v1).
			if buf[0]&0x80 != 0 && (buf[0]&0x30)>>4 == 0 {
				out = append(out, append([]byte(nil), buf[:k]...))
				break
			}
		}
		cancel()
		<-done
	}
	return out
}

// callH3 makes one unary call over HTTP/3 and fails the test if it does not succeed.
func (e *env) callH3(t *testing.T) {
	t.Helper()
	hc := rpc.NewHTTPClient(identity(t, e.ca, e.dir, clientID), transport.AuthorizeID(spiffeid.RequireFromString(serverID)), rpc.WithHTTP3())
	defer hc.CloseIdleConnections()
	res, err := echov1connect.NewEchoServiceClient(hc, e.url, rpc.ClientOptions()...).Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "still serving"}))
	if err != nil || res.Msg.GetMessage() != "still serving" {
		t.Fatalf("call after hostile input: %v, %v", res, err)
	}
}

func TestHTTP3HostileDatagrams(t *testing.T) {
	e := transports[1].start(t)
	initial := clientInitials(t, 1)[0]
	conn, err := net.DialUDP("udp", nil, e.udpAddr(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	garbage := make([]byte, 1400)
	_, _ = rand.Read(garbage)
	oversized := append(append([]byte(nil), initial...), make([]byte, 60000-len(initial))...)
	longGarbage := append([]byte{0xc0, 0, 0, 0, 1}, garbage[:1300]...) // long header, v1, then noise
	for _, c := range []struct {
		name string
		pkt  []byte
	}{
		{"garbage", garbage},
		{"one byte", []byte{0x40}},
		{"long-header garbage", longGarbage},
		{"truncated Initial (header only)", initial[:20]},
		{"truncated Initial (half)", initial[:len(initial)/2]},
		{"truncated Initial (one byte short)", initial[:len(initial)-1]},
		{"oversized Initial", oversized},
		{"Initial with a flipped payload byte", flip(initial, len(initial)-10)},
	} {
		t.Run(c.name, func(t *testing.T) {
			for range 50 {
				if _, err := conn.Write(c.pkt); err != nil {
					t.Fatal(err)
				}
			}
			e.callH3(t)
		})
	}
}

func flip(b []byte, i int) []byte {
	out := append([]byte(nil), b...)
	out[i] ^= 0xff
	return out
}

// TestHTTP3HandshakeFloodGetsRetry: past the handshake budget, a flood of Initials from
// many source ports gets stateless Retry packets (no connection state kept), and a real
// client still connects through the Retry.
func TestHTTP3HandshakeFloodGetsRetry(t *testing.T) {
	const flood, budget = 48, 8
	e := transports[1].start(t, rpc.WithHTTP3AddressValidation(0, budget)) // rate 0: exactly budget handshakes without Retry
	initials := clientInitials(t, flood)
	var retries, initialsBack int
	for _, pkt := range initials {
		c, err := net.DialUDP("udp", nil, e.udpAddr(t)) // a new source port each
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(pkt); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2048)
		_ = c.SetReadDeadline(time.Now().Add(30 * time.Second)) // a hang guard, not a measurement
		n, err := c.Read(buf)
		_ = c.Close()
		if err != nil {
			t.Fatalf("no answer to a flood Initial: %v", err)
		}
		switch {
		case n > 0 && buf[0]&0x80 != 0 && (buf[0]&0x30)>>4 == 3:
			retries++
		case n > 0 && buf[0]&0x80 != 0 && (buf[0]&0x30)>>4 == 0:
			initialsBack++
		}
	}
	if retries != flood-budget || initialsBack != budget {
		t.Fatalf("%d Retries and %d handshakes started, want %d and %d", retries, initialsBack, flood-budget, budget)
	}
	if got := metricValue(t, e, "veil_quic_retries_total", "side", "server"); got != flood-budget {
		t.Fatalf("veil_quic_retries_total = %v", got)
	}
	e.callH3(t)                                                                                     // gets a Retry too, and completes
	if got := metricValue(t, e, "veil_quic_retries_total", "side", "server"); got <= flood-budget { // one per Initial datagram of its ClientHello
		t.Fatalf("veil_quic_retries_total after a real client = %v", got)
	}
}

// TestHTTP3ClientThatNeverReads opens every stream the server allows with a stream
// call it never reads: the server refuses further streams on that connection (bounded
// state: stream count and flow-control windows) and keeps serving other clients.
func TestHTTP3ClientThatNeverReads(t *testing.T) {
	e := transports[1].start(t)
	tlsCfg := transport.ClientConfig(identity(t, e.ca, e.dir, clientID), transport.WithAuthorizer(transport.AuthorizeID(spiffeid.RequireFromString(serverID))))
	tlsCfg.NextProtos = []string{http3.NextProtoH3}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	conn, err := quic.DialAddr(ctx, e.udpAddr(t).String(), tlsCfg, &quic.Config{
		MaxIncomingStreams: -1,
		// Small per-stream windows (the server's sends block), and a connection window large
		// enough that every stream still gets its response headers.
		InitialStreamReceiveWindow: 64 << 10, MaxStreamReceiveWindow: 64 << 10,
		InitialConnectionReceiveWindow: 1 << 30, MaxConnectionReceiveWindow: 1 << 30,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	cc := (&http3.Transport{}).NewClientConn(conn)
	c := echov1connect.NewEchoServiceClient(&http.Client{Transport: cc}, e.url, rpc.ClientOptions()...)
	big := strings.Repeat("x", 4096) // 1000 of them (the validation limits) outgrow the flow-control window
	var streams []*connect.ServerStreamForClient[echov1.EchoStreamResponse]
	for range rpc.HTTP3MaxStreams {
		s, err := c.EchoStream(ctx, connect.NewRequest(&echov1.EchoStreamRequest{Message: big, Count: 1000}))
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s) // never read
	}
	// Every stream the server allows is open and unread; the next one is refused.
	if _, err := conn.OpenStream(); !errors.Is(err, &quic.StreamLimitReachedError{}) {
		t.Fatalf("stream beyond the server's limit: %v", err)
	}
	e.callH3(t)
	for _, s := range streams {
		_ = s.Close()
	}
}

// TestHTTP3ClassicOnlyRefused: under PQ strict, a QUIC ClientHello without a
// post-quantum group fails the handshake and is counted as over TCP.
func TestHTTP3ClassicOnlyRefused(t *testing.T) {
	e := transports[1].start(t)
	tlsCfg := transport.ClientConfig(identity(t, e.ca, e.dir, clientID), transport.WithAuthorizer(transport.AuthorizeID(spiffeid.RequireFromString(serverID))))
	tlsCfg.NextProtos = []string{http3.NextProtoH3}
	tlsCfg.CurvePreferences = []tls.CurveID{tls.X25519}
	conn, err := quic.DialAddr(context.Background(), e.udpAddr(t).String(), tlsCfg, nil)
	if err == nil {
		_ = conn.CloseWithError(0, "")
		t.Fatal("classic-only QUIC handshake succeeded under PQ strict")
	}
	if te, ok := errors.AsType[*quic.TransportError](err); !ok || !te.ErrorCode.IsCryptoError() || te.ErrorCode != 0x100+40 { // handshake_failure
		t.Fatalf("err = %v, want a handshake_failure alert", err)
	}
	if got := metricValue(t, e, "veil_tls_handshake_failures_total", "reason", string(transport.ReasonClassicOnly)); got != 1 {
		t.Fatalf("classic-only refusals counted %v, want 1", got)
	}
}

// TestHTTP3No0RTT: a client that resumes a QUIC session and offers early data gets a
// resumed handshake but no 0-RTT (early data could be replayed).
func TestHTTP3No0RTT(t *testing.T) {
	e := transports[1].start(t)
	tlsCfg := transport.ClientConfig(identity(t, e.ca, e.dir, clientID), transport.WithAuthorizer(transport.AuthorizeID(spiffeid.RequireFromString(serverID))))
	tlsCfg.NextProtos = []string{http3.NextProtoH3}
	ctx := context.Background()
	var states []quic.ConnectionState
	for range 2 {
		conn, err := quic.DialAddrEarly(ctx, e.udpAddr(t).String(), tlsCfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		// A call on the connection: the session ticket arrives before its answer.
		c := echov1connect.NewEchoServiceClient(&http.Client{Transport: (&http3.Transport{}).NewClientConn(conn)}, e.url, rpc.ClientOptions()...)
		if _, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "x"})); err != nil {
			t.Fatal(err)
		}
		states = append(states, conn.ConnectionState())
		_ = conn.CloseWithError(0, "")
	}
	if !states[1].TLS.DidResume {
		t.Fatal("the second connection did not resume: the test would not see 0-RTT refused")
	}
	if states[0].Used0RTT || states[1].Used0RTT {
		t.Fatal("0-RTT was accepted")
	}
}
