package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/rpc"
)

// cutListener counts what the server reads and, when armed, closes the connection
// (both ways) once it has read more than cutAfter bytes since arming.
type cutListener struct {
	net.Listener
	read     atomic.Int64
	armed    atomic.Bool
	cutAfter int64
	cuts     atomic.Int64
}

func (l *cutListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &cutConn{Conn: c, l: l}, nil
}

type cutConn struct {
	net.Conn
	l *cutListener
}

func (c *cutConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	total := c.l.read.Add(int64(n))
	if c.l.armed.Load() && total > c.l.cutAfter && c.l.armed.CompareAndSwap(true, false) {
		c.l.cuts.Add(1)
		_ = c.Conn.Close()
		return n, net.ErrClosed
	}
	return n, err
}

// keysSuite uploads an evaluation-key set (N13: relinearization and inner-sum keys over
// all slots) to he's KeyService over Veil (PQ sealing strict), then uploads it again
// with the connection cut halfway and measures the resumed upload.
func keysSuite(cfg *config) (*Report, error) {
	e, err := newEnv()
	if err != nil {
		return nil, err
	}
	defer e.close()
	params := he.ParamsN13()
	client, err := he.NewClient(params)
	if err != nil {
		return nil, err
	}
	const procedure = "/" + scoreService + "/Score"
	manifest := he.NewManifest(params, he.NeedRelinearization(), he.NeedInnerSum(params.Slots()))
	set, err := client.GenEvaluationKeys(manifest)
	if err != nil {
		return nil, err
	}
	data, err := set.Encode()
	if err != nil {
		return nil, err
	}
	size := int64(len(data))

	// A fresh registry per upload, so that every upload sends the whole set.
	var (
		mu       sync.Mutex
		current  http.Handler
		handlers []connect.HandlerOption // Veil's, passed to Handle
	)
	fresh := func() error {
		reg, err := keys.NewRegistry(params)
		if err != nil {
			return err
		}
		_, h := keys.NewKeyServiceHandler(reg, func(ctx context.Context) (string, error) {
			p, ok := rpc.PeerFromContext(ctx)
			if !ok {
				return "", connect.NewError(connect.CodeUnauthenticated, errors.New("bench: no peer"))
			}
			return p.ID.String(), nil
		}, map[string]*he.Manifest{procedure: manifest}, handlers...)
		mu.Lock()
		current = h
		mu.Unlock()
		return nil
	}
	keyService := func(opts ...connect.HandlerOption) (string, http.Handler) {
		handlers = opts
		return "/" + hev1connect.KeyServiceName + "/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			h := current
			mu.Unlock()
			h.ServeHTTP(w, r)
		})
	}
	var cut *cutListener
	srv, err := e.startVeilWith(veilOptions{sealed: true, coalesce: true, wrapListener: func(ln net.Listener) net.Listener {
		cut = &cutListener{Listener: ln, cutAfter: size / 2}
		return cut
	}}, keyService)
	if err != nil {
		return nil, err
	}
	defer srv.stop()
	hc, err := e.veilClient(veilOptions{sealed: true, coalesce: true})
	if err != nil {
		return nil, err
	}
	defer hc.CloseIdleConnections()
	kc := hev1connect.NewKeyServiceClient(hc, srv.url, rpc.ClientOptions()...)

	upload := newSystem("upload", "he key upload over Veil (PQ sealing strict), N13 relinearization + inner-sum keys")
	resume := newSystem("upload_cut", "the same upload with the connection cut after half the bytes, resumed by the uploader")
	run := func(s *System, cutting bool) error {
		if err := fresh(); err != nil {
			return err
		}
		runtime.GC()
		var attempts atomic.Int64
		var last int64
		up := keys.NewUploader(kc, set, keys.WithAttempts(4), keys.WithProgress(func(sent, _ int64) {
			if sent < last {
				attempts.Add(1)
			}
			last = sent
		}))
		cut.read.Store(0)
		cuts := cut.cuts.Load()
		cut.armed.Store(cutting)
		t0 := time.Now()
		id, err := up.Upload(context.Background())
		wall := time.Since(t0)
		cut.armed.Store(false)
		if err != nil {
			return err
		}
		if want, _ := set.ID(); id != want {
			return fmt.Errorf("uploaded %s, want %s", id, want)
		}
		mb := float64(size) / 1e6
		s.add("upload_mb_per_s", mb/wall.Seconds())
		s.add("seconds", wall.Seconds())
		s.add("wire_mb", float64(cut.read.Load())/1e6)
		if cutting {
			s.add("cuts", float64(cut.cuts.Load()-cuts))
		}
		cfg.logf("keys %-10s %6.1f MB/s, %.2f s, %.1f MB read by the server", s.Name, mb/wall.Seconds(), wall.Seconds(), float64(cut.read.Load())/1e6)
		return nil
	}
	if err := run(upload, false); err != nil { // warm-up: connection and session
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	upload.samples = map[string][]float64{}
	upload.order = nil
	for range cfg.reps {
		if err := run(upload, false); err != nil {
			return nil, fmt.Errorf("upload: %w", err)
		}
		if err := run(resume, true); err != nil {
			return nil, fmt.Errorf("upload after a cut: %w", err)
		}
	}
	rep := newReport("keys")
	rep.Config = map[string]any{"key_set_mb": float64(size) / 1e6, "keys": "relinearization + inner-sum Galois keys over 4096 slots, seeded encoding", "chunk_bytes": keys.ChunkSize, "reps": cfg.reps}
	rep.Systems = []*System{upload, resume}
	rep.Ratios["upload_mb_per_s"] = round(upload.Median("upload_mb_per_s"))
	rep.Ratios["cut_vs_clean_seconds"] = round(resume.Median("seconds") / upload.Median("seconds"))
	return rep, nil
}
