package keys

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"github.com/veilrpc/veil/he"
)

func TestConnectError(t *testing.T) {
	if ConnectError(nil) != nil {
		t.Error("nil error became non-nil")
	}
	p := smallParams()
	_, invalid := he.UnmarshalVector(p, nil)
	_, precondition := he.UnmarshalManifest(p, he.MarshalManifest(he.NewManifest(he.ParamsN13(), he.NeedRelinearization())))
	missing := keysMissing(he.KeyID(strings.Repeat("a", 64)), "gone")
	for err, code := range map[error]connect.Code{
		precondition: connect.CodeFailedPrecondition,
		invalid:      connect.CodeInvalidArgument,
		fmt.Errorf("wrapped: %w", permissionf("y")): connect.CodePermissionDenied,
		context.Canceled: connect.CodeCanceled,
		fmt.Errorf("op: %w", context.DeadlineExceeded): connect.CodeDeadlineExceeded,
		fmt.Errorf("secret internal state 0xdeadbeef"): connect.CodeInternal,
		connect.NewError(connect.CodeAborted, nil):     connect.CodeAborted,
		missing: connect.CodeNotFound,
	} {
		ce := ConnectError(err)
		if connect.CodeOf(ce) != code || CodeOf(err) != code && code != connect.CodeCanceled && code != connect.CodeDeadlineExceeded && code != connect.CodeInternal {
			t.Errorf("%v: code %v (CodeOf %v), want %v", err, connect.CodeOf(ce), CodeOf(err), code)
		}
		if strings.Contains(ce.Error(), "deadbeef") {
			t.Errorf("foreign error text reached the peer: %v", ce)
		}
	}
	// A missing key set travels as a detail the client reads back.
	var ce *connect.Error
	if !errors.As(ConnectError(missing), &ce) {
		t.Fatal("not a connect error")
	}
	wire := connect.NewWireError(ce.Code(), errors.New(ce.Message()))
	for _, d := range ce.Details() {
		wire.AddDetail(d)
	}
	if id, ok := IsKeysMissing(wire); !ok || id != he.KeyID(strings.Repeat("a", 64)) {
		t.Errorf("IsKeysMissing(received) = %q, %v", id, ok)
	}
	if _, ok := IsKeysMissing(ConnectError(invalid)); ok {
		t.Error("an invalid_argument error reads as missing keys")
	}
}
