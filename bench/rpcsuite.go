package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/rpc"
)

// unary is one system of the rpc suite: call makes one 1 KiB echo call.
type unary struct {
	sys  *System
	call func(ctx context.Context) error
	stop func()
	// extCPU, when set, is CPU used outside this process by the system (its proxies).
	extCPU func() time.Duration
	// conc, when not 0, replaces cfg.conc (the seed-target run at 256 callers).
	conc int
}

// rpcSuite compares unary calls: 1 KiB request and response, cfg.conc concurrent callers,
// all over one HTTP/2 connection per system, systems interleaved round by round.
func rpcSuite(cfg *config) (*Report, error) {
	e, err := newEnv()
	if err != nil {
		return nil, err
	}
	defer e.close()
	msg := strings.Repeat("v", cfg.msgSize)
	var systems []*unary
	var notes []string
	clients := map[string]echov1connect.EchoServiceClient{}
	defer func() {
		for _, s := range systems {
			s.stop()
		}
	}()

	gsrv, err := e.startGRPC()
	if err != nil {
		return nil, err
	}
	gc, err := e.grpcClient(gsrv.addr)
	if err != nil {
		gsrv.stop()
		return nil, err
	}
	systems = append(systems, &unary{
		sys: newSystem("grpc", "grpc-go "+moduleVersion("google.golang.org/grpc")+", mTLS"),
		call: func(ctx context.Context) error {
			res := new(echov1.EchoResponse)
			if err := gc.Invoke(ctx, "/veil.echo.v1.EchoService/Echo", &echov1.EchoRequest{Message: msg}, res); err != nil {
				return err
			}
			return check(res.GetMessage(), msg)
		},
		stop: func() { _ = gc.Close(); gsrv.stop() },
	})

	if s, skipped := e.sidecarSystem(msg); s != nil {
		systems = append(systems, s)
	} else {
		notes = append(notes, "grpc_nginx skipped: "+skipped)
		fmt.Fprintln(os.Stderr, "bench rpc: grpc_nginx skipped:", skipped)
	}

	csrv, err := e.startConnect()
	if err != nil {
		return nil, err
	}
	cc := echov1connect.NewEchoServiceClient(e.connectClient(), csrv.url, connect.WithAcceptCompression("gzip", nil, nil))
	systems = append(systems, &unary{
		sys:  newSystem("connect", "connect-go "+moduleVersion("connectrpc.com/connect")+", mTLS, gzip off"),
		call: connectCall(cc, msg),
		stop: csrv.stop,
	})

	veil := func(name, label string, o veilOptions) error {
		srv, err := e.startVeil(o)
		if err != nil {
			return err
		}
		hc, err := e.veilClient(o)
		if err != nil {
			srv.stop()
			return err
		}
		vc := echov1connect.NewEchoServiceClient(hc, srv.url, rpc.ClientOptions()...)
		clients[name] = vc
		systems = append(systems, &unary{sys: newSystem(name, label), call: connectCall(vc, msg), stop: func() { hc.CloseIdleConnections(); srv.stop() }})
		return nil
	}
	if err := veil("veil", "Veil, PQ sealing strict (write coalescing on, the default)", veilOptions{sealed: true, coalesce: true}); err != nil {
		return nil, err
	}
	systems = append(systems, seedSystem(systems[len(systems)-1]))
	if cfg.coalesceOff {
		if err := veil("veil_nocoalesce", "Veil, PQ sealing strict, write coalescing off", veilOptions{sealed: true}); err != nil {
			return nil, err
		}
		if err := veil("veil_unsealed", "Veil without sealing (mTLS only)", veilOptions{coalesce: true}); err != nil {
			return nil, err
		}
	}

	systems = selected(cfg, systems, func(s *unary) (string, func()) { return s.sys.Name, s.stop })
	for _, s := range systems {
		if _, err := runUnary(s.call, cmp.Or(s.conc, cfg.conc), cfg.warmup); err != nil {
			return nil, fmt.Errorf("%s warm-up: %w", s.sys.Name, err)
		}
	}
	for range cfg.reps {
		for _, s := range systems {
			runtime.GC()
			var ext0 time.Duration
			if s.extCPU != nil {
				ext0 = s.extCPU()
			}
			r, err := runUnary(s.call, cmp.Or(s.conc, cfg.conc), cfg.dur)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.sys.Name, err)
			}
			if s.extCPU != nil {
				r.addCPU(s.extCPU() - ext0)
			}
			s.sys.add("calls_per_s", r.callsPerS)
			s.sys.add("p50_ms", r.p50)
			s.sys.add("p99_ms", r.p99)
			s.sys.add("cpu_us_per_call", r.cpuPerCall)
			s.sys.add("allocs_per_call", r.allocsPerCall)
			s.sys.add("cores_used", r.coresUsed)
			cfg.logf("rpc %-16s %8.0f calls/s p50 %.2f ms p99 %.2f ms cpu %.1f us allocs %.0f cores %.2f", s.sys.Name, r.callsPerS, r.p50, r.p99, r.cpuPerCall, r.allocsPerCall, r.coresUsed)
		}
	}
	cross, err := crossoverSweep(cfg, clients["veil"], clients["veil_unsealed"])
	if err != nil {
		return nil, err
	}
	rep := newReport("rpc")
	rep.Notes = notes
	rep.Config = map[string]any{
		"message_bytes": cfg.msgSize, "concurrency": cfg.conc, "seconds_per_rep": cfg.dur.Seconds(), "reps": cfg.reps,
		"tls": "TLS 1.3 mutual, X25519MLKEM768, ECDSA P-256 certificates, one HTTP/2 connection per system", "protocol": "Connect (unary) for connect-go and Veil",
	}
	for _, s := range systems {
		rep.Systems = append(rep.Systems, s.sys)
	}
	cross.record(rep)
	g, c, v := rep.system("grpc"), rep.system("connect"), rep.system("veil")
	rep.ratio("veil_vs_grpc_calls_per_s", v, "calls_per_s", g, "calls_per_s")
	rep.ratio("veil_vs_connect_calls_per_s", v, "calls_per_s", c, "calls_per_s")
	rep.ratio("veil_vs_grpc_p99", v, "p99_ms", g, "p99_ms")
	// CPU per call is what contention on a shared machine disturbs least.
	rep.ratio("veil_vs_grpc_cpu_per_call", v, "cpu_us_per_call", g, "cpu_us_per_call")
	rep.ratio("veil_vs_connect_cpu_per_call", v, "cpu_us_per_call", c, "cpu_us_per_call")
	sidecarRatios(rep, v)
	if off := rep.system("veil_nocoalesce"); off != nil {
		rep.ratio("coalescing_on_vs_off_calls_per_s", v, "calls_per_s", off, "calls_per_s")
		rep.ratio("coalescing_on_vs_off_cpu_per_call", v, "cpu_us_per_call", off, "cpu_us_per_call")
	}
	if un := rep.system("veil_unsealed"); un != nil {
		rep.ratio("sealed_vs_unsealed_calls_per_s", v, "calls_per_s", un, "calls_per_s")
		rep.ratio("sealed_vs_unsealed_cpu_per_call", v, "cpu_us_per_call", un, "cpu_us_per_call")
		rep.ratio("unsealed_vs_grpc_cpu_per_call", un, "cpu_us_per_call", g, "cpu_us_per_call")
		rep.ratio("unsealed_vs_connect_cpu_per_call", un, "cpu_us_per_call", c, "cpu_us_per_call")
	}
	return rep, nil
}

func connectCall(c echov1connect.EchoServiceClient, msg string) func(context.Context) error {
	return func(ctx context.Context) error {
		res, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: msg}))
		if err != nil {
			return err
		}
		return check(res.Msg.GetMessage(), msg)
	}
}

type unaryResult struct {
	callsPerS, p50, p99, p999, cpuPerCall, allocsPerCall, coresUsed float64
	calls                                                           float64
	wall                                                            time.Duration
}

// runUnary keeps conc callers busy for d and measures throughput, latency, CPU and
// allocations (client and server together: both run in this process).
func runUnary(call func(context.Context) error, conc int, d time.Duration) (unaryResult, error) {
	lats := make([][]time.Duration, conc)
	for i := range lats {
		lats[i] = make([]time.Duration, 0, 1<<13)
	}
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	m := startMeter()
	for i := range conc {
		wg.Go(func() {
			for ctx.Err() == nil {
				t0 := time.Now()
				if err := call(context.Background()); err != nil {
					errOnce.Do(func() { firstErr = err; cancel() })
					return
				}
				lats[i] = append(lats[i], time.Since(t0))
			}
		})
	}
	wg.Wait()
	wall, cpu, mallocs := m.stop()
	if firstErr != nil {
		return unaryResult{}, firstErr
	}
	all := slices.Concat(lats...)
	if len(all) == 0 {
		return unaryResult{}, errors.New("no call completed")
	}
	slices.Sort(all)
	n := float64(len(all))
	return unaryResult{
		callsPerS:     n / wall.Seconds(),
		p50:           percentile(all, 50),
		p99:           percentile(all, 99),
		p999:          percentile(all, 99.9),
		cpuPerCall:    float64(cpu.Microseconds()) / n,
		allocsPerCall: float64(mallocs) / n,
		coresUsed:     cpu.Seconds() / wall.Seconds(),
		calls:         n,
		wall:          wall,
	}, nil
}
