package pqkex

import "time"

// Handshake runs one complete pqkex handshake in memory, both sides, and reports whether both
// derived the same session. With bind it runs the channel-bound variant, with a fixed value
// standing in for the TLS exporter, and with tlsEphemeral as on a post-quantum TLS connection
// (no pqkex ephemeral). For benchmarks.
func Handshake(client, server *Identity, s *Server, now time.Time, bind, tlsEphemeral bool) bool {
	var cb []byte
	if bind {
		cb = make([]byte, 32)
	}
	hs, err := startClient(nil, client, server.cred, AES256GCM, suiteFlags(client.cred.suite, clientFlags(bind, tlsEphemeral)))
	if err != nil {
		return false
	}
	ch, err := parseClientHello(hs.raw)
	if err != nil {
		return false
	}
	peer, err := s.creds.verify(s.cfg.roots, ch.credential, now)
	if err != nil {
		return false
	}
	issue := func(sec handshakeSecrets) ([]byte, uint64, error) {
		st := &ticketState{suite: ch.suite, aead: ch.aead, sessionID: sec.sessionID, secret: sec.session,
			issued: unixSeconds(now), expiry: unixSeconds(now.Add(time.Hour)), serverHash: server.cred.hash,
			clientID: peer.spiffeID, clientPK: peer.publicKey}
		t, err := s.cfg.tickets.seal(nil, server.cred.spiffeID, st.marshal(), now)
		return t, st.expiry, err
	}
	sh, sec, err := respond(nil, ch, server, peer, cb, issue)
	if err != nil {
		return false
	}
	res, err := hs.finish(sh, cb)
	return err == nil && string(res.secrets.session) == string(sec.session)
}
