package rpc_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// TestHTTP3ReturningClientSkipsRetry: the Retry budget is global (the address of an
// Initial is unvalidated, so it cannot be per client), so one flooder makes every new
// client pay a Retry. A client that has connected before keeps the address-validation
// token the server sent it (NEW_TOKEN, RFC 9000 8.1.3) and presents it when it
// reconnects: the server then has a validated address and sends no Retry, however
// spent the budget is. Before the fix the client kept no token and paid a Retry on
// every reconnect during a flood.
func TestHTTP3ReturningClientSkipsRetry(t *testing.T) {
	e := transports[1].start(t, rpc.WithHTTP3AddressValidation(0, 1)) // rate 0: one handshake without Retry, then every new one gets one
	serverAuth := transport.AuthorizeID(spiffeid.RequireFromString(serverID))
	a := rpc.NewHTTPClient(identity(t, e.ca, e.dir, clientID), serverAuth, rpc.WithHTTP3())
	defer a.CloseIdleConnections()
	echo := func(c echov1connect.EchoServiceClient, what string) {
		t.Helper()
		res, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: what}))
		if err != nil || res.Msg.GetMessage() != what {
			t.Fatalf("%s: %v, %v", what, res, err)
		}
	}
	ca := echov1connect.NewEchoServiceClient(a, e.url, rpc.ClientOptions()...)
	echo(ca, "first connection")
	if got := metricValue(t, e, "veil_quic_retries_total", "side", "server"); got != 0 {
		t.Fatalf("first connection got %v Retries within the budget", got)
	}
	// A new client now pays a Retry: the budget is spent.
	b := rpc.NewHTTPClient(identity(t, e.ca, e.dir, clientID), serverAuth, rpc.WithHTTP3())
	defer b.CloseIdleConnections()
	echo(echov1connect.NewEchoServiceClient(b, e.url, rpc.ClientOptions()...), "new client")
	spent := metricValue(t, e, "veil_quic_retries_total", "side", "server")
	if spent == 0 {
		t.Fatal("a new client past the budget got no Retry")
	}
	// The first client reconnects (a new QUIC connection) with its token: no Retry.
	a.CloseIdleConnections()
	echo(ca, "reconnect")
	if got := metricValue(t, e, "veil_quic_retries_total", "side", "server"); got != spent {
		t.Fatalf("a returning client was sent %v Retries", got-spent)
	}
}

// TestHTTP3AutoFallbackKeepsSealingAndPQ: an on-path attacker who drops UDP forces an
// auto-mode client onto HTTP/2, and that is all it gains: the fallback is the same
// client's post-quantum mutual-TLS transport, under the same sealing round tripper, so
// the call is sealed, channel-bound and over X25519MLKEM768 as over HTTP/3.
func TestHTTP3AutoFallbackKeepsSealingAndPQ(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	e := transports[0].startWith(t, dir, ca, sealedServer(t, ca, dir)) // nothing on the UDP port
	reg := prometheus.NewRegistry()
	hc := sealedClient(t, e.ca, e.dir, clientID, transport.AuthorizeID(spiffeid.RequireFromString(serverID)),
		[]rpc.ClientOption{rpc.WithHTTP3Auto(200 * time.Millisecond), rpc.WithMetrics(reg)}, pqkex.WithChannelBinding())
	defer hc.CloseIdleConnections()
	c := echov1connect.NewEchoServiceClient(hc, e.url, rpc.ClientOptions()...)
	who, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "whoami"}))
	if err != nil {
		t.Fatal(err)
	}
	if want := clientID + " X25519MLKEM768 pq=true sealed=true bound=true"; who.Msg.GetMessage() != want {
		t.Fatalf("peer after fallback = %q, want %q", who.Msg.GetMessage(), want)
	}
	if v, _ := rpc.CounterValue(reg, "veil_rpc_http3_fallbacks_total", "side", "client"); v != 1 {
		t.Fatalf("fallbacks %v, want 1", v)
	}
}

// TestBootstrapProceduresOverBothTransports: on a server with bootstrap procedures (the
// CA's Join), a caller without a client certificate reaches exactly those, over HTTP/3
// as over HTTP/2: every other procedure, health included, is refused before routing.
func TestBootstrapProceduresOverBothTransports(t *testing.T) {
	overTransports(t, func(t *testing.T, tr transportCase) {
		e := tr.start(t, rpc.WithBootstrapProcedures(echov1connect.EchoServiceEchoProcedure))
		cfg := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true, CurvePreferences: []tls.CurveID{tls.X25519MLKEM768}} // no certificate
		var hc *http.Client
		if tr.name == "h3" {
			t3 := &http3.Transport{TLSClientConfig: cfg}
			defer t3.Close()
			hc = &http.Client{Transport: t3}
		} else {
			cfg.NextProtos = []string{"h2"}
			t2 := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}
			defer t2.CloseIdleConnections()
			hc = &http.Client{Transport: t2}
		}
		c := echov1connect.NewEchoServiceClient(hc, e.url, rpc.ClientOptions()...)
		ctx := context.Background()
		if res, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "join"})); err != nil || res.Msg.GetMessage() != "join" {
			t.Fatalf("bootstrap procedure without a certificate: %v, %v", res, err)
		}
		stream, err := c.EchoStream(ctx, connect.NewRequest(&echov1.EchoStreamRequest{Message: "s", Count: 1}))
		if err == nil {
			for stream.Receive() {
				t.Fatal("a non-bootstrap procedure streamed to a caller without a certificate")
			}
			err = stream.Err()
		}
		if connect.CodeOf(err) != connect.CodeUnauthenticated {
			t.Fatalf("non-bootstrap procedure without a certificate: %v", err)
		}
		health := grpchealth.NewClient(hc, e.url)
		if _, err := health.Check(ctx, &grpchealth.CheckRequest{}); connect.CodeOf(err) != connect.CodeUnauthenticated {
			t.Fatalf("health without a certificate: %v", err)
		}
	})
}

// TestHTTP3ServerCertificateRotation: the QUIC listener reads the server's certificate
// from the identity Source on every handshake, as the TCP one does (http3 clones the TLS
// configuration, which must not freeze the certificate): after a renewal, a new client's
// HTTP/3 handshake presents the new certificate without a restart.
func TestHTTP3ServerCertificateRotation(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	srvDir := filepath.Join(dir, "server")
	sid := spiffeid.RequireFromString(serverID)
	if err := ca.IssueFiles(sid, srvDir, time.Hour); err != nil {
		t.Fatal(err)
	}
	src, err := transport.LoadFiles(srvDir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := rpc.NewServer(src, rpc.WithHTTP3(), rpc.WithPolicy(rpc.NewPolicy().MustAllow("/veil.echo.v1.EchoService/*", clientID)))
	if err != nil {
		t.Fatal(err)
	}
	rpc.Register[echov1connect.EchoServiceHandler](srv, echov1connect.NewEchoServiceHandler, &testEcho{release: make(chan struct{})})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	url := "https://" + ln.Addr().String()
	serial := func() string {
		t.Helper()
		var st connState
		hc := rpc.NewHTTPClient(identity(t, ca, dir, clientID), transport.AuthorizeID(sid), rpc.WithHTTP3(), rpc.WithRoundTripper(st.wrap))
		defer hc.CloseIdleConnections()
		res, err := echov1connect.NewEchoServiceClient(hc, url, rpc.ClientOptions()...).Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
		if err != nil || res.Msg.GetMessage() != "hi" {
			t.Fatalf("Echo = %v, %v", res, err)
		}
		if st.proto != "HTTP/3.0" || st.tls == nil || len(st.tls.PeerCertificates) == 0 {
			t.Fatalf("protocol %s, TLS %v", st.proto, st.tls)
		}
		return st.tls.PeerCertificates[0].SerialNumber.String()
	}
	before := serial()
	if err := ca.IssueFiles(sid, srvDir, time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := src.Reload(); err != nil {
		t.Fatal(err)
	}
	want, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if want.Certificates[0].SerialNumber.String() == before {
		t.Fatal("the renewal kept the serial number")
	}
	if after := serial(); after != want.Certificates[0].SerialNumber.String() {
		t.Fatalf("after the renewal the HTTP/3 handshake presented serial %s (before %s), want %s", after, before, want.Certificates[0].SerialNumber)
	}
}

// TestHTTP3ServerRefusesBadClientCertificates: over QUIC, the server's own check of the
// client certificate holds by itself (the client here trusts any server, so nothing fails
// on its side): no certificate, or one from another CA, fails the call, and nothing
// reaches the handler.
func TestHTTP3ServerRefusesBadClientCertificates(t *testing.T) {
	e := transports[1].start(t)
	otherDir := t.TempDir()
	otherCA, err := pki.InitCA(filepath.Join(otherDir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	svid, err := identity(t, otherCA, otherDir, clientID).GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	foreign := tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, c := range svid.Certificates {
		foreign.Certificate = append(foreign.Certificate, c.Raw)
	}
	for name, certs := range map[string][]tls.Certificate{"no certificate": nil, "another CA's certificate": {foreign}} {
		t.Run(name, func(t *testing.T) {
			t3 := &http3.Transport{TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true,
				CurvePreferences: []tls.CurveID{tls.X25519MLKEM768}, Certificates: certs}}
			defer t3.Close()
			c := echov1connect.NewEchoServiceClient(&http.Client{Transport: t3}, e.url, rpc.ClientOptions()...)
			if res, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "hi"})); err == nil {
				t.Fatalf("served: %v", res.Msg)
			}
		})
	}
	if got := metricValue(t, e, "veil_rpc_requests_total", "transport", "h3"); got != 0 {
		t.Fatalf("%v requests reached the handler", got)
	}
	e.callH3(t) // a verified client is still served
}

// TestAltSvcDoesNotSteerClients: an Alt-Svc header, whoever wrote it (here the server's
// own middleware stands in for an intermediary that adds one), names another endpoint
// that serves HTTP/3 with a certificate the client would accept. No Veil client mode
// follows it: calls go to the URL's host and port only (auto mode probes HTTP/3 there and
// falls back to HTTP/2 there), so the decoy sees nothing.
func TestAltSvcDoesNotSteerClients(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	decoy := transports[1].startWith(t, dir, ca)
	decoyPort := decoy.udpAddr(t).Port
	alt := rpc.WithMiddleware(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Alt-Svc", fmt.Sprintf(`h3="127.0.0.1:%d"; ma=86400, h2="127.0.0.1:%d"; ma=86400`, decoyPort, decoyPort))
			next.ServeHTTP(w, r)
		})
	})
	target := transports[0].startWith(t, dir, ca, alt) // HTTP/2 only: nothing on its UDP port
	serverAuth := transport.AuthorizeID(spiffeid.RequireFromString(serverID))
	for _, mode := range []struct {
		name string
		opts []rpc.ClientOption
	}{{"h2", nil}, {"auto", []rpc.ClientOption{rpc.WithHTTP3Auto(200 * time.Millisecond)}}} {
		hc := rpc.NewHTTPClient(identity(t, ca, dir, clientID), serverAuth, mode.opts...)
		c := echov1connect.NewEchoServiceClient(hc, target.url, rpc.ClientOptions()...)
		for i := range 3 {
			res, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
			if err != nil || res.Msg.GetMessage() != "hi" {
				t.Fatalf("%s call %d: %v, %v", mode.name, i, res, err)
			}
			if i == 0 && !strings.Contains(res.Header().Get("Alt-Svc"), fmt.Sprint(decoyPort)) {
				t.Fatalf("the response carries no Alt-Svc to the decoy: %q", res.Header().Get("Alt-Svc"))
			}
		}
		hc.CloseIdleConnections()
	}
	// An HTTP/3-only client fails against the HTTP/2-only target rather than go elsewhere.
	h3 := rpc.NewHTTPClient(identity(t, ca, dir, clientID), serverAuth, rpc.WithHTTP3())
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := echov1connect.NewEchoServiceClient(h3, target.url).Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "x"})); err == nil {
		t.Fatal("HTTP/3-only call to an HTTP/2-only server succeeded")
	}
	for _, tr := range []string{"h2", "h3"} {
		if got := metricValue(t, decoy, "veil_rpc_requests_total", "transport", tr); got != 0 {
			t.Fatalf("the decoy served %v requests over %s", got, tr)
		}
	}
}

// TestHTTP3NoDatagramsExtendedConnectRefused: the server offers no QUIC or HTTP/3
// datagrams, so a verified client that asks for them gets no side channel past the stream
// limits and flow control. quic-go's server always advertises extended CONNECT (RFC 9220,
// the WebTransport upgrade); such a request reaches the ordinary handler chain and a
// procedure refuses it (Connect serves POST and GET only), so it opens no tunnel.
func TestHTTP3NoDatagramsExtendedConnectRefused(t *testing.T) {
	e := transports[1].start(t)
	cfg := transport.ClientConfig(identity(t, e.ca, e.dir, clientID), transport.WithAuthorizer(transport.AuthorizeID(spiffeid.RequireFromString(serverID))))
	cfg.NextProtos = []string{http3.NextProtoH3}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second) // a hang guard
	defer cancel()
	conn, err := quic.DialAddr(ctx, e.udpAddr(t).String(), cfg, &quic.Config{EnableDatagrams: true})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	if conn.ConnectionState().SupportsDatagrams.Remote {
		t.Fatal("the server accepts QUIC datagrams")
	}
	if err := conn.SendDatagram([]byte("x")); err == nil {
		t.Fatal("a datagram was sent")
	}
	cc := (&http3.Transport{EnableDatagrams: true}).NewClientConn(conn)
	select {
	case <-cc.ReceivedSettings():
	case <-ctx.Done():
		t.Fatal("no SETTINGS from the server")
	}
	if s := cc.Settings(); s.EnableDatagrams {
		t.Fatalf("server SETTINGS %+v", s)
	}
	for _, proto := range []string{"webtransport", "connect-udp", "websocket"} {
		req, err := http.NewRequestWithContext(ctx, http.MethodConnect, e.url+echov1connect.EchoServiceEchoProcedure, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Proto = proto
		res, err := cc.RoundTrip(req)
		if err != nil {
			t.Logf("extended CONNECT (%s): %v", proto, err)
			continue // refused at the stream: as good
		}
		_ = res.Body.Close()
		t.Logf("extended CONNECT (%s): %s", proto, res.Status)
		if res.StatusCode < 400 {
			t.Fatalf("extended CONNECT (%s) to a procedure: %s", proto, res.Status)
		}
	}
}
