package pqkex

import (
	"errors"
	"fmt"
	"testing"
)

func TestIsSessionRefused(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{errorFromReason(string(reasonUnknownTicket)), true},
		{errorFromReason(string(reasonTicketExpired)), true},
		{fmt.Errorf("post: %w", errorFromReason(string(reasonUnknownSess))), true},
		{errorFromReason(string(reasonTampered)), false},
		{errorFromReason(string(reasonReplayed)), false},
		{errors.New("unknown_ticket"), false},
		{nil, false},
	} {
		if got := IsSessionRefused(tc.err); got != tc.want {
			t.Errorf("IsSessionRefused(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
