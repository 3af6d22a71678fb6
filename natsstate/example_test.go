package natsstate_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/veilrpc/veil/natsstate"
)

// Two replicas of a service share analytics submissions through JetStream: the same
// submission name stored through both counts once. (Production connections present the
// workload's SPIFFE certificate: set Config.Source; this example runs a throw-away
// server without TLS.)
func ExampleState_Studies() {
	dir, _ := os.MkdirTemp("", "nats")
	defer os.RemoveAll(dir)
	srv, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: dir, NoSigs: true, NoLog: true})
	if err != nil {
		fmt.Println(err)
		return
	}
	go srv.Start()
	defer srv.Shutdown()
	srv.ReadyForConnections(10 * time.Second)

	ctx := context.Background()
	open := func() *natsstate.Studies {
		s, err := natsstate.Connect(ctx, natsstate.Config{URL: srv.ClientURL()})
		if err != nil {
			panic(err)
		}
		st, err := s.Studies(ctx)
		if err != nil {
			panic(err)
		}
		return st
	}
	replica1, replica2 := open(), open()
	_ = replica1.CreateStudy(ctx, "heights", []byte("study record"))
	name := "5a1f0c7e0d3b2a4f6e8c9d0b1a2f3e4d5c6b7a8f9e0d1c2b3a4f5e6d7c8b9a0f"
	added1, _ := replica1.AddSubmission(ctx, "heights", name, []byte("first"))
	added2, _ := replica2.AddSubmission(ctx, "heights", name, []byte("retry"))
	names, _ := replica2.Submissions(ctx, "heights")
	rec, _ := replica2.Submission(ctx, "heights", name)
	fmt.Println(added1, added2, len(names), string(rec))
	// Output: true false 1 first
}
