package transport_test

import (
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/transport"
)

// A --pq flag's value becomes a PQMode; the empty string is the zero value, PQStrict.
func ExampleParsePQMode() {
	for _, s := range []string{"", "strict", "permissive", "off"} {
		m, err := transport.ParsePQMode(s)
		if err != nil {
			fmt.Println(err)
			continue
		}
		fmt.Printf("%q: %v\n", s, m)
	}
	// Output:
	// "": strict
	// "strict": strict
	// "permissive": permissive
	// transport: unknown PQ mode "off" (want strict or permissive)
}

// A pattern is checked when it is parsed: a "*" stands for one whole path segment.
func ExampleParsePattern() {
	for _, s := range []string{"spiffe://example.org/ns/*/sa/web", "spiffe://example.org/ns/prod*", "https://example.org"} {
		p, err := transport.ParsePattern(s)
		if err != nil {
			fmt.Println("refused:", s)
			continue
		}
		fmt.Println(p, p.Match(spiffeid.RequireFromString("spiffe://example.org/ns/prod/sa/web")))
	}
	// Output:
	// spiffe://example.org/ns/*/sa/web true
	// refused: spiffe://example.org/ns/prod*
	// refused: https://example.org
}
