package scoring

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/veilrpc/veil/he/keys"
)

// sampleQuota counts the samples each identity has had scored in fixed windows.
type sampleQuota struct {
	limit  uint64
	window time.Duration
	now    func() time.Time

	mu   sync.Mutex
	used map[string]*quotaWindow
}

type quotaWindow struct {
	start time.Time
	n     uint64
}

// newSampleQuota returns nil (no quota) for a zero limit.
func newSampleQuota(limit uint64, window time.Duration, now func() time.Time) *sampleQuota {
	if limit == 0 {
		return nil
	}
	return &sampleQuota{limit: limit, window: window, now: now, used: map[string]*quotaWindow{}}
}

// charge counts n samples for owner, or refuses them with resource_exhausted and the
// time left in owner's window as the retry hint.
func (q *sampleQuota) charge(owner string, n uint64) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	now := q.now()
	for id, w := range q.used { // forget finished windows: the map stays as small as the active identities
		if !now.Before(w.start.Add(q.window)) {
			delete(q.used, id)
		}
	}
	w, ok := q.used[owner]
	if !ok {
		w = &quotaWindow{start: now}
		q.used[owner] = w
	}
	if n > q.limit-min(w.n, q.limit) {
		err := connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("scoring: %d samples exceed this identity's quota (%d of %d per %s used)", n, w.n, q.limit, q.window))
		return keys.RetryError(err, w.start.Add(q.window).Sub(now))
	}
	w.n += n
	return nil
}

// decisionMask returns n factors drawn log-uniformly from [1, DecisionMaskMax] with
// crypto/rand: knowing r*z, the client's uncertainty about log|z| is the whole range.
func decisionMask(n int) ([]float64, error) {
	buf := make([]byte, 8*n)
	if _, err := rand.Read(buf); err != nil {
		return nil, errors.New("scoring: no randomness")
	}
	out := make([]float64, n)
	for i := range out {
		u := float64(binary.LittleEndian.Uint64(buf[8*i:])>>11) / (1 << 53)
		out[i] = math.Exp2(u * math.Log2(DecisionMaskMax))
	}
	return out, nil
}
