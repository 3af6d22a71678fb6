package natsstate

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/veilrpc/veil/transport"
)

// Config says how to reach NATS and how to lay out the buckets.
type Config struct {
	// URL lists the NATS servers, comma-separated (tls://nats-0:4222,tls://nats-1:4222).
	URL string
	// Replicas is each bucket's replication factor (default 1; 3 in a three-node
	// cluster). It applies when a bucket is created; an existing bucket keeps its own.
	Replicas int
	// Prefix names the buckets: PREFIX-evaluation-keys, PREFIX-ticket-keys,
	// PREFIX-analytics (default "veil").
	Prefix string
	// Source is the workload identity presented as the TLS client certificate. Without
	// it the connection is plain, which only tests should do.
	Source transport.Source
	// Roots verifies the NATS servers' certificates (DNS names, like any TLS server).
	// Default: the trust bundle of Source's own trust domain, read at each handshake.
	Roots *x509.CertPool
	// Timeout bounds connecting and each request (default 10 seconds).
	Timeout time.Duration
	// Logger receives connection events (default slog.Default()).
	Logger *slog.Logger
}

// State is a connection to NATS JetStream.
type State struct {
	cfg Config
	nc  *nats.Conn
	js  jetstream.JetStream
}

// Connect connects to NATS. It retries in the background after a lost connection; an
// initial failure is an error.
func Connect(ctx context.Context, cfg Config) (*State, error) {
	if cfg.URL == "" {
		return nil, errors.New("natsstate: no URL")
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	if cfg.Replicas < 1 || cfg.Replicas > 5 {
		return nil, fmt.Errorf("natsstate: replicas %d: JetStream allows 1 to 5", cfg.Replicas)
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "veil"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	log := cfg.Logger
	opts := []nats.Option{
		nats.Name("veil"),
		nats.Timeout(cfg.Timeout),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if err != nil && !nc.IsClosed() {
				log.Warn("natsstate: disconnected", "error", err.Error())
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("natsstate: reconnected", "server", nc.ConnectedUrlRedacted()) }),
	}
	if cfg.Source != nil {
		opts = append(opts, nats.Secure(ClientTLS(cfg.Source, cfg.Roots)))
	}
	nc, err := nats.Connect(cfg.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("natsstate: connect: %w", err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("natsstate: %w", err)
	}
	s := &State{cfg: cfg, nc: nc, js: js}
	cctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	if err := s.Check(cctx); err != nil {
		nc.Close()
		return nil, err
	}
	return s, nil
}

// Close closes the connection.
func (s *State) Close() { s.nc.Close() }

// Check reports whether JetStream answers: nil when it does, an error naming the
// problem when the connection is down or JetStream has no quorum.
func (s *State) Check(ctx context.Context) error {
	if !s.nc.IsConnected() {
		return errors.New("natsstate: not connected")
	}
	if _, err := s.js.AccountInfo(ctx); err != nil {
		return fmt.Errorf("natsstate: jetstream: %w", err)
	}
	return nil
}

// logged logs a store error other than a missing record (which callers expect) on
// the server, where the services' answers to clients say only "unavailable".
func (s *State) logged(op string, err error) error {
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.cfg.Logger.Warn("natsstate: "+op, "error", err.Error())
	}
	return err
}

func (s *State) bucket(name string) string { return s.cfg.Prefix + "-" + name }

func (s *State) ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.cfg.Timeout)
}

// objectStore opens the bucket, creating it if missing, with reads served by the
// stream leader (leaderReads).
func (s *State) objectStore(ctx context.Context, name, desc string) (jetstream.ObjectStore, error) {
	ctx, cancel := s.ctx(ctx)
	defer cancel()
	bucket := s.bucket(name)
	_, err := s.js.ObjectStore(ctx, bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		_, err = s.js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{
			Bucket: bucket, Description: desc, Replicas: s.cfg.Replicas, Storage: jetstream.FileStorage,
		})
		if errors.Is(err, jetstream.ErrBucketExists) { // another replica created it first
			err = nil
		}
	}
	if err == nil {
		err = s.leaderReads(ctx, "OBJ_"+bucket)
	}
	if err != nil {
		return nil, fmt.Errorf("natsstate: bucket %s: %w", bucket, err)
	}
	b, err := s.js.ObjectStore(ctx, bucket) // bound again: it reads the stream's settings once
	if err != nil {
		return nil, fmt.Errorf("natsstate: bucket %s: %w", bucket, err)
	}
	return b, nil
}

// keyValue opens the bucket cfg names (without the prefix), creating it if missing,
// with reads served by the stream leader (leaderReads).
func (s *State) keyValue(ctx context.Context, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	ctx, cancel := s.ctx(ctx)
	defer cancel()
	cfg.Bucket = s.bucket(cfg.Bucket)
	cfg.Replicas = s.cfg.Replicas
	cfg.Storage = jetstream.FileStorage
	_, err := s.js.KeyValue(ctx, cfg.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		_, err = s.js.CreateKeyValue(ctx, cfg)
		if errors.Is(err, jetstream.ErrBucketExists) {
			err = nil
		}
	}
	if err == nil {
		err = s.leaderReads(ctx, "KV_"+cfg.Bucket)
	}
	if err != nil {
		return nil, fmt.Errorf("natsstate: bucket %s: %w", cfg.Bucket, err)
	}
	b, err := s.js.KeyValue(ctx, cfg.Bucket)
	if err != nil {
		return nil, fmt.Errorf("natsstate: bucket %s: %w", cfg.Bucket, err)
	}
	return b, nil
}

// leaderReads turns off direct gets on a bucket's stream. JetStream creates KV and
// object buckets with direct gets allowed, which any replica answers, including a
// follower that has not applied the latest write yet: a key set acknowledged through
// one Veil replica could then read as missing through another (and be uploaded
// again). Without direct gets, reads go to the stream leader, which answers only
// with what a quorum acknowledged: read-your-writes across replicas.
func (s *State) leaderReads(ctx context.Context, stream string) error {
	st, err := s.js.Stream(ctx, stream)
	if err != nil {
		return err
	}
	cfg := st.CachedInfo().Config
	if !cfg.AllowDirect && !cfg.MirrorDirect {
		return nil
	}
	cfg.AllowDirect, cfg.MirrorDirect = false, false
	_, err = s.js.UpdateStream(ctx, cfg)
	return err
}

// ClientTLS returns a TLS 1.3 client configuration that presents src's current SVID
// and verifies the server's certificate chain and host name against roots, or, when
// roots is nil, against src's current bundle for its own trust domain (so that trust
// bundle rotation needs no reconnect either).
func ClientTLS(src transport.Source, roots *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: []tls.CurveID{tls.X25519MLKEM768, tls.X25519},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			svid, err := src.GetX509SVID()
			if err != nil {
				return nil, err
			}
			c := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
			for _, cert := range svid.Certificates {
				c.Certificate = append(c.Certificate, cert.Raw)
			}
			return c, nil
		},
		// The chain is verified below against the roots of the moment.
		InsecureSkipVerify: true, //nolint:gosec // VerifyConnection verifies chain and name
		VerifyConnection: func(cs tls.ConnectionState) error {
			pool := roots
			if pool == nil {
				svid, err := src.GetX509SVID()
				if err != nil {
					return err
				}
				b, err := src.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
				if err != nil {
					return err
				}
				pool = x509.NewCertPool()
				for _, c := range b.X509Authorities() {
					pool.AddCert(c)
				}
			}
			if len(cs.PeerCertificates) == 0 {
				return errors.New("natsstate: the server sent no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			host := cs.ServerName
			if i := strings.LastIndexByte(host, ':'); i > 0 && !strings.Contains(host[i:], "]") {
				host = host[:i]
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
				DNSName: host, Roots: pool, Intermediates: inter,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			})
			if err != nil {
				return fmt.Errorf("natsstate: server certificate: %w", err)
			}
			return nil
		},
	}
}
