package natsstate

import (
	"bytes"
	"testing"

	"github.com/veilrpc/veil/pqkex"
)

// The ticket-key bucket is written by other replicas: a value that is not exactly a
// key is an error, never a panic, and a parsed key re-encodes to the same bytes.
func FuzzDecodeTicketKey(f *testing.F) {
	f.Add(encodeTicketKey(pqkex.TicketKey{ID: 7}))
	f.Add([]byte("VTK1"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := decodeTicketKey(b)
		if err != nil {
			return
		}
		if !bytes.Equal(encodeTicketKey(k), b) {
			t.Fatalf("%x re-encodes to %x", b, encodeTicketKey(k))
		}
	})
}

func TestTicketKeyEncodingLengths(t *testing.T) {
	good := encodeTicketKey(pqkex.TicketKey{ID: 1, Secret: [32]byte{1}})
	if _, err := decodeTicketKey(good); err != nil {
		t.Fatal(err)
	}
	for n := range len(good) + 2 {
		if n == len(good) {
			continue
		}
		b := append(bytes.Clone(good), 0, 0)[:n]
		if _, err := decodeTicketKey(b); err == nil {
			t.Errorf("%d bytes accepted", n)
		}
	}
	bad := bytes.Clone(good)
	bad[0] = 'X'
	if _, err := decodeTicketKey(bad); err == nil {
		t.Error("wrong magic accepted")
	}
}
