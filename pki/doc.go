// Package pki is Veil's certificate authority for one SPIFFE trust domain, kept in a
// directory: an ECDSA P-256 root (and optionally an intermediate) that signs X.509-SVIDs,
// an ML-DSA-65 key that certifies post-quantum identity credentials (package pqkex),
// root rotation in three steps, a ledger of issued leaves that keeps a root from being
// dropped while a leaf it signed is valid, and a denylist of revoked serial numbers and
// SPIFFE IDs. docs/ca.md specifies the directory, the rotation and revocation.
//
// pki issues identities; package transport uses them. A CA writes identity directories
// (transport.WriteIdentity) that transport.LoadFiles and transport.WatchFiles read, and
// its Denylist implements transport.Denylist, the check transport's TLS configs run on
// every handshake. pki imports transport, never the reverse. The online CA that workloads
// join and renew with (veil ca serve) is package services/ca, built on this one.
//
// Every function that changes a CA directory takes its lock file, so that several
// processes (veil ca serve, veil ca token, veil ca rotate) can share it. Key files are
// written 0600, atomically.
package pki
