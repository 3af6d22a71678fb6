package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
)

// sealingMode resolves --pq-seal: an explicit mode, or strict when the identity
// directory holds a sealing identity and off when it does not.
func sealingMode(flag, identityDir string) (string, error) {
	switch flag {
	case "strict", "permissive", "off":
		return flag, nil
	case "":
		if _, err := os.Stat(filepath.Join(identityDir, rpc.SealCredentialFile)); err == nil {
			return "strict", nil
		}
		return "off", nil
	}
	return "", fmt.Errorf("%w: --pq-seal %q: want strict, permissive or off", errUsage, flag)
}

// newSealingServer builds the pqkex server from the sealing identity in dir.
func newSealingServer(dir, mode string, reg prometheus.Registerer) (*pqkex.Server, error) {
	id, roots, err := rpc.LoadSealingIdentity(dir)
	if err != nil {
		return nil, fmt.Errorf("%w (issue one with 'veil ca issue', or pass --pq-seal off)", err)
	}
	m := pqkex.Strict
	if mode == "permissive" {
		m = pqkex.Permissive
	}
	return pqkex.NewServer(pqkex.WithIdentity(id), pqkex.WithRoots(roots), pqkex.WithMode(m), pqkex.WithMetrics(reg))
}

// newSealingClient builds the pqkex client from the sealing identity in dir.
func newSealingClient(dir string, authorize pqkex.Authorizer, bind bool) (*pqkex.Client, error) {
	id, roots, err := rpc.LoadSealingIdentity(dir)
	if err != nil {
		return nil, err
	}
	opts := []pqkex.Option{pqkex.WithIdentity(id), pqkex.WithRoots(roots), pqkex.WithAuthorizer(authorize)}
	if bind {
		opts = append(opts, pqkex.WithChannelBinding())
	}
	return pqkex.NewClient(opts...)
}
