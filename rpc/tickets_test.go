package rpc_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/veilrpc/veil/rpc"
)

func TestTicketKeyFileRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tickets")
	for want := uint32(1); want <= 3; want++ {
		id, err := rpc.RotateTicketKeyFile(path)
		if err != nil || id != want {
			t.Fatalf("rotation %d: id %d, %v", want, id, err)
		}
		keys, err := rpc.LoadTicketKeys(path)
		if err != nil || keys.CurrentID() != want {
			t.Fatalf("current %v, %v", keys, err)
		}
	}
	b, _ := os.ReadFile(path)
	parsed, err := rpc.ReadTicketKeys(b)
	if err != nil || len(parsed) != 2 || parsed[0].ID != 3 || parsed[1].ID != 2 {
		t.Fatalf("file keeps %v, %v; want keys 3 and 2", parsed, err)
	}
	if parsed[0].Created.IsZero() || parsed[1].Created.IsZero() || parsed[0].Created.Before(parsed[1].Created) {
		t.Fatalf("creation times %v, %v", parsed[0].Created, parsed[1].Created)
	}
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode().Perm())
	}
}

func TestReadTicketKeysRefusesBadFiles(t *testing.T) {
	good := "1 " + strings.Repeat("ab", 32)
	for _, bad := range []string{
		"",
		"# only a comment\n",
		"1",
		"x " + strings.Repeat("ab", 32),
		"1 " + strings.Repeat("ab", 31),
		"1 " + strings.Repeat("zz", 32),
		good + "\n" + good + "\n" + good,
		good + " yesterday",
		good + " 1 2",
	} {
		if _, err := rpc.ReadTicketKeys([]byte(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
	for _, ok := range []string{good, good + " 1800000000"} {
		if _, err := rpc.ReadTicketKeys([]byte(ok)); err != nil {
			t.Fatal(err)
		}
	}
}
