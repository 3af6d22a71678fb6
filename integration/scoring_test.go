package integration

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/scoring"
	"github.com/veilrpc/veil/transport"
)

// TestScoringReplicasBehindProxy runs two scoring replicas (same model, same ticket
// key) behind a failing-over TLS-terminating proxy and tests, across real containers:
// STRICT refusals by every replica; an evaluation-key upload cut mid-way by killing
// the proxy, which resumes from the last acknowledged chunk; and a replica killed in
// the middle of a scoring stream, where the client gets unavailable, retries, lands on
// the other replica (which asks for the keys again) and completes the batch.
func TestScoringReplicasBehindProxy(t *testing.T) {
	const serverID = "spiffe://example.org/scoring"
	dir := sealedIdentities(t, serverID, "spiffe://example.org/proxy", "spiffe://example.org/client", "spiffe://example.org/outsider")
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
	tickets := filepath.Join(dir, "tickets")
	if _, err := rpc.RotateTicketKeyFile(tickets); err != nil {
		t.Fatal(err)
	}
	nw := newNetwork(t)
	var replicas []*veilContainer
	for i := range 2 {
		replicas = append(replicas, startVeil(t, containerSpec{
			alias: fmt.Sprintf("scoring-%d", i), network: nw, port: "8443/tcp",
			args: []string{"/veil", "serve", "--identity", "/identity", "--listen", ":8443", "--service", "scoring",
				"--scoring-model", "/identity/model.json", "--ticket-keys", "/identity/tickets",
				"--pq", "strict", "--pq-seal", "strict", "--allow", "spiffe://example.org/client"},
			files: sealedFiles(dir, "scoring", map[string]string{"/identity/model.json": modelPath, "/identity/tickets": tickets}),
		}))
	}
	proxySpec := containerSpec{
		alias: "proxy", network: nw, port: "8443/tcp", ready: "testproxy serving",
		args: []string{"/testproxy", "--identity", "/identity", "--listen", ":8443", "--failover",
			"--upstream", "https://scoring-0:8443", "--upstream", "https://scoring-1:8443"},
		files: identityFiles(dir, "proxy"),
	}
	proxy := startVeil(t, proxySpec)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	t.Run("STRICT refusals by every replica", func(t *testing.T) {
		for _, r := range replicas {
			assertRefusesStrangers(t, dir, "https://"+r.endpoint(t, "8443/tcp"), serverID, "outsider", "/veil.scoring.v1.ScoringService/GetModelInfo")
		}
	})

	url := "https://" + proxy.endpoint(t, "8443/tcp")
	control := sealedTopology{url: url, control: rpc.NewHTTPClient(loadSource(t, filepath.Join(dir, "client")),
		transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/proxy")))}
	var mu sync.Mutex
	var progress []int64
	var total atomic.Int64
	hc := sealedHTTPClient(t, dir, "client", serverID, "spiffe://example.org/proxy")
	var cutPending atomic.Bool // the upload test's cut has yet to happen
	atThird, cutDone := make(chan struct{}), make(chan struct{})
	var sending atomic.Bool // set while a stream's ciphertexts are being sent
	sent := make(chan struct{}, 1)
	client, err := scoring.NewClient(ctx, hc, url, scoring.WithProgress(func(p scoring.Progress) {
		if p.Stage == "encrypt" && p.Done >= 2 && sending.CompareAndSwap(true, false) {
			sent <- struct{}{}
		}
		if p.Stage == "upload" {
			mu.Lock()
			progress = append(progress, p.Done)
			mu.Unlock()
			total.Store(p.Total)
			// The first time a third of the keys is sent, the sender waits here until
			// the test has cut the proxy's connections: the cut lands mid-upload
			// however fast the rest would have gone.
			if p.Done > p.Total/3 && cutPending.CompareAndSwap(true, false) {
				atThird <- struct{}{}
				<-cutDone
			}
		}
	}))
	if err != nil {
		t.Fatal(err)
	}

	t.Run("key upload cut mid-way resumes from the last acknowledged chunk", func(t *testing.T) {
		errc := make(chan error, 1)
		cutPending.Store(true)
		// However this subtest ends, the sender is released, so a failure here
		// cannot hang the next subtest on the upload lock.
		var release sync.Once
		defer release.Do(func() { close(cutDone) })
		go func() {
			_, err := client.UploadKeys(ctx)
			errc <- err
		}()
		// Cut every connection of the proxy once a third of the keys is sent: the sender
		// waits in its progress callback until the cut is made.
		select {
		case <-atThird:
		case err := <-errc:
			t.Fatalf("the upload ended (%v) before a third of it was sent", err)
		}
		mu.Lock()
		cutAt := len(progress)
		mu.Unlock()
		before := readProxyLog(t, proxy).restarts
		control.post(t, "/_testproxy/restart")
		// The proxy answers the control call before it drops its connections: the
		// sender goes on only once the proxy has logged that it serves again, so the
		// rest of the upload cannot slip through before the cut.
		poll(t, "the proxy's restart", time.Minute, func() error {
			if readProxyLog(t, proxy).restarts == before {
				return fmt.Errorf("not restarted yet")
			}
			return nil
		})
		release.Do(func() { close(cutDone) })
		if err := <-errc; err != nil {
			// The caller retries, as it would after any broken connection: the upload
			// resumes where the server's acknowledgements stopped.
			t.Logf("upload cut: %v", err)
			var resumeErr error
			for range 20 {
				if _, resumeErr = client.UploadKeys(ctx); resumeErr == nil {
					break
				}
				time.Sleep(250 * time.Millisecond)
			}
			if resumeErr != nil {
				t.Fatalf("upload did not resume after the cut: %v", resumeErr)
			}
		}
		mu.Lock()
		defer mu.Unlock()
		for _, p := range progress[cutAt:] {
			if p < progress[cutAt-1]/2 {
				t.Fatalf("after the cut the upload went back to %d bytes (had %d acknowledged): progress %v", p, progress[cutAt-1], progress)
			}
		}
		uploads := 0
		for _, r := range control.logOf(t, proxy, control.url).requests {
			if strings.Contains(r, "/veil.he.v1.KeyService/Upload") {
				uploads++
			}
		}
		if uploads < 2 {
			t.Fatalf("the proxy saw %d upload streams, want a cut one and a resumed one", uploads)
		}
	})

	t.Run("replica killed mid-stream", func(t *testing.T) {
		batch := data.X[:400]
		want := make([]float64, len(batch))
		for i, x := range batch {
			want[i] = model.Predict(x)
		}
		// Three blocks of slots: a stream long enough to be cut in the middle.
		const samples = 3 * 8192
		big := make([][]float64, samples)
		for i := range big {
			big[i] = batch[i%len(batch)]
		}
		errc := make(chan error, 1)
		sending.Store(true)
		go func() {
			sctx, cancel := context.WithTimeout(ctx, 90*time.Second)
			defer cancel()
			_, _, err := client.Score(sctx, big)
			errc <- err
		}()
		// Kill replica 0 once ciphertexts are flowing on the stream.
		select {
		case <-sent:
		case err := <-errc:
			t.Fatalf("the stream ended before it was cut: %v", err)
		}
		zero := time.Duration(0)
		if err := replicas[0].Container.Stop(ctx, &zero); err != nil {
			t.Fatal(err)
		}
		err := <-errc
		if code := connect.CodeOf(err); err == nil || code != connect.CodeUnavailable {
			t.Fatalf("stream to a killed replica: %v, want unavailable", err)
		}
		// The client retries; the proxy has failed over to replica 1, which does not
		// hold the keys yet: the client uploads them again and the batch completes.
		var got []float64
		var st scoring.Stats
		for attempt := range 3 {
			sctx, cancel := context.WithTimeout(ctx, 90*time.Second)
			got, st, err = client.Score(sctx, batch)
			cancel()
			if err == nil || connect.CodeOf(err) != connect.CodeUnavailable {
				break
			}
			t.Logf("retry %d: %v", attempt, err)
		}
		if err != nil {
			t.Fatalf("retry on the other replica: %v", err)
		}
		if !st.KeyUploaded {
			t.Fatal("replica 1 scored without the client uploading its keys again")
		}
		agree := 0
		for i := range got {
			if (got[i] >= 0.5) == (want[i] >= 0.5) {
				agree++
			}
		}
		if float64(agree) < 0.99*float64(len(got)) {
			t.Fatalf("encrypted and plaintext predictions agree on %d of %d", agree, len(got))
		}
	})
}

// assertRefusesStrangers checks that the service at url refuses a client without a
// certificate, one from another CA, and a verified identity outside its policy.
func assertRefusesStrangers(t *testing.T, dir, url, serverID, outsider, procedure string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	noCert := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}}}
	if res, err := noCert.Post(url+"/grpc.health.v1.Health/Check", "application/json", strings.NewReader("{}")); err == nil {
		res.Body.Close()
		t.Fatalf("%s answered a client without a certificate: %d", url, res.StatusCode)
	}
	foreignDir, _ := identities(t, "spiffe://example.org/client")
	mixed := transport.StaticSource{SVID: mustSVID(t, loadSource(t, filepath.Join(foreignDir, "client"))), Bundles: mustBundles(t, loadSource(t, filepath.Join(dir, outsider)))}
	hc := rpc.NewHTTPClient(mixed, transport.AuthorizeID(spiffeid.RequireFromString(serverID)))
	if _, err := grpchealth.NewClient(hc, url).Check(ctx, &grpchealth.CheckRequest{}); err == nil {
		t.Fatalf("%s accepted a certificate from another CA", url)
	}
	out := sealedHTTPClient(t, dir, outsider, serverID, serverID)
	res, err := out.Post(url+procedure, "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatalf("outsider: %v", err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "permission_denied") {
		t.Fatalf("outsider got %d %s, want permission_denied", res.StatusCode, body)
	}
}
