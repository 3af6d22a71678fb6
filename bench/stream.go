package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"

	"connectrpc.com/connect"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/veilrpc/veil/rpc"
)

// streamSuite moves cfg.streamMiB MiB down one server stream in 64 KiB messages, per
// system per round.
func streamSuite(cfg *config) (*Report, error) {
	e, err := newEnv()
	if err != nil {
		return nil, err
	}
	defer e.close()
	count := uint32(cfg.streamMiB << 20 / streamChunkSize)
	type system struct {
		sys      *System
		download func(ctx context.Context) (int64, error)
	}
	var systems []system
	var stops []func()
	defer func() {
		for _, s := range stops {
			s()
		}
	}()

	gsrv, err := e.startGRPC()
	if err != nil {
		return nil, err
	}
	stops = append(stops, gsrv.stop)
	gc, err := e.grpcClient(gsrv.addr)
	if err != nil {
		return nil, err
	}
	stops = append(stops, func() { _ = gc.Close() })
	systems = append(systems, system{newSystem("grpc", "grpc-go "+moduleVersion("google.golang.org/grpc")+", mTLS"), func(ctx context.Context) (int64, error) {
		return grpcDownload(ctx, gc, count)
	}})

	csrv, err := e.startConnect()
	if err != nil {
		return nil, err
	}
	stops = append(stops, csrv.stop)
	systems = append(systems, system{newSystem("connect", "connect-go "+moduleVersion("connectrpc.com/connect")+", mTLS, gzip off"), connectDownload(e.connectClient(), csrv.url, count, connect.WithAcceptCompression("gzip", nil, nil))})

	o := veilOptions{sealed: true, coalesce: true}
	vsrv, err := e.startVeil(o)
	if err != nil {
		return nil, err
	}
	stops = append(stops, vsrv.stop)
	hc, err := e.veilClient(o)
	if err != nil {
		return nil, err
	}
	systems = append(systems, system{newSystem("veil", "Veil, PQ sealing strict"), connectDownload(hc, vsrv.url, count, rpc.ClientOptions()...)})
	if cfg.coalesceOff {
		o := veilOptions{coalesce: true}
		usrv, err := e.startVeil(o)
		if err != nil {
			return nil, err
		}
		stops = append(stops, usrv.stop)
		uc, err := e.veilClient(o)
		if err != nil {
			return nil, err
		}
		systems = append(systems, system{newSystem("veil_unsealed", "Veil without sealing (mTLS only)"), connectDownload(uc, usrv.url, count, rpc.ClientOptions()...)})
	}
	systems = selected(cfg, systems, func(s system) (string, func()) { return s.sys.Name, func() {} })

	for _, s := range systems { // warm-up: connections, sessions, windows
		if _, err := s.download(context.Background()); err != nil {
			return nil, fmt.Errorf("%s warm-up: %w", s.sys.Name, err)
		}
	}
	for range cfg.reps {
		for _, s := range systems {
			runtime.GC()
			m := startMeter()
			n, err := s.download(context.Background())
			wall, cpu, _ := m.stop()
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.sys.Name, err)
			}
			if want := int64(count) * streamChunkSize; n != want {
				return nil, fmt.Errorf("%s: received %d bytes, want %d", s.sys.Name, n, want)
			}
			mb := float64(n) / 1e6
			s.sys.add("mb_per_s", mb/wall.Seconds())
			s.sys.add("cpu_ms_per_100mb", float64(cpu.Microseconds())/1000/mb*100)
			cfg.logf("stream %-8s %7.1f MB/s", s.sys.Name, mb/wall.Seconds())
		}
	}
	rep := newReport("stream")
	rep.Config = map[string]any{
		"mib_per_stream": cfg.streamMiB, "message_bytes": streamChunkSize, "reps": cfg.reps, "kind": "server stream, one per round",
		"tls": "TLS 1.3 mutual, X25519MLKEM768", "mb": "10^6 bytes of message payload",
	}
	for _, s := range systems {
		rep.Systems = append(rep.Systems, s.sys)
	}
	v := rep.system("veil")
	rep.ratio("veil_vs_connect_mb_per_s", v, "mb_per_s", rep.system("connect"), "mb_per_s")
	rep.ratio("veil_vs_grpc_mb_per_s", v, "mb_per_s", rep.system("grpc"), "mb_per_s")
	rep.ratio("sealed_vs_unsealed_mb_per_s", v, "mb_per_s", rep.system("veil_unsealed"), "mb_per_s")
	rep.ratio("veil_vs_connect_cpu_per_mb", v, "cpu_ms_per_100mb", rep.system("connect"), "cpu_ms_per_100mb")
	rep.ratio("unsealed_vs_connect_cpu_per_mb", rep.system("veil_unsealed"), "cpu_ms_per_100mb", rep.system("connect"), "cpu_ms_per_100mb")
	if cfg.streamMiB != 256 {
		rep.Notes = append(rep.Notes, fmt.Sprintf("%d MiB per stream (run with --stream-mib 256 for the full figure)", cfg.streamMiB))
	}
	return rep, nil
}

func grpcDownload(ctx context.Context, gc *grpc.ClientConn, count uint32) (int64, error) {
	st, err := gc.NewStream(ctx, &grpcDownloadStream, downloadProc)
	if err != nil {
		return 0, err
	}
	if err := st.SendMsg(&wrapperspb.UInt32Value{Value: count}); err != nil {
		return 0, err
	}
	if err := st.CloseSend(); err != nil {
		return 0, err
	}
	var n int64
	msg := new(wrapperspb.BytesValue)
	for {
		err := st.RecvMsg(msg)
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		n += int64(len(msg.GetValue()))
	}
}

func connectDownload(hc *http.Client, url string, count uint32, opts ...connect.ClientOption) func(context.Context) (int64, error) {
	c := connect.NewClient[wrapperspb.UInt32Value, wrapperspb.BytesValue](hc, url+downloadProc, opts...)
	return func(ctx context.Context) (int64, error) {
		st, err := c.CallServerStream(ctx, connect.NewRequest(&wrapperspb.UInt32Value{Value: count}))
		if err != nil {
			return 0, err
		}
		defer st.Close()
		var n int64
		for st.Receive() {
			n += int64(len(st.Msg().GetValue()))
		}
		return n, st.Err()
	}
}
