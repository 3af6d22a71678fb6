package he_test

import (
	"context"
	"fmt"

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
