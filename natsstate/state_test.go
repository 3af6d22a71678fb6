package natsstate_test

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/internal/testpki"
	"github.com/veilrpc/veil/natsstate"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
)

// natsServer is a real JetStream server in the test process, with TLS whose clients
// must present a certificate from the test CA (verify: true), as in production.
type natsServer struct {
	t    *testing.T
	pki  *testpki.PKI
	opts *server.Options
	srv  *server.Server
	url  string
}

func startNATS(t *testing.T) *natsServer {
	t.Helper()
	tp := testpki.New(t, "example.org")
	dir := filepath.Join(tp.Dir, "nats-server")
	if err := tp.CA.IssueFiles(spiffeid.RequireFromString("spiffe://example.org/nats"), dir, time.Hour, pki.WithDNSNames("localhost")); err != nil {
		t.Fatal(err)
	}
	tlsc, err := server.GenTLSConfig(&server.TLSConfigOpts{
		CertFile: filepath.Join(dir, "tls.crt"), KeyFile: filepath.Join(dir, "tls.key"), CaFile: filepath.Join(dir, "ca.crt"), Verify: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	opts := &server.Options{
		Host: "localhost", Port: -1, JetStream: true, StoreDir: t.TempDir(),
		TLS: true, TLSVerify: true, TLSConfig: tlsc, TLSTimeout: 5, NoSigs: true, NoLog: true,
	}
	n := &natsServer{t: t, pki: tp, opts: opts}
	n.start()
	opts.Port = n.srv.Addr().(*net.TCPAddr).Port // a restart listens where clients reconnect
	n.url = "tls://localhost:" + itoa(opts.Port)
	t.Cleanup(n.stop)
	return n
}

func itoa(n int) string { return (&net.TCPAddr{Port: n}).String()[1:] }

func (n *natsServer) start() {
	n.t.Helper()
	srv, err := server.NewServer(n.opts)
	if err != nil {
		n.t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		n.t.Fatal("nats-server did not start")
	}
	n.srv = srv
}

func (n *natsServer) stop() {
	if n.srv != nil {
		n.srv.Shutdown()
		n.srv.WaitForShutdown()
		n.srv = nil
	}
}

// connect connects as a workload with SPIFFE ID id.
func (n *natsServer) connect(id string) *natsstate.State {
	n.t.Helper()
	s, err := natsstate.Connect(context.Background(), natsstate.Config{URL: n.url, Source: n.pki.Identity(n.t, id), Timeout: 3 * time.Second})
	if err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(s.Close)
	return s
}

func TestConnectNeedsWorkloadIdentity(t *testing.T) {
	n := startNATS(t)
	if _, err := natsstate.Connect(context.Background(), natsstate.Config{URL: n.url, Timeout: 2 * time.Second}); err == nil {
		t.Fatal("connected without a client certificate")
	}
	foreign := testpki.New(t, "example.org")
	if _, err := natsstate.Connect(context.Background(), natsstate.Config{URL: n.url, Source: foreign.Identity(t, "spiffe://example.org/scoring"), Timeout: 2 * time.Second}); err == nil {
		t.Fatal("connected with a certificate from another CA (and trusting another CA)")
	}
	s := n.connect("spiffe://example.org/scoring")
	if err := s.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// Two replicas (registries with their own connections) over one bucket: keys uploaded
// through one are used by the other, ownership holds across them, and a NATS outage is
// unavailable, then served again after NATS returns, from the data it stored.
func TestEvaluationKeysAcrossReplicas(t *testing.T) {
	n := startNATS(t)
	ctx := context.Background()
	params := he.ParamsN13()
	client, err := he.NewClient(params)
	if err != nil {
		t.Fatal(err)
	}
	set, err := client.GenEvaluationKeys(he.NewManifest(params, he.NeedRelinearization()))
	if err != nil {
		t.Fatal(err)
	}
	data, err := set.Encode()
	if err != nil {
		t.Fatal(err)
	}
	registry := func() *keys.Registry {
		ks, err := n.connect("spiffe://example.org/scoring").EvaluationKeys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		r, err := keys.NewRegistry(params, keys.WithKeyStore(ks, 3*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	r1, r2 := registry(), registry()
	const alice, bob = "spiffe://example.org/ns/a/sa/alice", "spiffe://example.org/ns/a/sa/bob"
	id, err := r1.Put(alice, data)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r2.Keys(bob, id); keys.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("another identity on replica 2: %v", err)
	}
	if _, err := r2.Evaluator(alice, id); err != nil {
		t.Fatalf("replica 2 with keys uploaded through replica 1: %v", err)
	}

	r3 := registry() // holds nothing in memory: it must read the store
	n.stop()
	if _, err := r3.Keys(alice, id); keys.CodeOf(err) != connect.CodeUnavailable {
		t.Errorf("lookup during the outage: %v, want unavailable", err)
	}
	other, err := client.GenEvaluationKeys(he.NewManifest(params, he.NeedRotations(1)))
	if err != nil {
		t.Fatal(err)
	}
	otherData, _ := other.Encode()
	if _, err := r1.Put(alice, otherData); keys.CodeOf(err) != connect.CodeUnavailable {
		t.Errorf("upload during the outage: %v, want unavailable (not acknowledged)", err)
	}
	n.start()
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, err := r3.Keys(alice, id)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after NATS returned: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestStudiesCountOnce(t *testing.T) {
	n := startNATS(t)
	ctx := context.Background()
	a, err := n.connect("spiffe://example.org/analytics").Studies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.connect("spiffe://example.org/analytics").Studies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Study(ctx, "s1"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing study: %v", err)
	}
	if ids, err := a.Studies(ctx); err != nil || len(ids) != 0 {
		t.Fatalf("empty bucket lists %v, %v", ids, err)
	}
	if err := a.CreateStudy(ctx, "s1", []byte("study one")); err != nil {
		t.Fatal(err)
	}
	if err := b.CreateStudy(ctx, "s1", []byte("another")); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second create through another replica: %v, want fs.ErrExist", err)
	}
	if rec, err := b.Study(ctx, "s1"); err != nil || string(rec) != "study one" {
		t.Fatalf("study through replica 2: %q, %v", rec, err)
	}
	// The same idempotency key through both replicas at once: exactly one adds.
	name := "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	var added atomic.Int32
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			st := a
			if i%2 == 1 {
				st = b
			}
			ok, err := st.AddSubmission(ctx, "s1", name, []byte{byte(i)})
			if err != nil {
				t.Error(err)
			}
			if ok {
				added.Add(1)
			}
		})
	}
	wg.Wait()
	if added.Load() != 1 {
		t.Fatalf("%d concurrent adds of one name succeeded, want 1", added.Load())
	}
	names, err := b.Submissions(ctx, "s1")
	if err != nil || len(names) != 1 || names[0] != name {
		t.Fatalf("submissions = %v, %v", names, err)
	}
	rec, err := a.Submission(ctx, "s1", name)
	if err != nil || len(rec) != 1 {
		t.Fatalf("submission = %v, %v", rec, err)
	}
	if ids, err := b.Studies(ctx); err != nil || len(ids) != 1 || ids[0] != "s1" {
		t.Fatalf("studies = %v, %v", ids, err)
	}
	if _, err := a.AddSubmission(ctx, "s1", "../x", nil); err == nil {
		t.Error("a malformed submission name was accepted")
	}
}

// Replicas share ticket keys: the first creates them, a rotation by one reaches the
// other, the old key stays for the overlap, and two replicas rotating at once rotate
// once.
func TestTicketKeysRotateAcrossReplicas(t *testing.T) {
	n := startNATS(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, err := n.connect("spiffe://example.org/scoring").TicketKeys(ctx, "spiffe://example.org/scoring", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.connect("spiffe://example.org/scoring").TicketKeys(ctx, "spiffe://example.org/scoring", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if a.CurrentID() != b.CurrentID() {
		t.Fatalf("replicas start on keys %d and %d", a.CurrentID(), b.CurrentID())
	}
	go b.Run(ctx)
	first := a.CurrentID()
	time.Sleep(200 * time.Millisecond) // b's watch is set up
	id, err := a.Rotate(ctx)
	if err != nil || id != first+1 {
		t.Fatalf("rotate = %d, %v", id, err)
	}
	waitFor(t, func() bool { return b.CurrentID() == id }, "replica 2 adopts the rotated key")
	if !b.Keys().Has(first) || !a.Keys().Has(first) {
		t.Error("the previous key was dropped before the overlap ended")
	}
	// Both rotate from the same view: one wins, both end on its key.
	c, err := n.connect("spiffe://example.org/scoring").TicketKeys(ctx, "spiffe://example.org/scoring", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	ids := make([]uint32, 2)
	for i, r := range []*natsstate.TicketKeys{a, c} {
		wg.Go(func() {
			id, err := r.Rotate(ctx)
			if err != nil {
				t.Error(err)
			}
			ids[i] = id
		})
	}
	wg.Wait()
	if ids[0] != id+1 || ids[1] != id+1 {
		t.Fatalf("concurrent rotations ended on %v, want both %d", ids, id+1)
	}
	waitFor(t, func() bool { return b.CurrentID() == id+1 }, "replica 2 adopts the winner's key")
}

// With a short period, a running replica rotates on its own and the others follow.
func TestTicketKeysRotateByAge(t *testing.T) {
	n := startNATS(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, err := n.connect("spiffe://example.org/scoring").TicketKeys(ctx, "spiffe://example.org/scoring", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.connect("spiffe://example.org/scoring").TicketKeys(ctx, "spiffe://example.org/scoring", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	first := a.CurrentID()
	go a.Run(ctx)
	go b.Run(ctx)
	waitFor(t, func() bool { return a.CurrentID() > first && b.CurrentID() == a.CurrentID() }, "a rotation by age on both replicas")
}

// Each service has its own ticket-key bucket and secrets (docs/pqkex.md 7.1); rotating
// one leaves the other alone, and the bucket keeps only the current and previous keys: a
// key is gone from NATS at the rotation after the one that retired it.
func TestTicketKeysPerService(t *testing.T) {
	n := startNATS(t)
	ctx := context.Background()
	const scoring, analytics = "spiffe://example.org/scoring", "spiffe://example.org/ns/prod/sa/analytics"
	a, err := n.connect(scoring).TicketKeys(ctx, scoring, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.connect(analytics).TicketKeys(ctx, analytics, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(n.url, nats.Secure(natsstate.ClientTLS(n.pki.Identity(t, "spiffe://example.org/probe"), nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	values := func(service string) [][]byte {
		t.Helper()
		name, err := natsstate.TicketKeyBucket(service)
		if err != nil {
			t.Fatal(err)
		}
		kv, err := js.KeyValue(ctx, "veil-"+name)
		if err != nil {
			t.Fatal(err)
		}
		hist, err := kv.History(ctx, "current")
		if err != nil {
			t.Fatal(err)
		}
		var out [][]byte
		for _, e := range hist {
			out = append(out, e.Value())
		}
		return out
	}
	ba, bb := values(scoring), values(analytics)
	if len(ba) != 1 || len(bb) != 1 || string(ba[0]) == string(bb[0]) {
		t.Fatal("two services share a ticket key")
	}
	if na, _ := natsstate.TicketKeyBucket(scoring); na != "ticket-keys-scoring-"+na[len(na)-32:] {
		t.Fatalf("bucket name %q", na)
	}
	first := a.CurrentID()
	for range 2 {
		if _, err := a.Rotate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	hist := values(scoring)
	if len(hist) != 2 {
		t.Fatalf("the bucket holds %d keys, want 2 (current and previous)", len(hist))
	}
	for _, v := range hist {
		if string(v) == string(ba[0]) {
			t.Fatal("the first key is still in the bucket after two rotations")
		}
	}
	if a.Keys().Has(first) {
		t.Fatal("the replica still holds the first key after two rotations")
	}
	if b.CurrentID() != first || len(values(analytics)) != 1 {
		t.Fatal("rotating one service's keys changed another's")
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Touch refreshes a stored key set's modification time (the registry's TTL counts
// from it) without rewriting its chunks; Delete removes it.
func TestEvaluationKeysTouchAndDelete(t *testing.T) {
	n := startNATS(t)
	ctx := context.Background()
	ks, err := n.connect("spiffe://example.org/scoring").EvaluationKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	id := he.KeyID("ab" + strings.Repeat("0", 62))
	if _, err := ks.Stat(ctx, id); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("stat of a missing set: %v", err)
	}
	if err := ks.Save(ctx, id, "spiffe://example.org/a", []byte("key bytes")); err != nil {
		t.Fatal(err)
	}
	before, err := ks.Stat(ctx, id)
	if err != nil || before.Owner != "spiffe://example.org/a" || before.Size != 9 {
		t.Fatalf("stat = %+v, %v", before, err)
	}
	time.Sleep(20 * time.Millisecond)
	if err := ks.Touch(ctx, id); err != nil {
		t.Fatal(err)
	}
	after, err := ks.Stat(ctx, id)
	if err != nil || !after.Modified.After(before.Modified) || after.Owner != before.Owner {
		t.Fatalf("after touch: %+v (before %+v), %v", after, before, err)
	}
	if b, err := ks.Load(ctx, id); err != nil || string(b) != "key bytes" {
		t.Fatalf("load = %q, %v", b, err)
	}
	if err := ks.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := ks.Load(ctx, id); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("load after delete: %v", err)
	}
	if err := ks.Delete(ctx, id); err != nil {
		t.Fatalf("deleting a missing set: %v", err)
	}
}

// Every bucket reads through its stream leader (no direct gets), so a write
// acknowledged through one replica is read by the next, and opening the buckets again
// (another replica starting) keeps it that way.
func TestBucketsReadFromTheLeader(t *testing.T) {
	n := startNATS(t)
	ctx := context.Background()
	for range 2 {
		s := n.connect("spiffe://example.org/scoring")
		if _, err := s.EvaluationKeys(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Studies(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := s.TicketKeys(ctx, "spiffe://example.org/scoring", time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	nc, err := nats.Connect(n.url, nats.Secure(natsstate.ClientTLS(n.pki.Identity(t, "spiffe://example.org/probe"), nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	tickets, err := natsstate.TicketKeyBucket("spiffe://example.org/scoring")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"OBJ_veil-evaluation-keys", "OBJ_veil-analytics", "KV_veil-analytics", "KV_veil-" + tickets} {
		st, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if c := st.CachedInfo().Config; c.AllowDirect || c.MirrorDirect {
			t.Errorf("%s allows direct gets", name)
		}
	}
}

// The shared replay store accepts each call key once across replicas, even when replicas
// race for it.
func TestReplayStoreAcrossReplicas(t *testing.T) {
	n := startNATS(t)
	ctx := context.Background()
	const svc = "spiffe://example.org/scoring"
	a, err := n.connect(svc).ReplayStore(ctx, svc)
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.connect(svc).ReplayStore(ctx, svc)
	if err != nil {
		t.Fatal(err)
	}
	exp := time.Now().Add(pqkex.ReplayRecordLifetime)
	for i := range byte(20) {
		call := bytes.Repeat([]byte{i}, pqkex.ReplayKeySize)
		var wins atomic.Int64
		var wg sync.WaitGroup
		for _, r := range []*natsstate.ReplayStore{a, b, a, b} {
			wg.Go(func() {
				ok, err := r.Accept(ctx, call, exp)
				if err != nil {
					t.Error(err)
				}
				if ok {
					wins.Add(1)
				}
			})
		}
		wg.Wait()
		if wins.Load() != 1 {
			t.Fatalf("call %d accepted %d times", i, wins.Load())
		}
	}
	if ok, err := b.Accept(ctx, bytes.Repeat([]byte{0xff}, pqkex.ReplayKeySize), exp); err != nil || !ok {
		t.Fatalf("another call: %v, %v", ok, err)
	}
}
