package pqkex

// IsSessionRefused reports whether err is a server's (unauthenticated) refusal of the client's session
// (its ticket is from a key the server no longer holds or never held, has expired, or
// names a session the server does not keep). The client has dropped that session, so
// the call can be made again and sets a new session up. Unary calls are resent this
// way automatically; a streaming call, whose body is gone, is the caller's to retry.
func IsSessionRefused(err error) bool {
	re := asReason(err)
	if re == nil {
		return false
	}
	switch re.reason {
	case reasonUnknownTicket, reasonTicketExpired, reasonUnknownSess:
		return true
	}
	return false
}
