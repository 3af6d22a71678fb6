package pqkex

// Has reports whether tickets sealed with key id are accepted: id is the current or
// the previous key.
func (t *TicketKeys) Has(id uint32) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.current.id == id || (t.previous != nil && t.previous.id == id)
}
