package he_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"

	"connectrpc.com/connect"
	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
	"github.com/veilrpc/veil/he"
)

// A client encrypts two vectors, a server computes their dot product with only the
// evaluation keys its manifest asks for, and the client decrypts the result.
func Example() {
	ctx := context.Background()
	params := he.ParamsN13()

	// Client: keys, and exactly the evaluation keys the server's procedure declares.
	client, err := he.NewClient(params)
	if err != nil {
		panic(err)
	}
	manifest := he.NewManifest(params, he.NeedRelinearization(), he.NeedInnerSum(4))
	keys, err := client.GenEvaluationKeys(manifest)
	if err != nil {
		panic(err)
	}
	x, _ := client.Encrypt([]float64{1, 2, 3, 4})
	y, _ := client.Encrypt([]float64{0.5, -1, 0.25, 2})

	// Server: computes without the secret key.
	ev, err := he.NewEvaluator(params, keys)
	if err != nil {
		panic(err)
	}
	dot, err := ev.Dot(ctx, x, y)
	if err != nil {
		panic(err)
	}

	// Client: the result is small, so it decrypts at level 0 (fast).
	out, err := client.Decrypt(dot, he.WithMaxAbs(1000))
	if err != nil {
		panic(err)
	}
	fmt.Printf("dot = %.4f (%d manifest keys)\n", out[0], manifest.Len())
	// Output: dot = 7.2500 (3 manifest keys)
}

// Data owners encrypt under an analyst's public key; the server adds their vectors
// and takes the mean without any key; only the analyst can decrypt.
func ExampleEncryptor() {
	ctx := context.Background()
	params := he.ParamsN13()
	analyst, _ := he.NewClient(params)

	owners := [][]float64{{10, 20, 30}, {12, 18, 33}, {11, 25, 27}}
	var cts []*he.Vector
	for _, values := range owners {
		enc, _ := he.NewEncryptor(analyst.PublicKey())
		v, _ := enc.Encrypt(values)
		cts = append(cts, v)
	}
	ev, _ := he.NewEvaluator(params, nil)
	mean, err := ev.ElementwiseMean(ctx, cts...)
	if err != nil {
		panic(err)
	}
	out, _ := analyst.Decrypt(mean)
	fmt.Printf("%.3f %.3f %.3f\n", out[0], out[1], out[2])
	// Output: 11.000 21.000 30.000
}

// Logistic-regression scoring: one ciphertext per feature with samples across
// slots, logits = sum_j w_j x_j + b in one level, then a degree-7 Chebyshev sigmoid
// on [-8, 8] (4 levels). ParamsN14 has the depth; this example uses a smaller custom
// set of depth 5 (scale 2^25, enough for two decimals) to run quickly.
func ExampleEvaluator_EvalPolynomial() {
	ctx := context.Background()
	params, err := he.NewParameters(he.Literal{LogN: 13, LogQ: []int{40, 25, 25, 25, 25, 25}, LogP: []int{40}, LogDefaultScale: 25})
	if err != nil {
		panic(err)
	}
	client, _ := he.NewClient(params)
	keys, _ := client.GenEvaluationKeys(he.NewManifest(params, he.NeedRelinearization()))
	ev, _ := he.NewEvaluator(params, keys)

	features := [][]float64{{0.5, -1, 2}, {1, 0.5, -0.5}} // 2 features, 3 samples
	weights, bias := []float64{1.5, -2}, 0.25
	var cts []*he.Vector
	for _, f := range features {
		v, _ := client.Encrypt(f)
		cts = append(cts, v)
	}
	logits, err := ev.LinearCombination(ctx, cts, weights, bias)
	if err != nil {
		panic(err)
	}
	sigmoid, _ := he.SigmoidApproximation(8, 7)
	probs, err := ev.EvalPolynomial(ctx, logits, sigmoid)
	if err != nil {
		panic(err)
	}
	out, _ := client.Decrypt(probs, he.WithMaxAbs(10))
	for i, p := range out {
		logit := weights[0]*features[0][i] + weights[1]*features[1][i] + bias
		fmt.Printf("sample %d: logit %+.2f p %.2f (exact %.2f)\n", i, logit, p, he.Sigmoid(logit))
	}
	// Output:
	// sample 0: logit -1.00 p 0.28 (exact 0.27)
	// sample 1: logit -2.25 p 0.08 (exact 0.10)
	// sample 2: logit +4.25 p 0.99 (exact 0.99)
}

// A client discovers the keys a procedure needs, uploads them once to the server's
// KeyService (resumably, in chunks), and calls through Uploader.Do, which uploads them
// again and retries once if the server has lost them.
func ExampleUploader() {
	ctx := context.Background()
	params := he.ParamsN13()
	const procedure = "/acme.stats.v1.StatsService/Mean"

	// Server: a registry and the KeyService, behind mTLS in Veil; the identity function
	// reads the caller's SPIFFE ID that the rpc layer put in the context.
	reg, _ := he.NewRegistry(params, he.WithMemoryBudget(256<<20))
	manifests := map[string]*he.Manifest{procedure: he.NewManifest(params, he.NeedInnerSum(1000))}
	path, handler := he.NewKeyServiceHandler(reg, func(context.Context) (string, error) {
		return "spiffe://example.org/analyst", nil
	}, manifests, connect.WithReadMaxBytes(he.MaxKeyServiceMessageSize))
	mux := http.NewServeMux()
	mux.Handle(path, handler)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	// Client.
	keySvc := hev1connect.NewKeyServiceClient(srv.Client(), srv.URL)
	client, _ := he.NewClient(params)
	manifest, err := he.FetchManifest(ctx, keySvc, params, procedure)
	if err != nil {
		panic(err)
	}
	keys, _ := client.GenEvaluationKeys(manifest)
	up := he.NewUploader(keySvc, keys)
	x, _ := client.Encrypt([]float64{1, 2, 3, 4, 5})
	var mean *he.Vector
	err = up.Do(ctx, func(ctx context.Context, id he.KeyID) error {
		// In a real service this is the RPC; its handler runs the two lines below.
		ev, err := reg.Evaluator("spiffe://example.org/analyst", id)
		if err != nil {
			return he.ConnectError(err) // not_found on the first call: keys not uploaded yet
		}
		mean, err = ev.Mean(ctx, x)
		return he.ConnectError(err)
	})
	if err != nil {
		panic(err)
	}
	out, _ := client.Decrypt(mean, he.WithMaxAbs(100))
	fmt.Printf("mean %.3f, %d Galois keys uploaded\n", out[0], manifest.Len())
	// Output: mean 3.000, 10 Galois keys uploaded
}
