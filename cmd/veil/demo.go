package main

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"github.com/prometheus/client_golang/prometheus"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/gen/veil/auth/v1/authv1connect"
	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
	"github.com/veilrpc/veil/services/auth"
	"github.com/veilrpc/veil/services/ca"
	"github.com/veilrpc/veil/services/echo"
	"github.com/veilrpc/veil/services/scoring"
	"github.com/veilrpc/veil/transport"
)

type demoCall struct {
	Protocol string  `json:"protocol"`
	Kind     string  `json:"kind"`
	OK       bool    `json:"ok"`
	Millis   float64 `json:"ms"`
	Error    string  `json:"error,omitempty"`
}

type demoRefusal struct {
	Case   string `json:"case"`
	Result string `json:"result"`
}

type demoStep struct {
	Step   string  `json:"step"`
	Millis float64 `json:"ms"`
}

type demoScoring struct {
	Samples           int     `json:"samples"`
	Features          int     `json:"features"`
	Params            string  `json:"params"`
	Output            string  `json:"output"`
	Agreement         float64 `json:"agreement"`
	MaxAbsError       float64 `json:"max_abs_error"`
	PlaintextAccuracy float64 `json:"plaintext_accuracy"`
	KeyBytes          int64   `json:"key_bytes"`
	KeyGenMillis      float64 `json:"key_gen_ms"`
	UploadMillis      float64 `json:"upload_ms"`
	UploadMBPerSecond float64 `json:"upload_mb_per_s"`
	ScoreMillis       float64 `json:"score_ms"`
	BytesSent         int64   `json:"bytes_sent"`
	BytesReceived     int64   `json:"bytes_received"`
}

type demoAnalytics struct {
	Owners      int     `json:"owners"`
	Records     int     `json:"records"`
	Dimension   int     `json:"dimension"`
	MaxAbsError float64 `json:"max_abs_error"`
	Duplicates  int     `json:"duplicates_ignored"`
}

// demoCommittee is the committee study of the demo: three institutions hold the key,
// any two release; one stays offline.
type demoCommittee struct {
	Members           int     `json:"members"`
	Threshold         int     `json:"threshold"`
	ReleasedWith      int     `json:"released_with"`
	LoneMemberRefused bool    `json:"lone_member_refused"`
	MaxAbsError       float64 `json:"max_abs_error"`
}

// demoTokens is the continuous-authentication part of the demo: every call carries a
// token bound to the caller's certificate, and the token expires mid-run.
type demoTokens struct {
	TTLSeconds float64 `json:"ttl_s"`
	Issued     int64   `json:"issued"`
	// Refreshed counts every token fetched to replace one: early (a fifth of its life
	// left, before any server refused it) or after a server answered token_expired.
	Refreshed      int64 `json:"refreshed"`
	RefreshedEarly int64 `json:"refreshed_early"`
	// RefreshedOnExpiry counts tokens fetched after a refusal; ExpiredRefusals the
	// token_expired refusals the servers counted (veil_rpc_auth_refusals_total).
	RefreshedOnExpiry int64 `json:"refreshed_on_expiry"`
	ExpiredRefusals   int64 `json:"expired_refusals"`
	Calls             int   `json:"calls"`
	FailedCalls       int   `json:"failed_calls"`
}

type demoReport struct {
	TLSVersion   string        `json:"tls_version"`
	TLSGroup     string        `json:"tls_group"`
	PQMode       string        `json:"pq_mode"`
	PQSuite      string        `json:"pq_suite"`
	PQSeal       string        `json:"pq_seal"`
	TrustDomain  string        `json:"trust_domain"`
	CA           string        `json:"ca"`
	Handshake    float64       `json:"handshake_ms"`
	Calls        []demoCall    `json:"calls"`
	Refused      []demoRefusal `json:"refused"`
	Scoring      demoScoring   `json:"scoring"`
	Analytics    demoAnalytics `json:"analytics"`
	Committee    demoCommittee `json:"committee"`
	Tokens       demoTokens    `json:"tokens"`
	Steps        []demoStep    `json:"steps"`
	TotalSeconds float64       `json:"total_seconds"`
}

const demoTD = "demo.veil.dev"

// demoIDs are the workloads of the demo.
var demoIDs = map[string]string{
	"scoring":   "spiffe://" + demoTD + "/scoring",
	"analytics": "spiffe://" + demoTD + "/analytics",
	"client":    "spiffe://" + demoTD + "/ns/demo/sa/client",
	"analyst":   "spiffe://" + demoTD + "/ns/demo/sa/analyst",
	"owner-1":   "spiffe://" + demoTD + "/ns/clinics/sa/owner-1",
	"owner-2":   "spiffe://" + demoTD + "/ns/clinics/sa/owner-2",
	"owner-3":   "spiffe://" + demoTD + "/ns/clinics/sa/owner-3",
	"intruder":  "spiffe://" + demoTD + "/ns/other/sa/intruder",
	"bank":      "spiffe://" + demoTD + "/ns/committee/sa/bank",
	"hospital":  "spiffe://" + demoTD + "/ns/committee/sa/hospital",
	"agency":    "spiffe://" + demoTD + "/ns/committee/sa/agency",
	"auth":      "spiffe://" + demoTD + "/auth",
}

// demo is one run of `veil demo`: everything it started, to stop at the end.
type demo struct {
	dir    string
	rep    *demoReport
	suite  suiteFlag // the pqkex suite of every sealed call (--suite); its policy on every server and client
	step   time.Time
	ca     *pki.CA
	caURL  string
	srcs   map[string]transport.Source
	cas    map[string]*ca.Client // each workload's CA client: also its sealing identity
	stops  []func()
	logger *slog.Logger
	bar    io.Writer // progress bars go here (nil with --json)

	// Continuous authentication: the token service, its key, the token sources of the
	// clients (by caller and server), and the servers that check tokens.
	tokens     *auth.Service
	tokenKey   ed25519.PublicKey
	authURL    string
	sources    map[[2]string]*auth.TokenSource
	verifiers  []*rpc.Server
	serverSkew atomic.Int64 // how far the token service's and verifiers' clock runs ahead
	clientSkew atomic.Int64 // how far the clients' token clock runs ahead
}

// The demo's clocks: real time, moved forward by the token phase instead of waiting
// for tokens to expire.
func (d *demo) serverNow() time.Time { return time.Now().Add(time.Duration(d.serverSkew.Load())) }
func (d *demo) clientNow() time.Time { return time.Now().Add(time.Duration(d.clientSkew.Load())) }

func (d *demo) mark(step string) {
	now := time.Now()
	d.rep.Steps = append(d.rep.Steps, demoStep{step, ms(now.Sub(d.step))})
	d.step = now
}

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("demo", "demo [--json] [--keep DIR] [--samples N] [--suite default|sm]", stderr)
	suiteName := fs.String("suite", "default", "pqkex suite of every sealed call: default (X25519MLKEM768-SHA256) or sm (the ShangMi suite SM2MLKEM768-SM3: the CA gets an SM2 key and every server requires the suite)")
	asJSON := fs.Bool("json", false, "print the report as one JSON object")
	keep := fs.String("keep", "", "write the CA and identities here instead of a temporary directory")
	samples := fs.Int("samples", 2000, "synthetic samples to score")
	if err := parse(fs, args); err != nil {
		return err
	}
	suite := pqkex.X25519MLKEM768()
	if *suiteName != "default" {
		if suite = parseSuite(*suiteName); suite == nil {
			return fmt.Errorf("%w: --suite %q: want default or sm", errUsage, *suiteName)
		}
	}
	start := time.Now()
	dir := *keep
	if dir == "" {
		tmp, err := os.MkdirTemp("", "veil-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		dir = tmp
	}
	d := &demo{dir: dir, step: start, srcs: map[string]transport.Source{}, cas: map[string]*ca.Client{}, sources: map[[2]string]*auth.TokenSource{},
		rep:    &demoReport{TrustDomain: demoTD, PQMode: transport.PQStrict.String(), PQSeal: "strict", PQSuite: suite.Name()},
		suite:  suiteFlag{suite},
		logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if !*asJSON {
		d.bar = stderr
	}
	defer func() {
		for i := len(d.stops) - 1; i >= 0; i-- {
			d.stops[i]()
		}
	}()
	err := d.run(ctx, *samples)
	d.rep.TotalSeconds = time.Since(start).Seconds()
	if err == nil {
		err = d.check()
	}
	if perr := emit(stdout, *asJSON, d.rep, func(w io.Writer) { printDemo(w, d.rep) }); perr != nil && err == nil {
		err = perr
	}
	return err
}

func (d *demo) run(ctx context.Context, samples int) error {
	if err := d.identities(ctx); err != nil {
		return fmt.Errorf("demo: identities: %w", err)
	}
	d.mark("CA and identities (join tokens, online CA)")
	if err := d.startTokens(ctx); err != nil {
		return fmt.Errorf("demo: token service: %w", err)
	}
	scoringURL, model, data, err := d.startScoring(ctx, samples)
	if err != nil {
		return fmt.Errorf("demo: scoring server: %w", err)
	}
	analyticsURL, err := d.startAnalytics(ctx)
	if err != nil {
		return fmt.Errorf("demo: analytics server: %w", err)
	}
	d.mark("start scoring and analytics servers")
	if err := d.protocolTour(ctx, scoringURL); err != nil {
		return err
	}
	d.mark("echo over Connect, gRPC and gRPC-Web, sealed")
	if err := d.scoringFlow(ctx, scoringURL, model, data); err != nil {
		return fmt.Errorf("demo: scoring: %w", err)
	}
	if err := d.analyticsFlow(ctx, analyticsURL); err != nil {
		return fmt.Errorf("demo: analytics: %w", err)
	}
	d.mark("encrypted analytics")
	if err := d.committeeFlow(ctx, analyticsURL); err != nil {
		return fmt.Errorf("demo: committee study: %w", err)
	}
	d.mark("committee study: three institutions hold the key, two release")
	if err := d.tokenExpiry(ctx, scoringURL); err != nil {
		return fmt.Errorf("demo: tokens: %w", err)
	}
	d.mark("continuous authentication: a token expires mid-run and is refreshed")
	d.refusals(ctx, scoringURL)
	d.mark("refusals")
	return nil
}

// identities starts the online CA and has every workload join it with a one-time
// token; the CA certifies each workload's sealing key with its ML-DSA-65 key along with
// every certificate (ca.WithSealingIdentity), so no identity touches the disk.
func (d *demo) identities(ctx context.Context) error {
	caDir := filepath.Join(d.dir, "ca")
	c, err := pki.InitCA(caDir, demoTD)
	if err != nil {
		return err
	}
	if d.suite.s == pqkex.SM2MLKEM768() {
		if c, err = addSM2(caDir, c); err != nil {
			return err
		}
	}
	d.ca = c
	svc, err := ca.New(caDir, ca.WithLogger(d.logger))
	if err != nil {
		return err
	}
	srv, err := ca.NewServer(svc, nil, []net.IP{net.IPv4(127, 0, 0, 1)}, rpc.WithLogger(d.logger))
	if err != nil {
		return err
	}
	if d.caURL, err = d.serve(ctx, srv); err != nil {
		return err
	}
	d.rep.CA = d.caURL
	bundle := x509bundle.FromX509Authorities(c.TrustDomain(), []*x509.Certificate{c.Root()})
	for name, id := range demoIDs {
		sid := spiffeid.RequireFromString(id)
		token, err := ca.NewToken(caDir, id, 10*time.Minute, time.Now())
		if err != nil {
			return err
		}
		client := ca.NewClient(d.caURL, bundle, token, ca.WithSealingIdentity(d.suite.s))
		src, err := transport.NewRenewingSource(ctx, client, sid,
			transport.WithCertTTL(time.Hour), transport.WithLogger(d.logger))
		if err != nil {
			return err
		}
		d.stops = append(d.stops, func() { _ = src.Close() })
		d.srcs[name], d.cas[name] = src, client
	}
	return nil
}

// serve runs srv on a loopback port until the demo ends and returns its URL.
func (d *demo) serve(ctx context.Context, srv *rpc.Server) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	sctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(sctx, ln) }()
	d.stops = append(d.stops, func() {
		stop()
		if err := <-done; err != nil {
			d.logger.Warn("demo server shutdown", "err", err)
		}
	})
	return "https://" + ln.Addr().String(), nil
}

func (d *demo) sealing(name string) (*pqkex.Server, error) {
	return newSealingServerFrom(d.cas[name], pqkex.Strict, nil, nil, d.suite.serverPolicy()...)
}

// client is name's HTTP client to serverName (strict PQ TLS, sealed end to end), and
// the Connect options that attach name's access tokens for serverName to every call.
func (d *demo) client(name, serverName string) (*http.Client, []connect.ClientOption, error) {
	opts, err := d.clientOptions(name, serverName)
	if err != nil {
		return nil, nil, err
	}
	hc := rpc.NewHTTPClient(d.srcs[name], transport.AuthorizeID(spiffeid.RequireFromString(demoIDs[serverName])), opts...)
	ts, ok := d.sources[[2]string{name, serverName}]
	if !ok {
		authOpts, err := d.clientOptions(name, "auth")
		if err != nil {
			return nil, nil, err
		}
		ts = auth.NewTokenSource(d.srcs[name], d.authURL, transport.AuthorizeID(spiffeid.RequireFromString(demoIDs["auth"])),
			spiffeid.RequireFromString(demoIDs[serverName]), auth.WithClock(d.clientNow), auth.WithClientOptions(authOpts...))
		d.sources[[2]string{name, serverName}] = ts
	}
	return hc, append(rpc.ClientOptions(), rpc.WithAccessTokens(ts)), nil
}

// clientOptions are name's HTTP client options to serverName: strict PQ TLS, sealed.
func (d *demo) clientOptions(name, serverName string) ([]rpc.ClientOption, error) {
	roots, err := d.cas[name].SealingRoots()
	if err != nil {
		return nil, err
	}
	pc, err := sealingClient(d.cas[name], roots, pqkex.AuthorizeID(demoIDs[serverName]), true, d.suite.policy()...)
	if err != nil {
		return nil, err
	}
	return []rpc.ClientOption{rpc.WithPQMode(transport.PQStrict), rpc.WithClientSealing(pc)}, nil
}

// startTokens starts the token service (veil serve --service auth): any workload of the
// trust domain may ask it for a token; the servers decide what the caller may do.
func (d *demo) startTokens(ctx context.Context) error {
	key, err := auth.LoadOrCreateKey(filepath.Join(d.dir, "auth.key"))
	if err != nil {
		return err
	}
	d.tokenKey = key.Public().(ed25519.PublicKey)
	d.tokens = auth.New(spiffeid.RequireFromString(demoIDs["auth"]), key, auth.DefaultTokenTTL, auth.WithClock(d.serverNow))
	d.rep.Tokens.TTLSeconds = d.tokens.TTL().Seconds()
	sealer, err := d.sealing("auth")
	if err != nil {
		return err
	}
	srv, err := rpc.NewServer(d.srcs["auth"], rpc.WithPQMode(transport.PQStrict), rpc.WithPeerCertificates(),
		rpc.WithPolicy(rpc.NewPolicy().MustAllow("/"+authv1connect.TokenServiceName+"/*", "spiffe://"+demoTD)),
		rpc.WithSealing(sealer), rpc.WithLogger(d.logger))
	if err != nil {
		return err
	}
	rpc.Register[authv1connect.TokenServiceHandler](srv, authv1connect.NewTokenServiceHandler, d.tokens)
	d.authURL, err = d.serve(ctx, srv)
	return err
}

// requireTokens is the server option of veil serve --require-token for serverName.
func (d *demo) requireTokens(serverName string) rpc.ServerOption {
	return rpc.WithBoundTokens(rpc.TokenVerifier{Issuer: demoIDs["auth"], Key: d.tokenKey, Audience: demoIDs[serverName], Now: d.serverNow})
}

func (d *demo) startScoring(ctx context.Context, samples int) (string, *scoring.Model, scoring.Dataset, error) {
	data, err := scoring.Synthetic(42, samples+600, 8)
	if err != nil {
		return "", nil, scoring.Dataset{}, err
	}
	train, test, err := data.Split(float64(samples)/float64(samples+600), 42)
	if err != nil {
		return "", nil, scoring.Dataset{}, err
	}
	model, err := scoring.Train(train.X, train.Y, scoring.TrainOptions{})
	if err != nil {
		return "", nil, scoring.Dataset{}, err
	}
	d.rep.Scoring.PlaintextAccuracy = model.Accuracy(test.X, test.Y)
	svc, err := scoring.New(model)
	if err != nil {
		return "", nil, scoring.Dataset{}, err
	}
	sealer, err := d.sealing("scoring")
	if err != nil {
		return "", nil, scoring.Dataset{}, err
	}
	policy := rpc.NewPolicy().MustAllow("*", "spiffe://"+demoTD+"/ns/demo/sa/*")
	srv, err := rpc.NewServer(d.srcs["scoring"], append(svc.ServerOptions(), rpc.WithPQMode(transport.PQStrict),
		rpc.WithPolicy(policy), rpc.WithSealing(sealer), d.requireTokens("scoring"), rpc.WithLogger(d.logger))...)
	if err != nil {
		return "", nil, scoring.Dataset{}, err
	}
	d.verifiers = append(d.verifiers, srv)
	svc.Register(srv)
	rpc.Register[echov1connect.EchoServiceHandler](srv, echov1connect.NewEchoServiceHandler, echo.New())
	url, err := d.serve(ctx, srv)
	return url, model, test, err
}

func (d *demo) startAnalytics(ctx context.Context) (string, error) {
	svc, err := analytics.New(analytics.WithLogger(d.logger))
	if err != nil {
		return "", err
	}
	sealer, err := d.sealing("analytics")
	if err != nil {
		return "", err
	}
	policy := rpc.NewPolicy().MustAllow("*", "spiffe://"+demoTD+"/ns/demo/sa/analyst", "spiffe://"+demoTD+"/ns/clinics/sa/*", "spiffe://"+demoTD+"/ns/committee/sa/*")
	srv, err := rpc.NewServer(d.srcs["analytics"], append(analytics.ServerOptions(he.ParamsN13()), rpc.WithPQMode(transport.PQStrict),
		rpc.WithPolicy(policy), rpc.WithSealing(sealer), d.requireTokens("analytics"), rpc.WithLogger(d.logger))...)
	if err != nil {
		return "", err
	}
	d.verifiers = append(d.verifiers, srv)
	svc.Register(srv)
	return d.serve(ctx, srv)
}

// protocolTour calls echo with each protocol and stream kind, sealed end to end.
func (d *demo) protocolTour(ctx context.Context, url string) error {
	hc, opts, err := d.client("client", "scoring")
	if err != nil {
		return err
	}
	var hsStart time.Time
	cctx := httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		TLSHandshakeStart: func() { hsStart = time.Now() },
		TLSHandshakeDone: func(cs tls.ConnectionState, err error) {
			if err == nil && d.rep.TLSGroup == "" {
				d.rep.Handshake = ms(time.Since(hsStart))
				d.rep.TLSVersion = tls.VersionName(cs.Version)
				d.rep.TLSGroup = cs.CurveID.String()
			}
		},
	})
	for _, p := range []struct {
		name string
		opts []connect.ClientOption
	}{{"connect", nil}, {"grpc", []connect.ClientOption{connect.WithGRPC()}}, {"grpc-web", []connect.ClientOption{connect.WithGRPCWeb()}}} {
		c := echov1connect.NewEchoServiceClient(hc, url, append(opts, p.opts...)...)
		d.rep.Calls = append(d.rep.Calls, timed(p.name, "unary", func() error {
			res, err := c.Echo(cctx, connect.NewRequest(&echov1.EchoRequest{Message: "hello from " + p.name}))
			if err == nil && res.Msg.GetMessage() != "hello from "+p.name {
				err = errors.New("wrong echo")
			}
			return err
		}))
		d.rep.Calls = append(d.rep.Calls, timed(p.name, "server-stream", func() error {
			s, err := c.EchoStream(cctx, connect.NewRequest(&echov1.EchoStreamRequest{Message: "tick", Count: 3}))
			if err != nil {
				return err
			}
			n := 0
			for s.Receive() {
				n++
			}
			if err := s.Err(); err != nil {
				return err
			}
			if n != 3 {
				return fmt.Errorf("got %d of 3 messages", n)
			}
			return nil
		}))
		if p.name == "grpc-web" {
			continue // gRPC-Web has no bidirectional streaming
		}
		d.rep.Calls = append(d.rep.Calls, timed(p.name, "bidi-stream", func() error {
			b := c.EchoBidi(cctx)
			if err := b.Send(&echov1.EchoBidiRequest{Message: "ping"}); err != nil {
				return err
			}
			m, err := b.Receive()
			if err != nil {
				return err
			}
			if m.GetMessage() != "ping" {
				return errors.New("wrong echo")
			}
			return b.CloseRequest()
		}))
	}
	for _, c := range d.rep.Calls {
		if !c.OK {
			return fmt.Errorf("demo: %s %s failed: %s", c.Protocol, c.Kind, c.Error)
		}
	}
	return nil
}

func (d *demo) scoringFlow(ctx context.Context, url string, model *scoring.Model, test scoring.Dataset) error {
	hc, opts, err := d.client("client", "scoring")
	if err != nil {
		return err
	}
	bar := newProgressBar(d.bar, "evaluation-key upload")
	c, err := scoring.NewClient(ctx, hc, url, scoring.WithConnectOptions(opts...), scoring.WithProgress(func(p scoring.Progress) {
		if p.Stage == "upload" {
			bar.set(p.Done, p.Total)
		}
	}))
	if err != nil {
		return err
	}
	d.mark("scoring: CKKS key generation (relinearization key only, as the server's manifest asks)")
	upload, err := c.UploadKeys(ctx)
	if err != nil {
		return err
	}
	d.mark("scoring: evaluation-key upload")
	probs, st, err := c.Score(ctx, test.X)
	if err != nil {
		return err
	}
	d.mark("scoring: encrypt, score on ciphertexts, decrypt")
	sc := &d.rep.Scoring
	sc.Samples, sc.Features = len(probs), c.Info().Features
	sc.Params, sc.Output = c.Info().Params.String(), c.Info().Output.String()
	sc.KeyBytes, sc.KeyGenMillis = st.KeyBytes, ms(st.KeyGen)
	sc.UploadMillis, sc.ScoreMillis = ms(upload), ms(st.Total)
	if upload > 0 {
		sc.UploadMBPerSecond = float64(st.KeyBytes) / (1 << 20) / upload.Seconds()
	}
	sc.BytesSent, sc.BytesReceived = st.BytesSent, st.BytesReceived
	agree := 0
	for i, x := range test.X {
		want := model.Predict(x)
		sc.MaxAbsError = math.Max(sc.MaxAbsError, math.Abs(probs[i]-want))
		if (probs[i] >= 0.5) == (want >= 0.5) {
			agree++
		}
	}
	sc.Agreement = float64(agree) / float64(len(probs))
	return nil
}

// analyst is the demo's analyst at url, with a fresh N13 key.
func (d *demo) analyst(url string) (*analytics.Analyst, error) {
	hc, opts, err := d.client("analyst", "analytics")
	if err != nil {
		return nil, err
	}
	key, err := he.NewClient(he.ParamsN13())
	if err != nil {
		return nil, err
	}
	return analytics.NewAnalyst(hc, url, key, d.srcs["analyst"], opts...), nil
}

func (d *demo) analyticsFlow(ctx context.Context, url string) error {
	analyst, err := d.analyst(url)
	if err != nil {
		return err
	}
	const dim = 3
	// The synthetic features lie well inside [-1e4, 1e4]: clipping changes nothing.
	spec := analytics.StudySpec{ID: "demo-vitals", OwnerPatterns: []string{"spiffe://" + demoTD + "/ns/clinics/sa/*"}, Dimension: dim,
		Ranges: []analytics.Range{{Min: -1e4, Max: 1e4}}, MinOwners: 3}
	if err := analyst.CreateStudy(ctx, spec); err != nil {
		return err
	}
	data, err := scoring.Synthetic(7, 300, dim)
	if err != nil {
		return err
	}
	owners := []string{"owner-1", "owner-2", "owner-3"}
	per := len(data.X) / len(owners)
	for i, name := range owners {
		ohc, oopts, err := d.client(name, "analytics")
		if err != nil {
			return err
		}
		owner := analytics.NewOwner(ohc, url, d.srcs[name], spiffeid.MatchID(spiffeid.RequireFromString(demoIDs["analyst"])), oopts...)
		records := data.X[i*per : (i+1)*per]
		if _, err := owner.Submit(ctx, spec.ID, "batch-1", records); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		// A retry of the same submission is recognised and counted once.
		if again, err := owner.Submit(ctx, spec.ID, "batch-1", records); err != nil {
			return err
		} else if again.Duplicate {
			d.rep.Analytics.Duplicates++
		}
	}
	if _, err := analyst.Close(ctx, spec.ID); err != nil {
		return err
	}
	res, err := analyst.Result(ctx, spec.ID)
	if err != nil {
		return err
	}
	all := data.X[:per*len(owners)]
	an := &d.rep.Analytics
	an.Owners, an.Records, an.Dimension = len(owners), len(all), dim
	if res.Count != uint64(len(all)) {
		return fmt.Errorf("result counts %d records, the owners sent %d", res.Count, len(all))
	}
	for j := range dim {
		var sum, sq float64
		for _, x := range all {
			sum += x[j]
			sq += x[j] * x[j]
		}
		mean := sum / float64(len(all))
		variance := sq/float64(len(all)) - mean*mean
		an.MaxAbsError = math.Max(an.MaxAbsError, math.Max(math.Abs(res.Mean[j]-mean), math.Abs(res.Variance[j]-variance)))
	}
	return nil
}

// committeeFlow runs a committee study: the bank, the hospital and the agency hold
// the key (t = 2); the clinics submit; the agency stays offline at release; the bank
// alone gets nothing; the bank and the hospital release to the analyst.
func (d *demo) committeeFlow(ctx context.Context, url string) error {
	analyst, err := d.analyst(url)
	if err != nil {
		return err
	}
	const dim = 3
	names := []string{"bank", "hospital", "agency"}
	ids := make([]string, len(names))
	for i, n := range names {
		ids[i] = demoIDs[n]
	}
	spec := analytics.StudySpec{ID: "demo-joint", OwnerPatterns: []string{"spiffe://" + demoTD + "/ns/clinics/sa/*"}, Dimension: dim,
		Ranges: []analytics.Range{{Min: -1e4, Max: 1e4}}, MinOwners: 3}
	if err := analyst.CreateCommitteeStudy(ctx, spec, analytics.CommitteeSpec{Members: ids, Threshold: 2}); err != nil {
		return err
	}
	analystID := spiffeid.MatchID(spiffeid.RequireFromString(demoIDs["analyst"]))
	members := make([]*analytics.Member, len(names))
	for i, n := range names {
		mhc, mopts, err := d.client(n, "analytics")
		if err != nil {
			return err
		}
		members[i] = analytics.NewMember(mhc, url, d.srcs[n], d.srcs[n], analystID, mopts...)
		if _, err := members[i].Join(ctx, spec.ID); err != nil {
			return fmt.Errorf("%s joins: %w", n, err)
		}
	}
	// Every member posts its sealed Shamir shares, then collects those sealed to it:
	// two passes once all have joined.
	for pass := 0; ; pass++ {
		pending := 0
		for i, m := range members {
			switch err := m.Setup(ctx, spec.ID); {
			case errors.Is(err, analytics.ErrSetupPending):
				pending++
			case err != nil:
				return fmt.Errorf("%s setup: %w", names[i], err)
			}
		}
		if pending == 0 {
			break
		}
		if pass == 2 {
			return errors.New("committee setup incomplete after three passes")
		}
	}
	data, err := scoring.Synthetic(11, 300, dim)
	if err != nil {
		return err
	}
	owners := []string{"owner-1", "owner-2", "owner-3"}
	per := len(data.X) / len(owners)
	for i, name := range owners {
		ohc, oopts, err := d.client(name, "analytics")
		if err != nil {
			return err
		}
		owner := analytics.NewOwner(ohc, url, d.srcs[name], analystID, oopts...)
		if _, err := owner.Submit(ctx, spec.ID, "batch-1", data.X[i*per:(i+1)*per]); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	if _, err := analyst.Close(ctx, spec.ID); err != nil {
		return err
	}
	c := &d.rep.Committee
	c.Members, c.Threshold = len(names), 2
	active := []int{1, 2} // the agency (3) is offline
	if _, err := members[0].Release(ctx, spec.ID, active); err != nil {
		return fmt.Errorf("bank releases: %w", err)
	}
	_, err = analyst.Result(ctx, spec.ID)
	c.LoneMemberRefused = connect.CodeOf(err) == connect.CodeFailedPrecondition
	r, err := members[1].Release(ctx, spec.ID, active)
	if err != nil {
		return fmt.Errorf("hospital releases: %w", err)
	}
	c.ReleasedWith = r.Shares
	res, err := analyst.Result(ctx, spec.ID)
	if err != nil {
		return err
	}
	all := data.X[:per*len(owners)]
	for j := range dim {
		var sum, sq float64
		for _, x := range all {
			sum += x[j]
			sq += x[j] * x[j]
		}
		mean := sum / float64(len(all))
		variance := sq/float64(len(all)) - mean*mean
		c.MaxAbsError = math.Max(c.MaxAbsError, math.Max(math.Abs(res.Mean[j]-mean), math.Abs(res.Variance[j]-variance)))
	}
	return nil
}

// refusals shows calls that must fail: no client certificate, an unsealed call to a
// sealing-strict server, and a verified identity the policy does not allow.
func (d *demo) refusals(ctx context.Context, url string) {
	noCert := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}}}
	_, err := echov1connect.NewEchoServiceClient(noCert, url).Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
	d.rep.Refused = append(d.rep.Refused, demoRefusal{"client without a certificate", refusal(err)})
	unsealed := echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(d.srcs["client"], transport.AuthorizeID(spiffeid.RequireFromString(demoIDs["scoring"]))), url, rpc.ClientOptions()...)
	_, err = unsealed.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "in the clear"}))
	d.rep.Refused = append(d.rep.Refused, demoRefusal{"unsealed call to a PQ-seal strict server", refusal(err)})
	hc, opts, err := d.client("intruder", "scoring")
	if err == nil {
		_, err = echov1connect.NewEchoServiceClient(hc, url, opts...).Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
	}
	d.rep.Refused = append(d.rep.Refused, demoRefusal{demoIDs["intruder"] + " (not in policy)", refusal(err)})
	// Sealed, with the client's certificate, but without an access token.
	hc, _, err = d.client("client", "scoring")
	if err == nil {
		_, err = echov1connect.NewEchoServiceClient(hc, url, rpc.ClientOptions()...).Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
	}
	d.rep.Refused = append(d.rep.Refused, demoRefusal{"sealed call without an access token", refusal(err)})
}

// tokenExpiry makes calls while the client's token ages: first the clocks move to
// where the token has less than a fifth of its life left (the client refreshes it
// before sending), then the servers' clock alone moves past the new token's expiry,
// as if the client's clock lagged: the server answers token_expired, the client
// fetches a new token and retries. No call may fail.
func (d *demo) tokenExpiry(ctx context.Context, url string) error {
	hc, opts, err := d.client("client", "scoring")
	if err != nil {
		return err
	}
	c := echov1connect.NewEchoServiceClient(hc, url, opts...)
	tk := &d.rep.Tokens
	calls := func(n int) {
		for i := range n {
			msg := fmt.Sprintf("call %d", tk.Calls)
			res, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: msg}))
			if err != nil || res.Msg.GetMessage() != msg {
				d.logger.Warn("token phase call failed", "call", i, "err", err)
				tk.FailedCalls++
			}
			tk.Calls++
		}
	}
	ttl := d.tokens.TTL()
	calls(3)
	early := ttl - ttl/6 // less than a fifth of the token's life left
	d.serverSkew.Add(int64(early))
	d.clientSkew.Add(int64(early))
	calls(3)
	d.serverSkew.Add(int64(ttl + rpc.DefaultTokenLeeway + time.Second))
	calls(3)
	for _, ts := range d.sources {
		st := ts.Stats()
		tk.RefreshedEarly += st.Early
		tk.RefreshedOnExpiry += st.Forced
	}
	tk.Refreshed = tk.RefreshedEarly + tk.RefreshedOnExpiry
	tk.Issued = d.tokens.Issued()
	for _, srv := range d.verifiers {
		n, err := rpc.CounterValue(srv.Registerer().(prometheus.Gatherer), "veil_rpc_auth_refusals_total", "reason", rpc.AuthReasonExpired)
		if err != nil {
			return err
		}
		tk.ExpiredRefusals += int64(n)
	}
	return nil
}

// check fails the demo when a result is off: scripts may rely on its exit code.
func (d *demo) check() error {
	for _, r := range d.rep.Refused {
		if r.Result == "accepted" {
			return fmt.Errorf("demo: %s was accepted", r.Case)
		}
	}
	if d.rep.Scoring.Agreement < 0.99 {
		return fmt.Errorf("demo: encrypted and plaintext scores agree on only %.1f%% of samples", 100*d.rep.Scoring.Agreement)
	}
	if d.rep.Analytics.MaxAbsError > 1e-3 {
		return fmt.Errorf("demo: encrypted statistics are off by %g", d.rep.Analytics.MaxAbsError)
	}
	if c := d.rep.Committee; !c.LoneMemberRefused || c.ReleasedWith != c.Threshold || c.MaxAbsError > 1 {
		return fmt.Errorf("demo: committee: lone member refused %v, released with %d of threshold %d, off by %g", c.LoneMemberRefused, c.ReleasedWith, c.Threshold, c.MaxAbsError)
	}
	if tk := d.rep.Tokens; tk.FailedCalls > 0 || tk.RefreshedEarly < 1 || tk.RefreshedOnExpiry < 1 || tk.ExpiredRefusals < 1 {
		return fmt.Errorf("demo: tokens: %d of %d calls failed, %d refreshed early, %d after %d expiry refusals", tk.FailedCalls, tk.Calls, tk.RefreshedEarly, tk.RefreshedOnExpiry, tk.ExpiredRefusals)
	}
	return nil
}

func timed(protocol, kind string, f func() error) demoCall {
	t := time.Now()
	err := f()
	c := demoCall{Protocol: protocol, Kind: kind, OK: err == nil, Millis: ms(time.Since(t))}
	if err != nil {
		c.Error = err.Error()
	}
	return c
}

func refusal(err error) string {
	if err == nil {
		return "accepted"
	}
	var ce *connect.Error
	switch {
	case !errors.As(err, &ce), ce.Code() == connect.CodeUnavailable, ce.Code() == connect.CodeUnknown,
		// A server that refuses the TLS handshake resets the connection; connect-go reports
		// a reset during the write as canceled, though nothing was.
		ce.Code() == connect.CodeCanceled:
		return "handshake refused: " + err.Error()
	}
	return ce.Code().String() + ": " + ce.Message()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func printDemo(w io.Writer, r *demoReport) {
	fmt.Fprintf(w, "\nVeil demo: strict mTLS with SPIFFE identities, sealed end to end, computing on encrypted data\n\n")
	fmt.Fprintf(w, "  trust domain   %s, online CA at %s (ECDSA P-256 + ML-DSA-65; workloads joined with one-time tokens)\n", r.TrustDomain, r.CA)
	fmt.Fprintf(w, "  TLS            %s, key exchange %s (PQ %s), handshake %.2f ms\n", r.TLSVersion, r.TLSGroup, r.PQMode, r.Handshake)
	fmt.Fprintf(w, "  sealing        pqkex %s, %s: proxies see only ciphertext\n\n", r.PQSuite, r.PQSeal)
	fmt.Fprintf(w, "  %-9s %-14s %-6s %s\n", "protocol", "call", "result", "time")
	for _, c := range r.Calls {
		res := "ok"
		if !c.OK {
			res = "FAILED " + c.Error
		}
		fmt.Fprintf(w, "  %-9s %-14s %-6s %.2f ms\n", c.Protocol, c.Kind, res, c.Millis)
	}
	s := r.Scoring
	fmt.Fprintf(w, "\n  encrypted scoring (logistic regression on CKKS, %s, server returns %s, client applies the sigmoid)\n", s.Params, s.Output)
	fmt.Fprintf(w, "    %d samples x %d features; agreement with the plaintext model %.2f%%, max |p_enc - p_plain| %.2g\n", s.Samples, s.Features, 100*s.Agreement, s.MaxAbsError)
	fmt.Fprintf(w, "    evaluation keys %s, generated in %.0f ms, uploaded in %.0f ms (%.0f MB/s)\n", fmtBytes(s.KeyBytes), s.KeyGenMillis, s.UploadMillis, s.UploadMBPerSecond)
	fmt.Fprintf(w, "    scored in %.0f ms; %s sent, %s received; plaintext model accuracy %.1f%%\n", s.ScoreMillis, fmtBytes(s.BytesSent), fmtBytes(s.BytesReceived), 100*s.PlaintextAccuracy)
	a := r.Analytics
	fmt.Fprintf(w, "\n  encrypted analytics: %d owners, %d records of %d values; mean and variance off by at most %.2g; %d retried submissions counted once\n", a.Owners, a.Records, a.Dimension, a.MaxAbsError, a.Duplicates)
	c := r.Committee
	fmt.Fprintf(w, "  committee study: %d institutions hold the key, threshold %d; one offline, released with %d; one member alone refused: %v; mean and variance off by at most %.2g (smudged)\n", c.Members, c.Threshold, c.ReleasedWith, c.LoneMemberRefused, c.MaxAbsError)
	tk := r.Tokens
	fmt.Fprintf(w, "\n  continuous authentication: every call carries a %.0f s token bound to the caller's certificate, for one server\n", tk.TTLSeconds)
	fmt.Fprintf(w, "    %d tokens issued; %d refreshed before expiry; the servers' clock then passed the token's expiry: %d token_expired refusal(s), %d refreshed and retried; %d of %d calls failed\n",
		tk.Issued, tk.RefreshedEarly, tk.ExpiredRefusals, tk.RefreshedOnExpiry, tk.FailedCalls, tk.Calls)
	fmt.Fprintf(w, "\n  refused as they should be:\n")
	for _, rf := range r.Refused {
		fmt.Fprintf(w, "    %-58s %s\n", rf.Case, rf.Result)
	}
	fmt.Fprintf(w, "\n  steps:\n")
	for _, st := range r.Steps {
		fmt.Fprintf(w, "    %8.0f ms  %s\n", st.Millis, st.Step)
	}
	fmt.Fprintf(w, "\n  total %.1f s\n", r.TotalSeconds)
}
