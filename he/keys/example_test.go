package keys_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"

	"connectrpc.com/connect"
	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
)

// A client discovers the keys a procedure needs, uploads them once to the server's
// KeyService (resumably, in chunks), and calls through Uploader.Do, which uploads them
// again and retries once if the server has lost them.
func ExampleUploader() {
	ctx := context.Background()
	params := he.ParamsN13()
	const procedure = "/acme.stats.v1.StatsService/Mean"

	// Server: a registry and the KeyService, behind mTLS in Veil; the identity function
	// reads the caller's SPIFFE ID that the rpc layer put in the context.
	reg, _ := keys.NewRegistry(params, keys.WithMemoryBudget(256<<20))
	manifests := map[string]*he.Manifest{procedure: he.NewManifest(params, he.NeedInnerSum(1000))}
	path, handler := keys.NewKeyServiceHandler(reg, func(context.Context) (string, error) {
		return "spiffe://example.org/analyst", nil
	}, manifests, connect.WithReadMaxBytes(keys.MaxKeyServiceMessageSize))
	mux := http.NewServeMux()
	mux.Handle(path, handler)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	// Client.
	keySvc := hev1connect.NewKeyServiceClient(srv.Client(), srv.URL)
	client, _ := he.NewClient(params)
	manifest, err := keys.FetchManifest(ctx, keySvc, params, procedure)
	if err != nil {
		panic(err)
	}
	set, _ := client.GenEvaluationKeys(manifest)
	up := keys.NewUploader(keySvc, set)
	x, _ := client.Encrypt([]float64{1, 2, 3, 4, 5})
	var mean *he.Vector
	err = up.Do(ctx, func(ctx context.Context, id he.KeyID) error {
		// In a real service this is the RPC; its handler runs the two lines below.
		ev, err := reg.Evaluator("spiffe://example.org/analyst", id)
		if err != nil {
			return keys.ConnectError(err) // not_found on the first call: keys not uploaded yet
		}
		mean, err = ev.Mean(ctx, x)
		return keys.ConnectError(err)
	})
	if err != nil {
		panic(err)
	}
	out, _ := client.Decrypt(mean, he.WithMaxAbs(100))
	fmt.Printf("mean %.3f, %d Galois keys uploaded\n", out[0], manifest.Len())
	// Output: mean 3.000, 10 Galois keys uploaded
}
