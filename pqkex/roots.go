package pqkex

import (
	"crypto"
	"errors"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
)

// NewRoots returns the roots for a CA's encoded ML-DSA-65 public key (as `veil ca`
// writes ca-mldsa65.pub and the online CA returns it) and its classical root key, so
// that callers need not decode ML-DSA keys themselves.
func NewRoots(mldsa65PublicKey []byte, classical crypto.PublicKey) (Roots, error) {
	var pq mldsa65.PublicKey
	if err := pq.UnmarshalBinary(mldsa65PublicKey); err != nil {
		return Roots{}, errors.New("pqkex: not an ML-DSA-65 public key")
	}
	if classical == nil {
		return Roots{}, errors.New("pqkex: no classical root key")
	}
	return Roots{PQ: &pq, Classical: classical}, nil
}
