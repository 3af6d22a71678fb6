package keys

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/veilrpc/veil/he"

	"connectrpc.com/connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
)

// smallParams keeps registry tests fast: one key is about 197 KB encoded.
var smallParams = sync.OnceValue(func() *he.Parameters {
	p, err := he.NewParameters(he.Literal{LogN: 12, LogQ: []int{36, 30}, LogP: []int{36}, LogDefaultScale: 30})
	if err != nil {
		panic(err)
	}
	return p
})

type smallSet struct {
	client *he.Client
	keys   *he.EvaluationKeys
	data   []byte
	id     he.KeyID
}

func newSmallSet(t testing.TB, needs ...he.Need) *smallSet {
	t.Helper()
	c, err := he.NewClient(smallParams())
	if err != nil {
		t.Fatal(err)
	}
	if len(needs) == 0 {
		needs = []he.Need{he.NeedRelinearization(), he.NeedRotations(1)}
	}
	keys, err := c.GenEvaluationKeys(he.NewManifest(smallParams(), needs...))
	if err != nil {
		t.Fatal(err)
	}
	data, err := keys.Encode()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := keys.ID()
	return &smallSet{client: c, keys: keys, data: data, id: id}
}

func TestRegistryOwnershipAndExpiry(t *testing.T) {
	s := newSmallSet(t)
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	reg, err := NewRegistry(smallParams(), WithTTL(time.Hour, time.Minute), WithClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	const alice, mallory = "spiffe://veil.test/alice", "spiffe://veil.test/mallory"
	id, err := reg.Put(alice, s.data)
	if err != nil || id != s.id {
		t.Fatalf("put: %v %v", id, err)
	}
	if _, err := reg.Keys(alice, id); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Keys(mallory, id); CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("other identity: %v", err)
	}
	if _, err := reg.Put(mallory, s.data); CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("other identity re-uploading: %v", err)
	}
	if _, err := reg.Keys("", id); CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("no identity: %v", err)
	}
	ev1, err := reg.Evaluator(alice, id)
	ev2, _ := reg.Evaluator(alice, id)
	if err != nil || ev1 != ev2 {
		t.Errorf("evaluator not cached: %v", err)
	}
	now = now.Add(59 * time.Minute)
	if _, err := reg.Keys(alice, id); err != nil {
		t.Fatalf("before TTL: %v", err)
	}
	now = now.Add(61 * time.Minute) // 61 minutes after the last use
	_, err = reg.Keys(alice, id)
	if missing, ok := IsKeysMissing(err); !ok || missing != id || CodeOf(err) != connect.CodeNotFound || !strings.Contains(err.Error(), "upload them again") {
		t.Fatalf("after TTL: %v", err)
	}
	ce := ConnectError(err)
	if missing, ok := IsKeysMissing(ce); !ok || missing != id {
		t.Errorf("connect error lost the missing-keys detail: %v", ce)
	}
	if reg.Used() != 0 {
		t.Errorf("used %d after expiry", reg.Used())
	}
}

func TestRegistryBudgetAndEviction(t *testing.T) {
	a, b := newSmallSet(t), newSmallSet(t)
	mem, _ := he.KeySetMemory(smallParams(), a.data)
	// Room for two parsed sets, not three.
	reg, _ := NewRegistry(smallParams(), WithMemoryBudget(2*mem+mem/2), WithUploadBudget(mem/4), WithIdentityQuota(3*mem, 2), WithMaxKeySetSize(int64(len(a.data))))
	c := newSmallSet(t)
	for _, s := range []*smallSet{a, b, c} {
		if _, err := reg.Put("spiffe://t/a", s.data); err != nil {
			t.Fatal(err)
		}
		if reg.Used() > 2*mem+mem/2 {
			t.Fatalf("used %d above the budget", reg.Used())
		}
	}
	if _, err := reg.Keys("spiffe://t/a", a.id); CodeOf(err) != connect.CodeNotFound {
		t.Errorf("least recently used set not evicted: %v", err)
	}
	for _, s := range []*smallSet{b, c} {
		if _, err := reg.Keys("spiffe://t/a", s.id); err != nil {
			t.Errorf("recent set evicted: %v", err)
		}
	}
}

// TestRegistryUploadFlood: one identity opening many uploads at once gets its quota
// of concurrent uploads and resource_exhausted for the rest; headers charge nothing.
func TestRegistryUploadFlood(t *testing.T) {
	const budget = 10 << 20
	reg, _ := NewRegistry(smallParams(), WithMemoryBudget(budget), WithMaxKeySetSize(1<<20), WithIdentityQuota(budget/2, 3))
	var wg sync.WaitGroup
	var mu sync.Mutex
	accepted, refused := 0, 0
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var id [32]byte
			id[0], id[1] = byte(i), 0xaa
			_, _, err := reg.beginUpload("spiffe://t/flood", he.KeyID(hex.EncodeToString(id[:])), smallParams().ID(), validSize(1), 0)
			mu.Lock()
			defer mu.Unlock()
			switch CodeOf(err) {
			case connect.CodeResourceExhausted:
				refused++
			case connect.CodeUnknown:
				if err == nil {
					accepted++
				}
			default:
				t.Errorf("upload %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	if accepted != 3 || refused != 61 || reg.Used() != 0 {
		t.Errorf("accepted %d, refused %d, %d bytes charged; want 3, 61 and 0", accepted, refused, reg.Used())
	}
	g := 1
	for validSize(g) <= 1<<20 {
		g++
	}
	if _, _, err := reg.beginUpload("spiffe://t/other", he.KeyID(strings.Repeat("b", 64)), smallParams().ID(), validSize(g), 0); CodeOf(err) != connect.CodeResourceExhausted {
		t.Errorf("oversized upload: %v", err)
	}
}

func TestRegistryStore(t *testing.T) {
	s := newSmallSet(t)
	dir := filepath.Join(t.TempDir(), "keys")
	now := time.Now()
	clock := func() time.Time { return now }
	reg, err := NewRegistry(smallParams(), WithStore(dir), WithClock(clock), WithTTL(time.Hour, time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Put("spiffe://t/a", s.data); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, string(s.id)+".vhk"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("store file: %v %v", st, err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("store holds %d files, want 1 (no temporary files left)", len(entries))
	}
	// A restart: a new registry over the same directory still has the keys.
	reg2, _ := NewRegistry(smallParams(), WithStore(dir), WithClock(clock), WithTTL(time.Hour, time.Minute))
	if _, err := reg2.Keys("spiffe://t/b", s.id); CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("other identity after restart: %v", err)
	}
	keys, err := reg2.Keys("spiffe://t/a", s.id)
	if err != nil || keys == nil {
		t.Fatalf("after restart: %v", err)
	}
	if reg2.Used() != he.MemorySize(s.keys.Manifest()) {
		t.Errorf("used %d after loading from disk, want the parsed keys only", reg2.Used())
	}
	// A corrupted file is refused, never parsed.
	path := filepath.Join(dir, string(s.id)+".vhk")
	good, _ := os.ReadFile(path)
	bad := bytes.Clone(good)
	bad[len(bad)-1] ^= 1
	if err := os.WriteFile(path, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	regBad, _ := NewRegistry(smallParams(), WithStore(dir), WithClock(clock), WithTTL(time.Hour, time.Minute))
	if _, err := regBad.Keys("spiffe://t/a", s.id); CodeOf(err) != connect.CodeInternal || regBad.Used() != 0 {
		t.Errorf("corrupted store file: %v, used %d", err, regBad.Used())
	}
	if err := os.WriteFile(path, good, 0o600); err != nil {
		t.Fatal(err)
	}
	// Expired on disk: not_found, and the file is gone.
	reg3, _ := NewRegistry(smallParams(), WithStore(dir), WithClock(func() time.Time { return time.Now().Add(2 * time.Hour) }), WithTTL(time.Hour, time.Minute))
	if _, err := reg3.Keys("spiffe://t/a", s.id); CodeOf(err) != connect.CodeNotFound {
		t.Errorf("expired on disk: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, string(s.id)+".vhk")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("expired file still there: %v", err)
	}
}

// identityHeader is how the test server learns the caller; the rpc layer derives it
// from the mTLS peer's SPIFFE ID instead.
type identityKey struct{}

func testServer(t *testing.T, reg *Registry, manifests map[string]*he.Manifest) func(identity string) hev1connect.KeyServiceClient {
	t.Helper()
	mux := http.NewServeMux()
	path, h := NewKeyServiceHandler(reg, func(ctx context.Context) (string, error) {
		id, _ := ctx.Value(identityKey{}).(string)
		return id, nil
	}, manifests, connect.WithReadMaxBytes(MaxKeyServiceMessageSize))
	mux.Handle(path, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), identityKey{}, r.Header.Get("Test-Identity"))))
	}))
	srv := httptest.NewUnstartedServer(mux)
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return func(identity string) hev1connect.KeyServiceClient {
		return hev1connect.NewKeyServiceClient(srv.Client(), srv.URL, asIdentity(identity))
	}
}

func asIdentity(id string) connect.ClientOption {
	return connect.WithInterceptors(identityInterceptor(id))
}

type identityInterceptor string

func (i identityInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		req.Header().Set("Test-Identity", string(i))
		return next(ctx, req)
	}
}

func (i identityInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		c := next(ctx, spec)
		c.RequestHeader().Set("Test-Identity", string(i))
		return c
	}
}

func (i identityInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

func TestKeyServiceUpload(t *testing.T) {
	now := time.Now()
	var clockMu sync.Mutex
	clock := func() time.Time { clockMu.Lock(); defer clockMu.Unlock(); return now }
	reg, _ := NewRegistry(smallParams(), WithClock(clock), WithTTL(time.Hour, time.Hour))
	const procedure = "/acme.score.v1.ScoreService/Score"
	want := he.NewManifest(smallParams(), he.NeedRelinearization(), he.NeedInnerSum(64))
	connectTo := testServer(t, reg, map[string]*he.Manifest{procedure: want})
	const alice, mallory = "spiffe://veil.test/alice", "spiffe://veil.test/mallory"
	ctx := context.Background()
	client := connectTo(alice)

	m, err := FetchManifest(ctx, client, smallParams(), procedure)
	if err != nil || !m.Covers(want) || !want.Covers(m) {
		t.Fatalf("manifest: %v", err)
	}
	if _, err := FetchManifest(ctx, client, smallParams(), "/nope.v1.S/X"); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("unknown procedure: %v", err)
	}
	c, _ := he.NewClient(smallParams())
	keys, err := c.GenEvaluationKeys(m)
	if err != nil {
		t.Fatal(err)
	}
	data, _ := keys.Encode()
	var progress []int64
	up := NewUploader(client, keys, WithChunkSize(64<<10), WithProgress(func(sent, total int64) {
		if total != int64(len(data)) {
			t.Errorf("progress total %d", total)
		}
		progress = append(progress, sent)
	}))
	id, err := up.Upload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(progress) != (len(data)+(64<<10)-1)/(64<<10) || progress[len(progress)-1] != int64(len(data)) {
		t.Errorf("progress %v for %d bytes", progress, len(data))
	}
	if _, err := reg.Keys(alice, id); err != nil {
		t.Fatalf("registered keys: %v", err)
	}
	progress = nil
	if _, err := up.Upload(ctx); err != nil || len(progress) != 0 {
		t.Errorf("second upload sent %d chunks: %v", len(progress), err)
	}
	_, err = connectTo(mallory).GetUploadStatus(ctx, connect.NewRequest(&hev1.GetUploadStatusRequest{KeyId: string(id)}))
	if connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("other identity's status: %v", err)
	}
	if _, err := NewUploader(connectTo(""), keys).Upload(ctx); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("no identity: %v", err)
	}

	// Expired keys: Do re-uploads them transparently, once.
	clockMu.Lock()
	now = now.Add(2 * time.Hour)
	clockMu.Unlock()
	calls := 0
	err = up.Do(ctx, func(ctx context.Context, id he.KeyID) error {
		calls++
		_, err := reg.Evaluator(alice, id)
		return ConnectError(err)
	})
	if err != nil || calls != 2 {
		t.Errorf("Do: %d calls, %v", calls, err)
	}
}

func TestKeyServiceResume(t *testing.T) {
	reg, _ := NewRegistry(smallParams())
	connectTo := testServer(t, reg, nil)
	const alice = "spiffe://veil.test/alice"
	client := connectTo(alice)
	s := newSmallSet(t, he.NeedRelinearization(), he.NeedRotations(1, 2, 3))
	const chunk = 32 << 10
	ctx, cancel := context.WithCancel(context.Background())
	first := NewUploader(client, s.keys, WithChunkSize(chunk), WithAttempts(1), WithProgress(func(sent, _ int64) {
		if sent < 4*chunk {
			return
		}
		// Break the connection once the server holds at least two chunks.
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			if got, _, _, _ := reg.status(alice, s.id); got >= 2*chunk {
				break
			}
		}
		cancel()
	}))
	if _, err := first.Upload(ctx); err == nil {
		t.Fatal("interrupted upload reported success")
	}
	held, total, complete, _ := reg.status(alice, s.id)
	if complete || held < 2*chunk || total != int64(len(s.data)) {
		t.Fatalf("after the break the server holds %d of %d (complete %v)", held, total, complete)
	}
	var firstSent int64 = -1
	second := NewUploader(client, s.keys, WithChunkSize(chunk), WithProgress(func(sent, _ int64) {
		if firstSent < 0 {
			firstSent = sent
		}
	}))
	if _, err := second.Upload(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The server may have taken in-flight chunks after the status above, so the resume
	// point is at or past it, and never the start.
	if firstSent < min(held+chunk, int64(len(s.data))) {
		t.Errorf("resumed upload's first chunk ended at %d, server held %d", firstSent, held)
	}
	if _, err := reg.Keys(alice, s.id); err != nil {
		t.Fatal(err)
	}
	if reg.Used() != he.MemorySize(s.keys.Manifest()) {
		t.Errorf("used %d, want only the parsed keys %d", reg.Used(), he.MemorySize(s.keys.Manifest()))
	}
}

func TestKeyServiceBadStreams(t *testing.T) {
	reg, _ := NewRegistry(smallParams())
	connectTo := testServer(t, reg, nil)
	const alice, mallory = "spiffe://veil.test/alice", "spiffe://veil.test/mallory"
	s := newSmallSet(t)
	ctx := context.Background()
	header := func(id string, total, offset uint64) *hev1.UploadEvaluationKeysRequest {
		return &hev1.UploadEvaluationKeysRequest{Part: &hev1.UploadEvaluationKeysRequest_Header{Header: &hev1.UploadHeader{
			KeyId: id, ParamId: string(smallParams().ID()), TotalSize: total, Offset: offset}}}
	}
	chunk := func(b []byte) *hev1.UploadEvaluationKeysRequest {
		return &hev1.UploadEvaluationKeysRequest{Part: &hev1.UploadEvaluationKeysRequest_Chunk{Chunk: b}}
	}
	send := func(who string, msgs ...*hev1.UploadEvaluationKeysRequest) (*hev1.UploadEvaluationKeysResponse, error) {
		st := connectTo(who).UploadEvaluationKeys(ctx)
		for _, m := range msgs {
			if err := st.Send(m); err != nil {
				break
			}
		}
		res, err := st.CloseAndReceive()
		if err != nil {
			return nil, err
		}
		return res.Msg, nil
	}
	total := uint64(len(s.data))
	wrongParams := header(string(s.id), total, 0)
	wrongParams.GetHeader().ParamId = string(he.ParamsN13().ID())
	cases := []struct {
		name string
		msgs []*hev1.UploadEvaluationKeysRequest
		code connect.Code
	}{
		{"chunk before header", []*hev1.UploadEvaluationKeysRequest{chunk([]byte{1})}, connect.CodeInvalidArgument},
		{"empty stream", nil, connect.CodeInvalidArgument},
		{"malformed key ID", []*hev1.UploadEvaluationKeysRequest{header("ABC", total, 0)}, connect.CodeInvalidArgument},
		{"offset past total", []*hev1.UploadEvaluationKeysRequest{header(string(s.id), total, total+1)}, connect.CodeInvalidArgument},
		{"resume with nothing held", []*hev1.UploadEvaluationKeysRequest{header(string(s.id), total, 5)}, connect.CodeFailedPrecondition},
		{"other parameters", []*hev1.UploadEvaluationKeysRequest{wrongParams}, connect.CodeFailedPrecondition},
		{"not a key-set size", []*hev1.UploadEvaluationKeysRequest{header(strings.Repeat("c", 64), 4, 0)}, connect.CodeInvalidArgument},
		{"more than declared", []*hev1.UploadEvaluationKeysRequest{header(strings.Repeat("c", 64), total, 0), chunk(make([]byte, total+1))}, connect.CodeInvalidArgument},
		{"second header", []*hev1.UploadEvaluationKeysRequest{header(strings.Repeat("d", 64), total, 0), header(strings.Repeat("d", 64), total, 0)}, connect.CodeInvalidArgument},
		{"content does not match ID", []*hev1.UploadEvaluationKeysRequest{header(strings.Repeat("e", 64), total, 0), chunk(make([]byte, total))}, connect.CodeInvalidArgument},
	}
	for _, tc := range cases {
		if _, err := send(alice, tc.msgs...); connect.CodeOf(err) != tc.code {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.code)
		}
	}
	// A partial upload by another identity under alice's key ID does not block her.
	if res, err := send(mallory, header(string(s.id), total, 0), chunk(s.data[:100])); err != nil || res.GetComplete() {
		t.Fatalf("mallory's partial upload: %v %v", res, err)
	}
	if _, err := NewUploader(connectTo(alice), s.keys).Upload(ctx); err != nil {
		t.Fatalf("alice's upload after mallory's: %v", err)
	}
	if _, err := send(mallory, header(string(s.id), total, 100), chunk(s.data[100:])); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("mallory completing alice's key ID: %v", err)
	}
	// Charged: alice's parsed keys and the 64 KiB buffer of mallory's 100 pending
	// bytes; the refused uploads above hold only what arrived ("more than declared"
	// none, the others nothing), since bytes are charged as they arrive.
	if want := he.MemorySize(s.keys.Manifest()) + 64<<10; reg.Used() != want {
		t.Errorf("used %d, want %d", reg.Used(), want)
	}
}

// TestKeyServiceReadLimit uploads a set larger than one chunk through a server whose
// read limit is MaxKeyServiceMessageSize.
func TestKeyServiceReadLimit(t *testing.T) {
	reg, _ := NewRegistry(smallParams())
	client := testServer(t, reg, nil)("spiffe://veil.test/alice")
	s := newSmallSet(t, he.NeedRelinearization(), he.NeedRotations(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12))
	if len(s.data) <= ChunkSize {
		t.Fatalf("set of %d bytes fits one chunk", len(s.data))
	}
	if _, err := NewUploader(client, s.keys).Upload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Keys("spiffe://veil.test/alice", s.id); err != nil {
		t.Fatal(err)
	}
}

// TestRegistryBogusHeader: a key set whose header claims more keys than it holds is
// refused before anything is charged or evicted.
func TestRegistryBogusHeader(t *testing.T) {
	s := newSmallSet(t)
	mem, _ := he.KeySetMemory(smallParams(), s.data)
	reg, _ := NewRegistry(smallParams(), WithMemoryBudget(2*mem), WithMaxKeySetSize(int64(len(s.data))))
	if _, err := reg.Put("spiffe://t/a", s.data); err != nil {
		t.Fatal(err)
	}
	bogus := bytes.Clone(s.data)
	bogus[24] = 200 // 200 Galois keys in the header
	if _, err := reg.Put("spiffe://t/b", bogus); CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("bogus header: %v", err)
	}
	if _, err := reg.Keys("spiffe://t/a", s.id); err != nil {
		t.Errorf("a bogus upload evicted another set: %v", err)
	}
}
