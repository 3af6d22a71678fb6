package pqkex_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/veilrpc/veil/pqkex"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// cpuTime returns the process's user+system CPU time.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU adds a cpu-ns/op metric: CPU of both sides (all goroutines) per operation.
func reportCPU(b *testing.B, f func()) {
	b.ReportAllocs()
	start := cpuTime(b)
	b.ResetTimer()
	f()
	b.StopTimer()
	b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "cpu-ns/op")
}

func tlsHandshake(b *testing.B, server, client *tls.Config) {
	c1, c2 := net.Pipe()
	srv := tls.Server(c1, server)
	cli := tls.Client(c2, client)
	done := make(chan error, 1)
	go func() { done <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		b.Fatal(err)
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	// Closing the pipes, not the TLS connections: close_notify on a synchronous pipe would
	// wait for a reader.
	_ = c1.Close()
	_ = c2.Close()
}

// BenchmarkSessionSetup compares, in one run, the CPU of a full mTLS 1.3 handshake (classic
// X25519 and post-quantum X25519MLKEM768, ECDSA P-256 certificates, no resumption) with a pqkex
// handshake (both sides, in memory, peer credentials already verified and cached). The cost
// target (docs/pqkex.md section 4) is tls-pq + pqkex <= 1.5 x tls-classic.
func BenchmarkSessionSetup(b *testing.B) {
	e := newEnv(b, pqkex.X25519MLKEM768())
	srvCfg, err := e.ca.ServerTLSConfig(serverID)
	if err != nil {
		b.Fatal(err)
	}
	cliCfg, err := e.ca.ClientTLSConfig(clientID)
	if err != nil {
		b.Fatal(err)
	}
	cliCfg.ServerName = "localhost"
	srvCfg.SessionTicketsDisabled = true
	for _, kx := range []struct {
		name  string
		curve tls.CurveID
	}{{"tls-classic-X25519", tls.X25519}, {"tls-pq-X25519MLKEM768", tls.X25519MLKEM768}} {
		b.Run(kx.name, func(b *testing.B) {
			s, c := srvCfg.Clone(), cliCfg.Clone()
			s.CurvePreferences = []tls.CurveID{kx.curve}
			c.CurvePreferences = []tls.CurveID{kx.curve}
			reportCPU(b, func() {
				for range b.N {
					tlsHandshake(b, s, c)
				}
			})
		})
	}
	b.Run("alternative-transcript-signatures", func(b *testing.B) {
		// The design not chosen (docs/pqkex.md section 4, option a): an ephemeral hybrid KEM
		// plus, on each side, an ML-DSA-65 and an ECDSA P-256 signature over the transcript and
		// the peer's verification of both. Primitives only, no encoding: a lower bound.
		_, sk, err := mldsa65.GenerateKey(nil)
		if err != nil {
			b.Fatal(err)
		}
		ek, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		kem := pqkex.X25519MLKEM768()
		transcript := sha256.Sum256([]byte("transcript"))
		reportCPU(b, func() {
			for range b.N {
				pk, priv, _ := kem.GenerateKeyPair()
				ct, _, _ := kem.Encapsulate(pk)
				if _, err := kem.Decapsulate(priv, ct); err != nil {
					b.Fatal(err)
				}
				for range 2 {
					sig := make([]byte, mldsa65.SignatureSize)
					if err := mldsa65.SignTo(sk, transcript[:], nil, true, sig); err != nil {
						b.Fatal(err)
					}
					if !mldsa65.Verify(sk.Public().(*mldsa65.PublicKey), transcript[:], nil, sig) {
						b.Fatal("ML-DSA verify")
					}
					es, err := ecdsa.SignASN1(rand.Reader, ek, transcript[:])
					if err != nil || !ecdsa.VerifyASN1(&ek.PublicKey, transcript[:], es) {
						b.Fatal("ECDSA")
					}
				}
			}
		})
	})
	for _, suite := range pqkex.Schemes() {
		for _, mode := range []struct {
			name               string
			bind, tlsEphemeral bool
		}{
			{"", false, false},
			// ML-KEM halves only, no pqkex ephemeral: a PQ TLS connection supplies the
			// classical half and the ephemeral (the default channel-bound handshake).
			{"-channel-bound", true, true},
			// ML-KEM halves with a pqkex ephemeral: the fallback on a classical TLS connection.
			{"-channel-bound-classic-tls", true, false},
		} {
			if suite.ID() == pqkex.X448MLKEM1024().ID() && mode.name == "-channel-bound-classic-tls" {
				continue // the X448 suite binds with its full KEMs whatever the TLS group (spec 5.3)
			}
			b.Run("pqkex-"+suite.Name()+mode.name, func(b *testing.B) {
				e := newEnv(b, suite)
				s, err := pqkex.NewServer(pqkex.WithIdentity(e.server), pqkex.WithRoots(e.ca.Roots()))
				if err != nil {
					b.Fatal(err)
				}
				if !pqkex.Handshake(e.client, e.server, s, testNow, mode.bind, mode.tlsEphemeral) {
					b.Fatal("handshake failed")
				}
				reportCPU(b, func() {
					for range b.N {
						if !pqkex.Handshake(e.client, e.server, s, testNow, mode.bind, mode.tlsEphemeral) {
							b.Fatal("handshake failed")
						}
					}
				})
			})
		}
	}
}

// BenchmarkUnaryCall measures a 1 KiB connect unary call over HTTP/2 mTLS (one warm
// connection, sequential calls, no compression), with and without pqkex sealing.
func BenchmarkUnaryCall(b *testing.B) {
	benchUnary(b, func(b *testing.B, call func() error) {
		for range b.N {
			if err := call(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkUnaryCallParallel is BenchmarkUnaryCall with 64 concurrent callers on one
// connection, the load of the bench rpc suite (sealed vs unsealed throughput).
func BenchmarkUnaryCallParallel(b *testing.B) {
	benchUnary(b, func(b *testing.B, call func() error) {
		b.SetParallelism(32)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := call(); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// benchUnary runs loop as the sub-benchmarks "plain" (mTLS only) and "sealed" (pqkex), each
// with a warm connect client calling the 1 KiB echo, and reports their CPU per call.
func benchUnary(b *testing.B, loop func(b *testing.B, call func() error)) {
	e := newEnv(b, pqkex.X25519MLKEM768())
	msg := wrapperspb.String(strings.Repeat("x", 1024))
	plainSrv := e.serveTLS(b, serverID, echoMux())
	sealedSrv := e.startServer(b, echoMux())
	plain := &http.Client{Transport: e.transport(b, clientID)}
	sealed, _ := e.httpClient(b, e.transport(b, clientID))
	for _, c := range []struct {
		name string
		hc   *http.Client
		url  string
	}{{"plain", plain, plainSrv.URL}, {"sealed", sealed, sealedSrv.URL}} {
		b.Run(c.name, func(b *testing.B) {
			// No gzip on either side: pqkex refuses compressed bodies (spec 8), so plain calls
			// compressed by connect-go's default would compare different work.
			cl := connect.NewClient[str, str](c.hc, c.url+procUnary, connect.WithAcceptCompression("gzip", nil, nil))
			call := func() error {
				_, err := cl.CallUnary(context.Background(), connect.NewRequest(msg))
				return err
			}
			if err := call(); err != nil {
				b.Fatal(err)
			}
			reportCPU(b, func() { loop(b, call) })
		})
	}
}
