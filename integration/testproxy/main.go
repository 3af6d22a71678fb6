// Command testproxy is a TLS-terminating HTTP/2 reverse proxy for Veil's integration
// tests: it plays the sidecar or ingress that sits between client and server. It logs
// every request line and, base64-encoded, every body chunk it forwards, so tests can
// check what a proxy gets to see. With --strip it removes Veil's sealing headers, as a
// downgrading proxy would. Requests go to the upstream chosen last with
// "POST /_testproxy/route?to=N" (the first one until then), so a test can move a client
// from one replica to another in the middle of its session, and
// "POST /_testproxy/restart" drops every connection the proxy holds, as a crash and
// restart would, keeping its address.
package main

import (
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

type upstreams []*url.URL

func (u *upstreams) String() string { return fmt.Sprint(*u) }
func (u *upstreams) Set(s string) error {
	p, err := url.Parse(s)
	if err != nil {
		return err
	}
	*u = append(*u, p)
	return nil
}

var out = struct {
	sync.Mutex
	w io.Writer
}{w: os.Stdout}

func logf(format string, args ...any) {
	out.Lock()
	defer out.Unlock()
	fmt.Fprintf(out.w, format+"\n", args...)
}

type loggedBody struct {
	io.ReadCloser
	dir string
}

// bodyLine is the most body bytes one BODY line carries: 8 KiB encode to under 11 KiB,
// below the 16 KiB at which the Docker engine splits a line into partial messages (a
// line split that way can have another line put between its pieces).
const bodyLine = 8 << 10

func (b loggedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	for part := p[:n]; len(part) > 0; {
		k := min(len(part), bodyLine)
		logf("BODY %s %s", b.dir, base64.StdEncoding.EncodeToString(part[:k]))
		part = part[k:]
	}
	return n, err
}

// logWriter sends what the standard library logs (net/http's server and reverse proxy
// errors, log.Fatal) through logf: one stream, whole lines, never between the pieces
// of another line.
type logWriter struct{}

func (logWriter) Write(p []byte) (int, error) {
	logf("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func main() {
	listen := flag.String("listen", ":8443", "address to serve on")
	identity := flag.String("identity", "", "the proxy's identity directory")
	strip := flag.Bool("strip", false, "remove Veil-Pqkex-* request headers (a downgrading proxy)")
	failover := flag.Bool("failover", false, "when an upstream fails, route later requests to the next one (the failed request gets 502)")
	var ups upstreams
	flag.Var(&ups, "upstream", "upstream base URL; repeatable")
	tcpRelay := flag.String("tcp-relay", "", "only relay raw TCP from --listen to this host:port (no TLS termination, nothing on UDP: the path a firewall that drops UDP leaves)")
	log.SetOutput(logWriter{})
	flag.Parse()
	if *tcpRelay != "" {
		relayTCP(*listen, *tcpRelay)
		return
	}
	if *identity == "" || len(ups) == 0 {
		log.Fatal("testproxy: --identity and --upstream are required")
	}
	src, err := transport.LoadFiles(*identity)
	if err != nil {
		log.Fatal(err)
	}
	// Short keepalives: a killed upstream is noticed within seconds and its calls fail
	// with 502, as a real proxy's health checks would make them.
	upstreamTransport := rpc.NewHTTPClient(src, transport.AuthorizeAny(), rpc.WithKeepalive(time.Second, time.Second)).Transport
	var route atomic.Int64
	proxies := make([]*httputil.ReverseProxy, len(ups))
	for i, u := range ups {
		rp := httputil.NewSingleHostReverseProxy(u)
		rp.Transport = upstreamTransport
		rp.FlushInterval = -1
		rp.ModifyResponse = func(r *http.Response) error {
			r.Body = loggedBody{r.Body, "response"}
			return nil
		}
		rp.ErrorHandler = func(w http.ResponseWriter, r *http.Request, err error) {
			logf("UPSTREAM-ERROR upstream=%d %s: %v", i, r.URL.Path, err)
			// A client that went away is not the upstream's fault.
			if *failover && r.Context().Err() == nil && route.CompareAndSwap(int64(i), int64((i+1)%len(ups))) {
				logf("ROUTE upstream=%d (failover)", (i+1)%len(ups))
			}
			w.WriteHeader(http.StatusBadGateway)
		}
		proxies[i] = rp
	}
	restart := make(chan struct{}, 1)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/_testproxy/restart" {
			logf("RESTART")
			select {
			case restart <- struct{}{}:
			default:
			}
			return
		}
		if r.URL.Path == "/_testproxy/mark" {
			// A marker in the log: a test that sees it knows every line before it
			// has reached the container log.
			logf("MARK %s", strconv.Quote(r.URL.Query().Get("id")))
			return
		}
		if r.URL.Path == "/_testproxy/route" {
			n, err := strconv.Atoi(r.URL.Query().Get("to"))
			if err != nil || n < 0 || n >= len(proxies) {
				http.Error(w, "bad upstream", http.StatusBadRequest)
				return
			}
			route.Store(int64(n))
			logf("ROUTE upstream=%d", n)
			return
		}
		n := int(route.Load())
		if *strip {
			for k := range r.Header {
				if strings.HasPrefix(http.CanonicalHeaderKey(k), "Veil-Pqkex-") {
					r.Header.Del(k)
				}
			}
		}
		logf("REQUEST upstream=%d %s %s", n, r.Method, r.URL.Path)
		r.Body = loggedBody{r.Body, "request"}
		proxies[n].ServeHTTP(w, r)
	})
	logf("testproxy serving on %s (strip=%v, %d upstreams)", *listen, *strip, len(ups))
	for {
		srv := &http.Server{Addr: *listen, Handler: handler, TLSConfig: transport.ServerConfig(src)}
		ln, err := net.Listen("tcp", *listen)
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			<-restart
			time.Sleep(20 * time.Millisecond) // let the control call's answer leave
			upstreamTransport.(interface{ CloseIdleConnections() }).CloseIdleConnections()
			_ = srv.Close()
		}()
		if err := srv.ServeTLS(ln, "", ""); err != http.ErrServerClosed {
			log.Fatal(err)
		}
		logf("testproxy restarted")
	}
}

// relayTCP copies bytes between each connection accepted on listen and a connection to
// upstream, in both directions, until either side closes.
func relayTCP(listen, upstream string) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		log.Fatal(err)
	}
	logf("testproxy relaying tcp %s to %s", listen, upstream)
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			defer c.Close()
			u, err := net.Dial("tcp", upstream)
			if err != nil {
				logf("RELAY-ERROR %v", err)
				return
			}
			defer u.Close()
			done := make(chan struct{}, 2)
			go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
			go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
			<-done
		}()
	}
}
