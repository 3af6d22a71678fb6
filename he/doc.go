// Package he is Veil's homomorphic-encryption layer: CKKS over lattigo v5, with
// parameter presets, client-side keys and packing, a wire format for ciphertexts and
// evaluation keys, and a concurrency-safe evaluator. It is cryptography only: it
// imports neither connect-go nor a generated service; the evaluation-key registry,
// the KeyService, the Uploader and the mapping of errors to Connect codes are in
// package he/keys.
//
// The split follows Concrete ML and TenSEAL: a Client holds the secret key, encrypts
// vectors of float64 of any length (packed into as many ciphertexts as needed) and
// decrypts results; data owners without the secret key encrypt under its PublicKey
// with an Encryptor. A server holds only EvaluationKeys: a relinearization key plus
// exactly the Galois keys its procedures declare in a Manifest, uploaded once (package
// he/keys), and computes with an Evaluator: add, sub,
// mul, rotate, inner sum, dot products, plaintext matrix times encrypted vector,
// polynomials (SigmoidApproximation for logistic regression), mean and variance.
//
// Parameters are presets returned by functions (ParamsN13, ParamsN14, ParamsN15),
// checked against the 128-bit HE-standard bound; their ParamID travels in every
// message. Untrusted bytes are validated before use (UnmarshalVector,
// ParseEvaluationKeys, UnmarshalPublicKey, UnmarshalManifest) and lattigo panics are
// recovered; every error is an *Error with a Kind (errors.go), which package he/keys
// maps to a Connect code.
//
// Only this package imports lattigo; everything lattigo-specific stays behind it.
// See docs/he.md for presets, sizes, error bounds, the wire format, the registry's
// semantics, and the CKKS decryption caveat (Li-Micciancio): never show a decryption
// to a party that chose the computation unless it was flooded (WithFlooding, sized from the noise bound).
package he
