package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
)

// TestSealFlags: --pq-seal parses once into a typed value; an unset flag resolves against
// the identity directory (strict with a sealing identity, off without).
func TestSealFlags(t *testing.T) {
	for _, tc := range []struct {
		in   string
		off  bool
		mode pqkex.Mode
	}{{"strict", false, pqkex.Strict}, {"permissive", false, pqkex.Permissive}, {"off", true, pqkex.Strict}} {
		var m sealMode
		if err := m.Set(tc.in); err != nil || m.off != tc.off || m.mode != tc.mode || m.String() != tc.in {
			t.Errorf("--pq-seal %s: %+v %v", tc.in, m, err)
		}
	}
	for _, bad := range []string{"on", "proxied", "Strict", "maybe"} {
		var m sealMode
		if err := m.Set(bad); err == nil {
			t.Errorf("serve --pq-seal %s accepted", bad)
		}
	}
	dir := t.TempDir()
	if m := (sealMode{}).resolve(dir); !m.off || m.String() != "off" {
		t.Errorf("unset, no sealing identity: %v, want off", m.String())
	}
	if err := os.WriteFile(filepath.Join(dir, rpc.SealCredentialFile), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if m := (sealMode{}).resolve(dir); m.off || m.mode != pqkex.Strict || m.String() != "strict" {
		t.Errorf("unset, sealing identity: %v, want strict", m.String())
	}
	if m := (sealMode{set: true, mode: pqkex.Permissive}).resolve(dir); m.mode != pqkex.Permissive {
		t.Errorf("explicit permissive resolved to %v", m.String())
	}

	for _, tc := range []struct {
		in     string
		want   clientSeal
		sealed bool // with a sealing identity in the directory
	}{{"", sealAuto, true}, {"on", sealOn, true}, {"proxied", sealProxied, true}, {"off", sealOff, false}} {
		var s clientSeal
		if err := s.Set(tc.in); err != nil || s != tc.want || s.String() != tc.in || s.sealed(dir) != tc.sealed {
			t.Errorf("client --pq-seal %q: %v %v", tc.in, s, err)
		}
	}
	if sealAuto.sealed(t.TempDir()) {
		t.Error("unset client --pq-seal seals without a sealing identity")
	}
	for _, bad := range []string{"strict", "permissive", "maybe"} {
		var s clientSeal
		if err := s.Set(bad); err == nil {
			t.Errorf("client --pq-seal %s accepted", bad)
		}
	}
}
