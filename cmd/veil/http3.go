package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net/http"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// http3Flag is a client command's --http3: off (default), on (--http3: HTTP/3 only) or
// auto (--http3=auto: HTTP/3, falling back to HTTP/2 when UDP is blocked).
type http3Flag struct {
	mode string
	reg  *prometheus.Registry // auto mode: counts fallbacks for report
}

func addHTTP3Flag(fs *flag.FlagSet) *http3Flag {
	f := &http3Flag{mode: "off"}
	fs.Var(f, "http3", "dial HTTP/3 (QUIC over UDP): --http3 for HTTP/3 only, --http3=auto to try it and fall back to HTTP/2 when UDP is blocked")
	return f
}

func (f *http3Flag) String() string {
	if f == nil {
		return "off"
	}
	return f.mode
}

// IsBoolFlag lets --http3 stand alone.
func (f *http3Flag) IsBoolFlag() bool { return true }

func (f *http3Flag) Set(v string) error {
	switch v {
	case "true", "on":
		f.mode = "on"
	case "false", "off":
		f.mode = "off"
	case "auto":
		f.mode = "auto"
	default:
		return fmt.Errorf("want on, off or auto, not %q", v)
	}
	return nil
}

// options are the client options the flag asks for.
func (f *http3Flag) options() []rpc.ClientOption {
	switch f.mode {
	case "on":
		return []rpc.ClientOption{rpc.WithHTTP3()}
	case "auto":
		f.reg = prometheus.NewRegistry()
		return []rpc.ClientOption{rpc.WithHTTP3Auto(0), rpc.WithMetrics(f.reg)}
	}
	return nil
}

// report says on w whether an auto-mode client fell back to HTTP/2.
func (f *http3Flag) report(w io.Writer) {
	if f.reg == nil {
		return
	}
	if n, err := rpc.CounterValue(f.reg, "veil_rpc_http3_fallbacks_total", "side", "client"); err == nil && n > 0 {
		fmt.Fprintln(w, "http3: fell back to HTTP/2 (no QUIC handshake: UDP blocked or no HTTP/3 on the server)")
	}
}

// connReport prints, once, the protocol (h3 or h2) and the TLS state of the first
// response: veil call -v.
func connReport(w io.Writer) rpc.ClientOption {
	var once sync.Once
	return rpc.WithRoundTripper(func(next http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(r *http.Request) (*http.Response, error) {
			res, err := next.RoundTrip(r)
			if err == nil && res.TLS != nil {
				once.Do(func() {
					proto := "h2"
					if res.ProtoMajor == 3 {
						proto = "h3"
					}
					peer, _ := transport.PeerID(res.TLS)
					fmt.Fprintf(w, "protocol: %s\ntls: %s %s, server %s\n", proto, tls.VersionName(res.TLS.Version), res.TLS.CurveID, peer)
				})
			}
			return res, err
		})
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
