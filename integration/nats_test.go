package integration

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/natsstate"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
	"github.com/veilrpc/veil/services/scoring"
	"github.com/veilrpc/veil/transport"
)

// natsTopology is two Veil replicas (echo, scoring and analytics, sealing STRICT) with
// their shared state on a 3-node NATS JetStream cluster, behind a test proxy whose
// route the test moves between them.
type natsTopology struct {
	dir      string
	cluster  *natsCluster
	replicas []*veilContainer
	proxy    *veilContainer
	sealed   *sealedTopology // the proxy's URL and control client
	js       jetstream.JetStream
	model    *scoring.Model
	data     scoring.Dataset
}

const natsServerID = "spiffe://example.org/veil"

// TestStateOnNATS runs the scenarios of shared state on NATS across real containers:
// evaluation keys uploaded through one replica are used by the other; a restarted
// replica serves with the stored keys; one NATS node killed in the middle of an upload
// loses nothing acknowledged; ticket-key rotation reaches both replicas and old tickets
// stay valid for the overlap; the same analytics submission through both replicas at
// once counts once.
func TestStateOnNATS(t *testing.T) {
	s := startNATSTopology(t)
	// Order matters: the scoring scenarios share one client's keys.
	var client *scoring.Client
	t.Run("keys uploaded through one replica are used by the other", func(t *testing.T) { client = s.testKeysAcrossReplicas(t) })
	t.Run("a restarted replica serves with the stored keys", func(t *testing.T) { s.testRestartedReplica(t, client) })
	t.Run("a NATS node killed mid-upload loses nothing acknowledged", s.testNodeKilledMidUpload)
	t.Run("ticket-key rotation reaches every replica with an overlap", s.testTicketRotation)
	t.Run("a submission through both replicas at once counts once", s.testSubmissionCountedOnce)
}

func startNATSTopology(t *testing.T) *natsTopology {
	t.Helper()
	dir := sealedIdentities(t, natsServerID, "spiffe://example.org/proxy", "spiffe://example.org/client",
		"spiffe://example.org/analyst", "spiffe://example.org/ns/owners/sa/o1", "spiffe://example.org/ns/owners/sa/o2")
	ca, err := pki.LoadCA(filepath.Join(dir, "ca"))
	if err != nil {
		t.Fatal(err)
	}
	data, err := scoring.Synthetic(7, 600, 6)
	if err != nil {
		t.Fatal(err)
	}
	model, err := scoring.Train(data.X, data.Y, scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	modelPath := filepath.Join(dir, "model.json")
	if err := model.Save(modelPath); err != nil {
		t.Fatal(err)
	}
	nw := newNetwork(t)
	cluster := startNATSCluster(t, nw, 3, ca)
	s := &natsTopology{dir: dir, cluster: cluster, model: model, data: data}
	var upstreams []string
	for i := range 2 {
		alias := fmt.Sprintf("veil-%d", i)
		args := []string{"/veil", "serve", "--identity", "/identity", "--listen", ":8443",
			"--service", "echo", "--service", "scoring", "--service", "analytics", "--scoring-model", "/identity/model.json",
			"--pq", "strict", "--pq-seal", "strict",
			"--state", "nats", "--state-url", cluster.url(), "--state-replicas", "3", "--state-ticket-key-period", "10s",
			"--allow", "spiffe://example.org/client", "--allow", "spiffe://example.org/analyst", "--allow", "spiffe://example.org/ns/owners/sa/*"}
		if i == 1 {
			// Replica 0 trusts NATS through its own trust bundle (the default),
			// replica 1 through --state-ca: the same Veil CA either way.
			args = append(args, "--state-ca", "/identity/ca.crt")
		}
		s.replicas = append(s.replicas, startVeil(t, containerSpec{
			alias: alias, network: nw, port: "8443/tcp", args: args,
			files: sealedFiles(dir, "veil", map[string]string{"/identity/model.json": modelPath}),
		}))
		upstreams = append(upstreams, "--upstream", "https://"+alias+":8443")
	}
	s.proxy = startVeil(t, containerSpec{
		alias: "proxy", network: nw, port: "8443/tcp", ready: "testproxy serving",
		args:  append([]string{"/testproxy", "--identity", "/identity", "--listen", ":8443"}, upstreams...),
		files: identityFiles(dir, "proxy"),
	})
	s.sealed = &sealedTopology{dir: dir, proxy: s.proxy, url: "https://" + s.proxy.endpoint(t, "8443/tcp")}
	s.sealed.control = rpc.NewHTTPClient(loadSource(t, filepath.Join(dir, "client")),
		transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/proxy")))
	// The test reads the buckets the replicas created, as a client of the cluster.
	if s.js, err = jetstream.New(cluster.connect(t, filepath.Join(dir, "client"))); err != nil {
		t.Fatal(err)
	}
	return s
}

// replicaURL is replica i's URL from the test process (TLS peer: the server itself).
func (s *natsTopology) replicaURL(t *testing.T, i int) string {
	return "https://" + s.replicas[i].endpoint(t, "8443/tcp")
}

// route moves the proxy's route to replica n. The proxy logs the change, which marks
// where requestsSinceRoute starts counting.
func (s *natsTopology) route(t *testing.T, n int) {
	t.Helper()
	s.sealed.route(t, n)
}

// requestsSinceRoute counts the requests the proxy forwarded to replica n since its
// last route change whose path contains what. It counts from the end of the proxy's
// log, whose head the Docker engine drops as it rotates (large uploads are logged).
// The engine delivers a container's output to its log asynchronously, later still on a
// busy machine: the count waits until a marker logged after the requests of interest
// has arrived, and counts up to it.
func (s *natsTopology) requestsSinceRoute(t *testing.T, n int, what string) int {
	t.Helper()
	id := fmt.Sprint(proxyMarks.Add(1))
	s.sealed.post(t, "/_testproxy/mark?id="+id)
	mark := "MARK " + strconv.Quote(id) // as the proxy logs it
	count := -1
	poll(t, "the proxy's log marker "+mark, time.Minute, func() error {
		rc, err := s.proxy.Logs(context.Background())
		if err != nil {
			return err
		}
		defer rc.Close()
		c := 0
		sc := bufio.NewScanner(rc)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.Contains(line, "ROUTE upstream="):
				c = 0
			case strings.Contains(line, "REQUEST upstream="):
				if strings.Contains(line, fmt.Sprintf("REQUEST upstream=%d ", n)) && strings.Contains(line, what) {
					c++
				}
			case strings.HasSuffix(strings.TrimSpace(line), mark):
				count = c
				return nil
			}
		}
		if err := sc.Err(); err != nil {
			t.Fatalf("proxy log: %v", err)
		}
		return fmt.Errorf("not in the log yet")
	})
	return count
}

// proxyMarks numbers the markers requestsSinceRoute asks the proxy to log.
var proxyMarks atomic.Int64

// score scores a batch through the proxy and checks the predictions against the
// plaintext model.
func (s *natsTopology) score(ctx context.Context, t *testing.T, c *scoring.Client) scoring.Stats {
	t.Helper()
	batch := s.data.X[:64]
	var got []float64
	var st scoring.Stats
	var err error
	uploaded := false
	for attempt := range 6 {
		sctx, cancel := context.WithTimeout(ctx, 90*time.Second)
		got, st, err = c.Score(sctx, batch)
		cancel()
		uploaded = uploaded || st.KeyUploaded
		// unavailable: the proxy's connection to a restarted replica was stale, or
		// the replica's key store (NATS) did not answer in time while a leader was
		// being elected; the caller retries, as after any failed call. A refused
		// session ticket (its key rotated out, every 10 s here) is not the caller's
		// to handle: scoring.Client sends the stream again on a new session.
		if code := connect.CodeOf(err); err == nil || code != connect.CodeUnavailable {
			break
		}
		t.Logf("score, attempt %d: %v", attempt, err)
		time.Sleep(2 * time.Second)
	}
	st.KeyUploaded = uploaded
	if err != nil {
		t.Fatalf("score: %v", err)
	}
	agree := 0
	for i, x := range batch {
		if (got[i] >= 0.5) == (s.model.Predict(x) >= 0.5) {
			agree++
		}
	}
	if agree < len(batch)-1 {
		t.Fatalf("encrypted and plaintext predictions agree on %d of %d", agree, len(batch))
	}
	return st
}

func (s *natsTopology) newScoringClient(ctx context.Context, t *testing.T, opts ...scoring.ClientOption) *scoring.Client {
	t.Helper()
	hc := sealedHTTPClient(t, s.dir, "client", natsServerID, "spiffe://example.org/proxy")
	c, err := scoring.NewClient(ctx, hc, s.sealed.url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// testKeysAcrossReplicas: a client uploads its keys through replica 0; moved to
// replica 1, it is scored with the keys from the bucket, without uploading them again.
func (s *natsTopology) testKeysAcrossReplicas(t *testing.T) *scoring.Client {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	s.route(t, 0)
	c := s.newScoringClient(ctx, t)
	if _, err := c.UploadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	// Straight to replica 1: natsstate reads through the stream leader (direct gets
	// off), so the acknowledged upload is visible at once. (With direct gets a lagging
	// follower answered "not found" about once in 30 reads, and the client uploaded
	// again.)
	s.route(t, 1)
	st := s.score(ctx, t, c)
	if st.KeyUploaded {
		t.Fatal("replica 1 asked for the keys again")
	}
	if n := s.requestsSinceRoute(t, 1, "/veil.he.v1.KeyService/"); n != 0 {
		t.Fatalf("replica 1 saw %d key-service requests, want none", n)
	}
	if n := s.requestsSinceRoute(t, 1, "ScoringService/"); n == 0 {
		t.Fatal("replica 1 did not score")
	}
	// The keys are one object in the R=3 bucket.
	obs, err := s.js.ObjectStore(ctx, "veil-evaluation-keys")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := obs.GetInfo(ctx, string(c.KeyID())); err != nil {
		t.Fatalf("key set %s in the bucket: %v", c.KeyID(), err)
	}
	stream, err := s.js.Stream(ctx, "OBJ_veil-evaluation-keys")
	if err != nil {
		t.Fatal(err)
	}
	if info, err := stream.Info(ctx); err != nil || info.Config.Replicas != 3 {
		t.Fatalf("evaluation-key stream: %+v, %v; want 3 replicas", info, err)
	}
	return c
}

// testRestartedReplica: replica 1, restarted (its memory empty), scores the same
// client with the keys from the bucket, and resumes the client's sealed session with
// the ticket keys from the bucket.
func (s *natsTopology) testRestartedReplica(t *testing.T, c *scoring.Client) {
	if c == nil {
		t.Fatal("the previous scenario failed before it made its client: nothing to restart against")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	stop := 10 * time.Second
	if err := s.replicas[1].Stop(ctx, &stop); err != nil {
		t.Fatal(err)
	}
	if err := s.replicas[1].Start(ctx); err != nil {
		t.Fatal(err)
	}
	s.route(t, 1)
	st := s.score(ctx, t, c)
	if st.KeyUploaded {
		t.Fatal("the restarted replica asked for the keys again")
	}
	if n := s.requestsSinceRoute(t, 1, "/veil.he.v1.KeyService/"); n != 0 {
		t.Fatalf("the restarted replica saw %d key-service requests, want none", n)
	}
}

// testNodeKilledMidUpload: while a new client uploads its keys through replica 0, the
// NATS node leading the evaluation-key stream is killed, once the client has sent the
// last byte and while the replica writes the set to the bucket. The upload completes
// (the client retries what was not acknowledged). Then the killed node is restarted and
// another one killed, so that the bucket is served by the restarted node and one
// other: replica 1, which never held these keys, scores with them from the bucket.
func (s *natsTopology) testNodeKilledMidUpload(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	defer s.cluster.startAll(t)
	s.route(t, 0)
	var done, total atomic.Int64
	c := s.newScoringClient(ctx, t, scoring.WithProgress(func(p scoring.Progress) {
		if p.Stage == "upload" {
			done.Store(p.Done)
			total.Store(p.Total)
		}
	}))
	stream, err := s.js.Stream(ctx, "OBJ_veil-evaluation-keys")
	if err != nil {
		t.Fatal(err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	victim := s.cluster.index(info.Cluster.Leader)
	if victim < 0 {
		t.Fatalf("stream leader %q is not a node", info.Cluster.Leader)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := c.UploadKeys(ctx)
		errc <- err
	}()
	var uploadErr error
	killed := false
wait:
	for {
		select {
		case uploadErr = <-errc:
			break wait
		default:
		}
		// The replica writes the key set to the bucket once it holds every byte, and
		// acknowledges the upload after the bucket's quorum acknowledged the write:
		// the kill lands while that write is in flight.
		if !killed && total.Load() > 0 && done.Load() == total.Load() {
			t.Logf("killing %s (leader of the evaluation-key stream): all %d bytes sent, none acknowledged", s.cluster.nodes[victim].name, total.Load())
			s.cluster.kill(t, victim)
			killed = true
		}
		time.Sleep(time.Millisecond)
	}
	if !killed {
		t.Logf("the upload (%d bytes) was acknowledged before the kill: killing %s after it", total.Load(), s.cluster.nodes[victim].name)
		s.cluster.kill(t, victim)
	}
	for attempt := 0; uploadErr != nil && attempt < 20; attempt++ {
		// Not acknowledged: the caller retries, as after any failed call.
		t.Logf("upload, attempt %d: %v", attempt, uploadErr)
		time.Sleep(time.Second)
		_, uploadErr = c.UploadKeys(ctx)
	}
	if uploadErr != nil {
		t.Fatalf("upload with a NATS node killed: %v", uploadErr)
	}
	// Acknowledged. Bring the killed node back, then take another one down.
	s.cluster.start(t, victim)
	other := (victim + 1) % len(s.cluster.nodes)
	s.cluster.kill(t, other)
	progressed := done.Load()
	s.route(t, 1)
	st := s.score(ctx, t, c)
	if st.KeyUploaded {
		t.Fatalf("keys acknowledged through replica 0 were not in the bucket served by %s and %s",
			s.cluster.nodes[victim].name, s.cluster.nodes[3-victim-other].name)
	}
	if n := s.requestsSinceRoute(t, 1, "/veil.he.v1.KeyService/Upload"); n != 0 {
		t.Fatalf("replica 1 saw %d uploads, want none", n)
	}
	if done.Load() != progressed {
		t.Fatalf("the client sent key bytes again (%d, then %d)", progressed, done.Load())
	}
}

// currentTicketKey reads the ID of the shared current ticket key from the bucket.
func (s *natsTopology) currentTicketKey(ctx context.Context, t *testing.T) uint32 {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	// The replicas' service's own bucket (docs/pqkex.md section 7.1).
	bucket, err := natsstate.TicketKeyBucket(natsServerID)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := s.js.KeyValue(ctx, "veil-"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(ctx, "current")
	if err != nil {
		t.Fatal(err)
	}
	if v := e.Value(); len(v) == 40 && string(v[:4]) == "VTK1" {
		return binary.BigEndian.Uint32(v[4:8])
	}
	t.Fatalf("malformed ticket key of %d bytes", len(e.Value()))
	return 0
}

// nextRotation waits until the current ticket key is no longer id and returns the new
// one. The replicas rotate every 10 seconds.
func (s *natsTopology) nextRotation(ctx context.Context, t *testing.T, id uint32) uint32 {
	t.Helper()
	deadline := time.Now().Add(40 * time.Second)
	for time.Now().Before(deadline) {
		if next := s.currentTicketKey(ctx, t); next != id {
			return next
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("the ticket key stayed %d", id)
	return 0
}

// waitAdopted waits until every replica has logged that key id is its current ticket
// key (the one that rotated logs "ticket key current", the others "ticket key
// rotated" when their watch delivers it).
func (s *natsTopology) waitAdopted(t *testing.T, id uint32) {
	t.Helper()
	want := fmt.Sprintf("current_id=%d", id)
	poll(t, fmt.Sprintf("ticket key %d adopted by every replica", id), 20*time.Second, func() error {
		for i, r := range s.replicas {
			rc, err := r.Logs(context.Background())
			if err != nil {
				return err
			}
			found := false
			sc := bufio.NewScanner(rc)
			for sc.Scan() {
				if line := strings.TrimSpace(sc.Text()); strings.Contains(line, "natsstate: ticket key") && strings.HasSuffix(line, want) {
					found = true
				}
			}
			rc.Close()
			if !found {
				return fmt.Errorf("replica %d has not logged %s", i, want)
			}
		}
		return nil
	})
}

// testTicketRotation: sessions resume across replicas (one ticket key, from the
// service's bucket); after a rotation, a session sealed with the new key resumes on both
// replicas (the rotation reached both); after a second rotation the old session's ticket
// (its key erased, and the ticket itself capped at one period) is refused and the client
// handshakes again, transparently. That the previous key still opens tickets for a period
// after a rotation is tested without containers (pqkex TestTicketKeyErasure): here a
// ticket lives at most one period (10 s), so whether it outlives the next rotation is a
// matter of timing.
func (s *natsTopology) testTicketRotation(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	echo := func(c echoClient, msg string) {
		t.Helper()
		res, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: msg}))
		if err != nil || res.Msg.GetMessage() != msg {
			t.Fatalf("echo %q: %v, %v", msg, res, err)
		}
	}
	handshakes := func(upstream int) int { return s.requestsSinceRoute(t, upstream, pqkex.HandshakePath) }
	// step routes to replica n, calls, and checks the handshakes replica n saw.
	step := func(n int, c echoClient, msg string, wantHandshakes int) {
		t.Helper()
		s.route(t, n)
		echo(c, msg)
		if h := handshakes(n); h != wantHandshakes {
			t.Fatalf("%s: replica %d saw %d handshakes, want %d", msg, n, h, wantHandshakes)
		}
	}

	// sequence runs the scenario from one rotation to the one after next; it returns
	// false if a rotation came sooner than expected (a slow machine), to run again.
	sequence := func() bool {
		// Start right after a rotation, so that the first steps fit in one period.
		k1 := s.nextRotation(ctx, t, s.currentTicketKey(ctx, t))
		s.waitAdopted(t, k1)
		old := s.echoClient(t)
		step(0, old, "handshake on replica 0", 1)
		step(1, old, "resumed on replica 1", 0)
		if k := s.currentTicketKey(ctx, t); k != k1 {
			t.Logf("the ticket key rotated during the first steps (%d to %d): again", k1, k)
			return false
		}

		k2 := s.nextRotation(ctx, t, k1)
		s.waitAdopted(t, k2) // the rotation reached both replicas
		t.Logf("ticket key rotated from %d to %d on both replicas", k1, k2)
		// A new session: its ticket is sealed with k2 on replica 0 and opens on replica 1.
		fresh := s.echoClient(t)
		step(0, fresh, "new handshake on replica 0", 1)
		step(1, fresh, "new ticket on replica 1", 0)
		if k := s.currentTicketKey(ctx, t); k != k2 {
			t.Logf("the ticket key rotated again during the checks (%d to %d): again", k2, k)
			return false
		}

		// Two rotations after its key was current, the old ticket is refused; the
		// client handshakes again, transparently, and the call succeeds.
		k3 := s.nextRotation(ctx, t, k2)
		s.waitAdopted(t, k3)
		t.Logf("ticket key rotated from %d to %d", k2, k3)
		step(1, old, "old ticket after two rotations", 1)
		return true
	}
	for attempt := 0; !sequence(); attempt++ {
		if attempt == 2 {
			t.Fatal("rotations kept coming sooner than every 10 s")
		}
	}
}

// echoClient returns an echo client through the proxy, sealed end to end with the
// replicas, with a session of its own.
func (s *natsTopology) echoClient(t *testing.T) echoClient {
	t.Helper()
	hc := sealedHTTPClient(t, s.dir, "client", natsServerID, "spiffe://example.org/proxy")
	return echov1connect.NewEchoServiceClient(hc, s.sealed.url, rpc.ClientOptions()...)
}

type echoClient interface {
	Echo(context.Context, *connect.Request[echov1.EchoRequest]) (*connect.Response[echov1.EchoResponse], error)
}

// testSubmissionCountedOnce: an owner's submission sent to both replicas at once with
// one idempotency key is counted exactly once, and both replicas report it.
func (s *natsTopology) testSubmissionCountedOnce(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	urls := []string{s.replicaURL(t, 0), s.replicaURL(t, 1)}
	key, err := he.NewClient(he.ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	analystID := loadSource(t, filepath.Join(s.dir, "analyst"))
	analyst := analytics.NewAnalyst(sealedHTTPClient(t, s.dir, "analyst", natsServerID, natsServerID), urls[0], key, analystID)
	spec := analytics.StudySpec{ID: "heart-rate", OwnerPatterns: []string{"spiffe://example.org/ns/owners/sa/*"}, Dimension: 2, Ranges: []analytics.Range{{Min: 0, Max: 200}}}
	if err := analyst.CreateStudy(ctx, spec); err != nil {
		t.Fatal(err)
	}
	records := [][]float64{{72, 1}, {64, 0}, {88, 1}}
	var wg sync.WaitGroup
	results := make([]analytics.Submitted, 2)
	errs := make([]error, 2)
	for i, url := range urls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			owner := analytics.NewOwner(sealedHTTPClient(t, s.dir, "o1", natsServerID, natsServerID), url,
				loadSource(t, filepath.Join(s.dir, "o1")), spiffeid.MatchID(spiffeid.RequireFromString("spiffe://example.org/analyst")))
			results[i], errs[i] = owner.Submit(ctx, spec.ID, "batch-1", records)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if results[0].Duplicate == results[1].Duplicate {
		t.Fatalf("duplicates: %v and %v; want exactly one accepted", results[0].Duplicate, results[1].Duplicate)
	}
	// A second owner, through the other replica, so that the study may close (two
	// distinct owners); the close goes through replica 1, results come from both.
	o2 := analytics.NewOwner(sealedHTTPClient(t, s.dir, "o2", natsServerID, natsServerID), urls[1],
		loadSource(t, filepath.Join(s.dir, "o2")), spiffeid.MatchID(spiffeid.RequireFromString("spiffe://example.org/analyst")))
	more := [][]float64{{70, 0}}
	if _, err := o2.Submit(ctx, spec.ID, "batch-1", more); err != nil {
		t.Fatal(err)
	}
	if _, err := analytics.NewAnalyst(sealedHTTPClient(t, s.dir, "analyst", natsServerID, natsServerID), urls[1], key, analystID).Close(ctx, spec.ID); err != nil {
		t.Fatal(err)
	}
	for i, url := range urls {
		res, err := analytics.NewAnalyst(sealedHTTPClient(t, s.dir, "analyst", natsServerID, natsServerID), url, key, analystID).Result(ctx, spec.ID)
		if err != nil {
			t.Fatalf("result from replica %d: %v", i, err)
		}
		if res.Submissions != 2 || res.Count != uint64(len(records)+len(more)) {
			t.Fatalf("replica %d: %d submissions of %d records; want 2 of %d", i, res.Submissions, res.Count, len(records)+len(more))
		}
	}
}
