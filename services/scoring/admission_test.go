package scoring_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	scoringv1 "github.com/veilrpc/veil/gen/veil/scoring/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/scoring"
)

// countingBody counts the bytes anyone inside the server reads from request bodies.
type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (c countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// startCounting starts a scoring server whose Score bodies are counted as read.
func startCounting(t *testing.T, m *scoring.Model, read *atomic.Int64, opts ...scoring.Option) *env {
	t.Helper()
	svc, err := scoring.New(m, opts...)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{svc: svc}
	e.pki, e.srv = startPKI(t, svc, rpc.WithMiddleware(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == scoring.ScoreProcedure {
				r.Body = countingBody{r.Body, read}
			}
			next.ServeHTTP(w, r)
		})
	}))
	return e
}

func wantExhausted(t *testing.T, what string, err error) {
	t.Helper()
	if connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("%s: %v, want resource_exhausted", what, err)
	}
	if d, ok := keys.RetryAfter(err); !ok || d <= 0 {
		t.Errorf("%s: no retry hint in %v", what, err)
	}
}

// TestAdmissionRefusesBeforeReading: with an identity's calls all running, and then
// the server's, another Score is refused with resource_exhausted and a retry hint
// before a byte of its body is read.
func TestAdmissionRefusesBeforeReading(t *testing.T) {
	ds, _ := scoring.Synthetic(7, 104, 3)
	m, err := scoring.Train(ds.X[:100], ds.Y[:100], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var read atomic.Int64
	e := startCounting(t, m, &read, scoring.WithParameters(smallParams(t)), scoring.WithAdmissionOptions(keys.WithMaxCalls(3, 2)))
	ctx := context.Background()
	key, err := he.NewClient(smallParams(t))
	if err != nil {
		t.Fatal(err)
	}
	c := e.client(t, alice, scoring.WithHEClient(key))
	if _, err := c.UploadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	// Two streams of alice's, admitted and waiting for their first message.
	hold := func(who string) {
		s := e.raw(t, who).ScoreStream(ctx)
		if err := s.Send(nil); err != nil { // the request's headers only
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.CloseRequest(); _ = s.CloseResponse() })
	}
	waitCalls := func(n int) {
		for e.svc.Admission().Stats().Calls != n {
			runtime.Gosched()
			time.Sleep(time.Millisecond)
		}
	}
	hold(alice)
	hold(alice)
	waitCalls(2)
	body := encryptColumns(t, key, ds.X[100][:1], ds.X[101][:1], ds.X[102][:1])
	req := &scoringv1.ScoreRequest{KeyId: string(c.KeyID()), Features: body}
	before := read.Load()
	_, err = e.raw(t, alice).Score(ctx, connect.NewRequest(req))
	wantExhausted(t, "alice's third call", err)
	// Bob fills the server's third call; a fourth identity is refused.
	hold(bob)
	waitCalls(3)
	_, err = e.raw(t, "spiffe://example.org/ns/clinic/sa/carol").Score(ctx, connect.NewRequest(req))
	wantExhausted(t, "a call beyond the server's", err)
	if n := read.Load() - before; n != 0 {
		t.Errorf("the server read %d bytes of refused bodies (of %d sent each)", n, proto.Size(req))
	}
	if st := e.svc.Admission().Stats(); st.Refused != 2 {
		t.Errorf("stats %+v, want 2 refusals", st)
	}
}

// heapBytes reads the live heap objects' bytes (runtime/metrics, no stop-the-world).
func heapBytes() int64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	return int64(s[0].Value.Uint64())
}

// TestAdmissionFlood: many clients send the largest valid batch (a full block, by the
// unary call and by streams) at once. Every call completes with the right answers or
// is refused with resource_exhausted and a retry hint; the memory admitted calls hold
// never passes the budget; the server serves afterwards.
func TestAdmissionFlood(t *testing.T) {
	ds, _ := scoring.Synthetic(8, 100, 8)
	m, err := scoring.Train(ds.X, ds.Y, scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	params := smallParams(t)
	probe, err := scoring.New(m, scoring.WithParameters(params))
	if err != nil {
		t.Fatal(err)
	}
	cost := probe.CallCost(false, 0)
	budget := 3*cost + cost/2 // three of the largest calls at once
	e := start(t, m, scoring.WithParameters(params), scoring.WithAdmissionOptions(keys.WithAdmissionBudget(budget)))
	// A full block of samples, each a training sample.
	block := make([][]float64, params.Slots())
	for i := range block {
		block[i] = ds.X[i%len(ds.X)]
	}
	const identities, perIdentity = 6, 2
	clients := make([]*scoring.Client, identities)
	for i := range clients {
		clients[i] = e.client(t, fmt.Sprintf("spiffe://example.org/ns/clinic/sa/client%d", i), scoring.WithBusyRetries(0))
		if _, err := clients[i].UploadKeys(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	base := heapBytes()
	var peakHeap atomic.Int64
	done := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			peakHeap.Store(max(peakHeap.Load(), heapBytes()-base))
			select {
			case <-done:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	var wg sync.WaitGroup
	var completed, refused atomic.Int64
	for i, c := range clients {
		for k := range perIdentity {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var got []float64
				var err error
				if k == 0 {
					got, err = c.ScoreBlock(context.Background(), block)
				} else {
					got, _, err = c.Score(context.Background(), block)
				}
				switch {
				case err == nil:
					completed.Add(1)
					if agree, maxErr := compare(t, m, block, got); agree < 1 || maxErr > noiseBound {
						t.Errorf("client %d call %d: agreement %.3f, max error %g", i, k, agree, maxErr)
					}
				case connect.CodeOf(err) == connect.CodeResourceExhausted:
					refused.Add(1)
					if _, ok := keys.RetryAfter(err); !ok {
						t.Errorf("client %d call %d: refusal without a retry hint: %v", i, k, err)
					}
				default:
					t.Errorf("client %d call %d: %v", i, k, err)
				}
			}()
		}
	}
	wg.Wait()
	close(done)
	<-sampled
	st := e.svc.Admission().Stats()
	t.Logf("calls: %d completed, %d refused; admitted memory peak %d bytes of a %d budget (%d per call); heap above baseline peak %d bytes; evaluator pool %d bytes (%d workers)",
		completed.Load(), refused.Load(), st.Peak, budget, cost, peakHeap.Load(), e.svc.Registry().WorkerPool().Memory(), e.svc.Registry().WorkerPool().Size())
	if st.Peak > budget || st.Used != 0 || st.Calls != 0 {
		t.Errorf("admission %+v: peak above the budget %d, or calls left admitted", st, budget)
	}
	if completed.Load() == 0 || completed.Load()+refused.Load() != identities*perIdentity {
		t.Errorf("%d completed and %d refused of %d", completed.Load(), refused.Load(), identities*perIdentity)
	}
	// The server still serves.
	got, err := clients[0].ScoreBlock(context.Background(), ds.X[:4])
	if err != nil || len(got) != 4 {
		t.Fatalf("after the flood: %v", err)
	}
}
