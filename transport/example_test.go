package transport_test

import (
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/transport"
)

// A server and a client with identities from one CA complete a mutual-TLS 1.3
// handshake on loopback: each side verifies the other's SPIFFE ID, and the key
// exchange is the post-quantum hybrid X25519MLKEM768 (the default, PQStrict).
func Example() {
	dir, err := os.MkdirTemp("", "veil-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// A CA (package pki) issues the two identity directories: tls.crt, tls.key, ca.crt.
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		log.Fatal(err)
	}
	serverID := spiffeid.RequireFromString("spiffe://example.org/echo")
	clientID := spiffeid.RequireFromString("spiffe://example.org/client")
	for _, id := range []spiffeid.ID{serverID, clientID} {
		if err := ca.IssueFiles(id, filepath.Join(dir, id.Path()), time.Hour); err != nil {
			log.Fatal(err)
		}
	}
	serverSrc, err := transport.LoadFiles(filepath.Join(dir, serverID.Path()))
	if err != nil {
		log.Fatal(err)
	}
	clientSrc, err := transport.LoadFiles(filepath.Join(dir, clientID.Path()))
	if err != nil {
		log.Fatal(err)
	}

	// The server accepts only the client's ID; the client only the server's.
	ln, err := tls.Listen("tcp", "127.0.0.1:0", transport.ServerConfig(serverSrc,
		transport.WithAuthorizer(transport.AuthorizeID(clientID))))
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	seen := make(chan string, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			seen <- err.Error()
			return
		}
		defer conn.Close()
		tc := conn.(*tls.Conn)
		if err := tc.Handshake(); err != nil {
			seen <- err.Error()
			return
		}
		cs := tc.ConnectionState()
		id, _ := transport.PeerID(&cs)
		seen <- "server sees " + id.String()
		_, _ = conn.Write([]byte("ok"))
	}()

	conn, err := tls.Dial("tcp", ln.Addr().String(), transport.ClientConfig(clientSrc,
		transport.WithAuthorizer(transport.AuthorizeID(serverID))))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.ReadFull(conn, make([]byte, 2)); err != nil {
		log.Fatal(err)
	}
	cs := conn.ConnectionState()
	id, _ := transport.PeerID(&cs)
	fmt.Println(<-seen)
	fmt.Println("client sees", id)
	fmt.Println("key exchange", cs.CurveID, "post-quantum:", transport.IsPQGroup(cs.CurveID))
	// Output:
	// server sees spiffe://example.org/client
	// client sees spiffe://example.org/echo
	// key exchange X25519MLKEM768 post-quantum: true
}

// Patterns name the peers an Authorizer (or package rpc's Policy) lets in.
func ExampleAuthorizeMatching() {
	authorize := transport.AuthorizeMatching(
		transport.MustParsePattern("spiffe://example.org/payment/ns/*/sa/*"),
		transport.MustParsePattern("spiffe://partner.org"),
	)
	for _, id := range []string{
		"spiffe://example.org/payment/ns/prod/sa/api",
		"spiffe://partner.org/anything",
		"spiffe://example.org/payment/ns/prod",
	} {
		fmt.Println(id, authorize(spiffeid.RequireFromString(id)) == nil)
	}
	// Output:
	// spiffe://example.org/payment/ns/prod/sa/api true
	// spiffe://partner.org/anything true
	// spiffe://example.org/payment/ns/prod false
}

// The zero PQMode is the secure one: post-quantum hybrid key exchange only.
func ExamplePQMode() {
	var zero transport.PQMode
	fmt.Println(zero)
	m, _ := transport.ParsePQMode("permissive")
	fmt.Println(m)
	// Output:
	// strict
	// permissive
}
