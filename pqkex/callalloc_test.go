package pqkex

import (
	"bytes"
	"crypto"
	"io"
	"net/http"
	"testing"
	"time"
)

// The per-call steps of a sealed unary call allocate exactly what they must (issue 21:
// allocation is most of a sealed call's extra CPU). Exact counts, so a regression fails.
func TestSealedCallStepAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	c := &Client{cfg: newConfig()}
	sk := callRoot(crypto.SHA256, make([]byte, 32), katServerID, make([]byte, 32))
	ck, err := newCallKeys(crypto.SHA256, AES256GCM, sk, 7, "/veil.echo.v1.EchoService/Echo")
	if err != nil {
		t.Fatal(err)
	}
	head := &fieldBlock{method: http.MethodPost, path: "/veil.echo.v1.EchoService/Echo", attempt: katAttempt(1), headers: http.Header{"Content-Type": {"application/proto"}}}
	plain := bytes.Repeat([]byte{'x'}, 1024)
	var sealed []byte
	// The step's inputs, which live in the call's allocation or the caller's in the real
	// call, are made once here.
	s := &sealer{dir: &ck.c2s, now: time.Now}
	src := bytes.NewReader(nil)
	body := io.NopCloser(src)
	o := &opener{}
	for _, tt := range []struct {
		name string
		want float64
		f    func()
	}{
		// The attempt string itself, nothing else (crypto/rand keeps no reference to the
		// stack buffer it fills).
		{"newAttempt", 1, func() {
			if _, err := c.newAttempt(time.Now()); err != nil {
				t.Fatal(err)
			}
		}},
		// The empty FINAL block of a request or of a response without trailers: no copy.
		{"decode empty block", 0, func() {
			if _, err := decodeFieldBlock(emptyFinalBlock, requestFinal); err != nil {
				t.Fatal(err)
			}
		}},
		// One buffer for the whole sealed request; the body is read into its place.
		{"sealWhole 1 KiB", 1, func() {
			ck.c2s.seq = 0
			src.Reset(plain)
			var err error
			sealed, err = sealWhole(s, 7, head, body, int64(len(plain)), nil)
			if err != nil {
				t.Fatal(err)
			}
		}},
		// The call ID is read into the opener's own header buffer.
		{"readCallID", 0, func() {
			src.Reset(sealed)
			*o = opener{r: src}
			if _, err := o.readCallID(); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		if got := testing.AllocsPerRun(100, tt.f); got != tt.want {
			t.Errorf("%s: %v allocations, want %v", tt.name, got, tt.want)
		}
	}
}
