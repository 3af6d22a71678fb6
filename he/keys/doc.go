// Package keys is the server and client side of package he's evaluation keys over
// Connect: the Registry that holds clients' evaluation-key sets (content-addressed,
// owned by the uploader's SPIFFE ID, budgeted, evicted and expired), the KeyStore it
// keeps them in durably (DirStore in a directory, or a shared store such as package
// natsstate's), the KeyService handler through which clients upload them resumably
// (NewKeyServiceHandler), the client's Uploader, per-identity Admission of expensive
// calls, and the mapping of he's errors and its own to Connect codes (ConnectError,
// CodeOf, IsKeysMissing).
//
// Why a package of its own, and why under he: package he is the CKKS layer (parameters,
// keys, the wire format, the evaluator) and imports neither connect-go nor a generated
// service, so that it can be used and reviewed as cryptography alone. Everything here
// needs Connect (a handler, a client, error details) and generated service code from
// gen/; it is still part of the he layer (it imports he and gen/ only, and no other
// layer), so it lives beneath he rather than in services/: services/scoring and
// services/analytics build on it, cmd/veil wires its stores in. The name says what it
// holds: evaluation keys, their registry and their upload; its errors keep he's "he: "
// prefix, which peers already see on the wire.
//
// See docs/he.md ("Key registry") for the registry's semantics and quotas.
package keys
