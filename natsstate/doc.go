// Package natsstate keeps the state Veil servers must share when they run as several
// replicas in NATS JetStream, instead of in each process: clients' evaluation keys
// (an Object Store bucket, content-addressed by the registry's SHA-256 key IDs), the
// pqkex session-ticket keys (a KV bucket with history, rotated by whichever replica
// sees the current key age first), and analytics studies and submissions (an Object
// Store bucket for the records and a KV bucket whose atomic create makes idempotency
// keys count once across replicas).
//
// Veil does not implement a distributed store of its own: JetStream replicates each
// bucket (Config.Replicas, R=3 in a three-node cluster) and acknowledges a write once
// a quorum holds it, and every write here returns only after that acknowledgement, so
// a service acknowledges nothing to its clients that a node failure can lose.
//
// The connection uses TLS 1.3 with the workload's own SPIFFE identity as its client
// certificate (NATS servers verify it with verify: true), read from the
// transport.Source at each handshake so that rotation needs no reconnect. A NATS
// outage makes every store call fail, which the services report as unavailable (retry
// later); State.Check reports it for health checks (rpc.Server.WatchDependency).
//
// The types here satisfy the small interfaces of the packages they serve, without
// those packages importing NATS: EvaluationKeys is an keys.KeyStore, Studies an
// analytics.Store, and TicketKeys keeps a pqkex.TicketKeys in step with the bucket.
package natsstate
