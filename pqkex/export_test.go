package pqkex

import "time"

// Handshake runs one complete pqkex handshake in memory, both sides, without channel
// binding, and reports whether both derived the same session. For benchmarks.
func Handshake(client, server *Identity, s *Server, now time.Time) bool {
	hs, err := startClient(nil, client, server.cred, AES256GCM, false)
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
			issued: unixSeconds(now), expiry: unixSeconds(now.Add(time.Hour)), serverDigest: server.cred.digest,
			clientID: peer.spiffeID, clientPK: peer.publicKey}
		t, err := s.cfg.tickets.seal(nil, st.marshal())
		return t, st.expiry, err
	}
	sh, sec, err := respond(nil, ch, hs.raw, server, peer, nil, issue)
	if err != nil {
		return false
	}
	res, err := hs.finish(sh, nil)
	return err == nil && string(res.secrets.session) == string(sec.session)
}
