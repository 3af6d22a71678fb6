package pki

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/transport"
)

// Denylist is a set of certificates to refuse although they chain to a trusted root:
// leaf serial numbers and whole SPIFFE IDs. It travels with the trust bundle and is
// checked on every handshake, resumed ones included: it implements transport.Denylist.
// The zero value and nil deny nothing. A Denylist is immutable.
type Denylist struct {
	serials map[string]bool // lower-case hex without leading zeros
	ids     map[spiffeid.ID]bool
}

// NewDenylist builds a denylist from hexadecimal serial numbers and SPIFFE IDs.
func NewDenylist(serials, ids []string) (*Denylist, error) {
	d := &Denylist{serials: map[string]bool{}, ids: map[spiffeid.ID]bool{}}
	for _, s := range serials {
		n, ok := new(big.Int).SetString(strings.TrimPrefix(strings.ToLower(s), "0x"), 16)
		if !ok || n.Sign() < 0 {
			return nil, fmt.Errorf("pki: denylist: %q is not a hexadecimal serial number", s)
		}
		d.serials[n.Text(16)] = true
	}
	for _, s := range ids {
		id, err := spiffeid.FromString(s)
		if err != nil {
			return nil, fmt.Errorf("pki: denylist: %w", err)
		}
		d.ids[id] = true
	}
	return d, nil
}

// Serials returns the denied serial numbers, sorted, in lower-case hexadecimal.
func (d *Denylist) Serials() []string {
	if d == nil {
		return nil
	}
	out := make([]string, 0, len(d.serials))
	for s := range d.serials {
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// IDs returns the denied SPIFFE IDs, sorted.
func (d *Denylist) IDs() []string {
	if d == nil {
		return nil
	}
	out := make([]string, 0, len(d.ids))
	for id := range d.ids {
		out = append(out, id.String())
	}
	slices.Sort(out)
	return out
}

// Len is the number of entries.
func (d *Denylist) Len() int {
	if d == nil {
		return 0
	}
	return len(d.serials) + len(d.ids)
}

// Check returns an error if any certificate of chain has a denied serial number, or if
// the leaf's SPIFFE ID is denied.
func (d *Denylist) Check(chain []*x509.Certificate) error {
	if d.Len() == 0 || len(chain) == 0 {
		return nil
	}
	for _, c := range chain {
		if d.serials[c.SerialNumber.Text(16)] {
			return fmt.Errorf("certificate serial %s is revoked", c.SerialNumber.Text(16))
		}
	}
	if len(chain[0].URIs) == 1 {
		if id, err := spiffeid.FromURI(chain[0].URIs[0]); err == nil && d.ids[id] {
			return fmt.Errorf("SPIFFE ID %s is revoked", id)
		}
	}
	return nil
}

// With returns a copy of d with more entries.
func (d *Denylist) With(serials, ids []string) (*Denylist, error) {
	return NewDenylist(append(d.Serials(), serials...), append(d.IDs(), ids...))
}

var _ transport.Denylist = (*Denylist)(nil)

type denylistJSON struct {
	Serials []string `json:"serials"`
	IDs     []string `json:"ids"`
}

// MarshalJSON encodes the denylist as {"serials": [...], "ids": [...]}.
func (d *Denylist) MarshalJSON() ([]byte, error) {
	return json.Marshal(denylistJSON{Serials: nonNil(d.Serials()), IDs: nonNil(d.IDs())})
}

// UnmarshalJSON decodes what MarshalJSON writes.
func (d *Denylist) UnmarshalJSON(b []byte) error {
	var j denylistJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return errors.New("pki: denylist: malformed JSON")
	}
	n, err := NewDenylist(j.Serials, j.IDs)
	if err != nil {
		return err
	}
	*d = *n
	return nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
