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
		{callRefusal(string(reasonUnknownTicket)), true},
		{callRefusal(string(reasonTicketExpired)), true},
		{fmt.Errorf("post: %w", toConnect(callRefusal(string(reasonUnknownSess)))), true},
		{callRefusal(string(reasonTampered)), false},
		{callRefusal(string(reasonReplayed)), false},
		{errUnknownTicket, true},
		{errors.New("unknown_ticket"), false},
		{nil, false},
	} {
		if got := IsSessionRefused(tc.err); got != tc.want {
			t.Errorf("IsSessionRefused(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
