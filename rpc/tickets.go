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
	"time"

	"github.com/veilrpc/veil/internal/atomicfile"
	"github.com/veilrpc/veil/pqkex"
)

// A ticket-key file holds the keys that seal one service's pqkex session tickets, shared
// by that service's replicas only (docs/pqkex.md section 7.1). One key per line,
// "ID HEX-SECRET CREATED", CREATED in Unix seconds (files of earlier versions leave it
// out: the time the file is read), the current key first and at most one previous key
// after it; '#' starts a comment. It is secret: written 0600, atomically.

// ReadTicketKeys parses a ticket-key file's content.
func ReadTicketKeys(b []byte) ([]pqkex.TicketKey, error) {
	var keys []pqkex.TicketKey
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) != 2 && len(fields) != 3 {
			return nil, fmt.Errorf("rpc: ticket keys: line %d: want \"ID HEX-SECRET CREATED\"", n)
		}
		id, err := strconv.ParseUint(fields[0], 10, 32)
		if err != nil {
			return nil, fmt.Errorf("rpc: ticket keys: line %d: want \"ID HEX-SECRET CREATED\"", n)
		}
		secret, err := hex.DecodeString(fields[1])
		if err != nil || len(secret) != 32 {
			return nil, fmt.Errorf("rpc: ticket keys: line %d: the secret must be 64 hex digits", n)
		}
		k := pqkex.TicketKey{ID: uint32(id)}
		copy(k.Secret[:], secret)
		if len(fields) == 3 {
			created, err := strconv.ParseInt(fields[2], 10, 64)
			if err != nil || created <= 0 {
				return nil, fmt.Errorf("rpc: ticket keys: line %d: CREATED must be Unix seconds", n)
			}
			k.Created = time.Unix(created, 0)
		}
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

// LoadTicketKeys reads a ticket-key file into a key set of period
// pqkex.DefaultTicketKeyPeriod: the previous key is erased a period after the current one
// was created.
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
	next.Created = time.Now()
	var out strings.Builder
	out.WriteString("# Veil pqkex ticket keys of one service: current first, then previous (ID SECRET CREATED). Secret: share only with this service's replicas.\n")
	// The key before the previous one is dropped: its tickets' period is over.
	for _, k := range append([]pqkex.TicketKey{next}, keys[:min(len(keys), 1)]...) {
		created := k.Created
		if created.IsZero() {
			created = next.Created
		}
		fmt.Fprintf(&out, "%d %s %d\n", k.ID, hex.EncodeToString(k.Secret[:]), created.Unix())
	}
	if err := atomicfile.Write(path, []byte(out.String()), 0o600); err != nil {
		return 0, fmt.Errorf("rpc: %w", err)
	}
	return id, nil
}
