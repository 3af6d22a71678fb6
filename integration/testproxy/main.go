// Command testproxy is a TLS-terminating HTTP/2 reverse proxy for Veil's integration
// tests: it plays the sidecar or ingress that sits between client and server. It logs
// every request line and, base64-encoded, every body chunk it forwards, so tests can
// check what a proxy gets to see. With --strip it removes Veil's sealing headers, as a
// downgrading proxy would. Requests go to the upstream chosen last with
// "POST /_testproxy/route?to=N" (the first one until then), so a test can move a client
// from one replica to another in the middle of its session.
package main

import (
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

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

func (b loggedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		logf("BODY %s %s", b.dir, base64.StdEncoding.EncodeToString(p[:n]))
	}
	return n, err
}

func main() {
	listen := flag.String("listen", ":8443", "address to serve on")
	identity := flag.String("identity", "", "the proxy's identity directory")
	strip := flag.Bool("strip", false, "remove Veil-Pqkex-* request headers (a downgrading proxy)")
	var ups upstreams
	flag.Var(&ups, "upstream", "upstream base URL; repeatable")
	flag.Parse()
	if *identity == "" || len(ups) == 0 {
		log.Fatal("testproxy: --identity and --upstream are required")
	}
	src, err := transport.LoadFiles(*identity)
	if err != nil {
		log.Fatal(err)
	}
	upstreamTransport := rpc.NewHTTPClient(src, transport.AuthorizeAny()).Transport
	proxies := make([]*httputil.ReverseProxy, len(ups))
	for i, u := range ups {
		rp := httputil.NewSingleHostReverseProxy(u)
		rp.Transport = upstreamTransport
		rp.FlushInterval = -1
		rp.ModifyResponse = func(r *http.Response) error {
			r.Body = loggedBody{r.Body, "response"}
			return nil
		}
		proxies[i] = rp
	}
	var route atomic.Int64
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
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
	srv := &http.Server{Addr: *listen, Handler: handler, TLSConfig: transport.ServerConfig(src)}
	logf("testproxy serving on %s (strip=%v, %d upstreams)", *listen, *strip, len(ups))
	log.Fatal(srv.ListenAndServeTLS("", ""))
}
