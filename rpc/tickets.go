package rpc

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/veilrpc/veil/internal/atomicfile"
	"github.com/veilrpc/veil/pqkex"
)

// A ticket-key file holds the keys that seal pqkex session tickets, shared by every
// replica that should continue the others' sessions. One key per line, "ID HEX-SECRET",
// the current key first and at most one previous key after it; '#' starts a comment.
// It is secret: written 0600, atomically.

// ReadTicketKeys parses a ticket-key file's content.
func ReadTicketKeys(b []byte) ([]pqkex.TicketKey, error) {
	var keys []pqkex.TicketKey
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		idText, secretText, ok := strings.Cut(line, " ")
		id, err := strconv.ParseUint(idText, 10, 32)
		if !ok || err != nil {
			return nil, fmt.Errorf("rpc: ticket keys: line %d: want \"ID HEX-SECRET\"", n)
		}
		secret, err := hex.DecodeString(strings.TrimSpace(secretText))
		if err != nil || len(secret) != 32 {
			return nil, fmt.Errorf("rpc: ticket keys: line %d: the secret must be 64 hex digits", n)
		}
		k := pqkex.TicketKey{ID: uint32(id)}
		copy(k.Secret[:], secret)
		keys = append(keys, k)
	}
	switch {
	case len(keys) == 0:
		return nil, errors.New("rpc: ticket keys: no key")
	case len(keys) > 2:
		return nil, errors.New("rpc: ticket keys: at most a current and a previous key")
	}
	return keys, nil
}

// LoadTicketKeys reads a ticket-key file into a key set.
func LoadTicketKeys(path string) (*pqkex.TicketKeys, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("rpc: %w", err)
	}
	keys, err := ReadTicketKeys(b)
	if err != nil {
		return nil, err
	}
	return pqkex.NewTicketKeys(keys[0], keys[1:]...)
}

// RotateTicketKeyFile writes a new random current key to path, keeping the file's
// current key (if any) as the previous one. It returns the new key's ID.
func RotateTicketKeyFile(path string) (uint32, error) {
	var keys []pqkex.TicketKey
	if b, err := os.ReadFile(path); err == nil {
		if keys, err = ReadTicketKeys(b); err != nil {
			return 0, err
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("rpc: %w", err)
	}
	id := uint32(1)
	if len(keys) > 0 {
		id = keys[0].ID + 1
	}
	next, err := pqkex.GenerateTicketKey(id, nil)
	if err != nil {
		return 0, fmt.Errorf("rpc: %w", err)
	}
	var out strings.Builder
	out.WriteString("# Veil pqkex ticket keys: current first, then previous. Secret: share only with replicas.\n")
	for _, k := range append([]pqkex.TicketKey{next}, keys[:min(len(keys), 1)]...) {
		fmt.Fprintf(&out, "%d %s\n", k.ID, hex.EncodeToString(k.Secret[:]))
	}
	if err := atomicfile.Write(path, []byte(out.String()), 0o600); err != nil {
		return 0, fmt.Errorf("rpc: %w", err)
	}
	return id, nil
}
