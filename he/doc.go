// Package he is Veil's homomorphic-encryption layer: CKKS over lattigo v5, with
// parameter presets, client-side keys and packing, a wire format for ciphertexts and
// evaluation keys, an evaluation-key registry, and a concurrency-safe evaluator.
//
// The split follows Concrete ML and TenSEAL: a client holds the secret key, encrypts
// vectors of float64 and decrypts results; a server holds only evaluation keys
// (relinearization plus exactly the Galois keys its procedures declare in a key
// manifest) and computes on ciphertexts it cannot read.
//
// Only this package imports lattigo; everything lattigo-specific stays behind it.
// See docs/he.md for presets, sizes, error bounds, the wire format, the registry's
// semantics, and the CKKS decryption caveat (Li-Micciancio).
package he
