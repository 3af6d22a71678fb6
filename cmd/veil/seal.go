package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/ca"
	"github.com/veilrpc/veil/transport"
)

// sealMode is veil serve's --pq-seal: a pqkex mode, off, or unset (then resolve picks
// strict when the identity directory holds a sealing identity and off when it does not).
type sealMode struct {
	set  bool
	off  bool
	mode pqkex.Mode
}

func (m *sealMode) String() string {
	switch {
	case !m.set:
		return ""
	case m.off:
		return "off"
	}
	return m.mode.String()
}

func (m *sealMode) Set(s string) error {
	switch s {
	case "":
		*m = sealMode{}
		return nil
	case "off":
		*m = sealMode{set: true, off: true}
		return nil
	}
	mode, err := pqkex.ParseMode(s)
	if err != nil {
		return fmt.Errorf("--pq-seal %q: want strict, permissive or off", s)
	}
	*m = sealMode{set: true, mode: mode}
	return nil
}

// resolve returns m, or when it is unset strict if identityDir holds a sealing identity and
// off if it does not.
func (m sealMode) resolve(identityDir string) sealMode {
	if m.set {
		return m
	}
	return sealMode{set: true, off: !hasSealingIdentity(identityDir)}
}

// hasSealingIdentity reports whether dir holds a sealing identity (pq.cred).
func hasSealingIdentity(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, rpc.SealCredentialFile))
	return err == nil
}

// clientSeal is the client commands' --pq-seal: on, proxied, off, or unset (sealed when
// the identity directory holds a sealing identity).
type clientSeal int

const (
	sealAuto    clientSeal = iota // unset
	sealOn                        // sealed, bound to the TLS connection
	sealProxied                   // sealed through a TLS-terminating proxy: no channel binding
	sealOff
)

var clientSealNames = []string{sealAuto: "", sealOn: "on", sealProxied: "proxied", sealOff: "off"}

// addClientSeal defines the client commands' --pq-seal flag on fs.
func addClientSeal(fs interface {
	Var(flag.Value, string, string)
}) *clientSeal {
	s := new(clientSeal)
	fs.Var(s, "pq-seal", pqSealUsage)
	return s
}

func (s *clientSeal) String() string { return clientSealNames[*s] }

func (s *clientSeal) Set(v string) error {
	i := slices.Index(clientSealNames, v)
	if i < 0 {
		return fmt.Errorf("--pq-seal %q: want on, proxied or off", v)
	}
	*s = clientSeal(i)
	return nil
}

// sealed reports whether calls are sealed with the identity in dir.
func (s clientSeal) sealed(dir string) bool {
	switch s {
	case sealAuto:
		return hasSealingIdentity(dir)
	case sealOff:
		return false
	}
	return true
}

// newSealingServer builds the pqkex server from the sealing identity in dir.
func newSealingServer(dir string, mode pqkex.Mode, reg prometheus.Registerer, tickets *pqkex.TicketKeys, extra ...pqkex.ServerOption) (*pqkex.Server, error) {
	id, roots, err := rpc.LoadSealingIdentity(dir)
	if err != nil {
		return nil, fmt.Errorf("%w (issue one with 'veil ca issue', or pass --pq-seal off)", err)
	}
	return sealingServer(id, roots, mode, reg, tickets, extra...)
}

// newSealingServerFrom builds the pqkex server on the sealing identity that the online
// CA's client obtains with every certificate (it rotates with each renewal).
func newSealingServerFrom(c *ca.Client, mode pqkex.Mode, reg prometheus.Registerer, tickets *pqkex.TicketKeys, extra ...pqkex.ServerOption) (*pqkex.Server, error) {
	roots, err := c.SealingRoots()
	if err != nil {
		return nil, err
	}
	return sealingServer(c, roots, mode, reg, tickets, extra...)
}

func sealingServer(id pqkex.IdentitySource, roots pqkex.Roots, mode pqkex.Mode, reg prometheus.Registerer, tickets *pqkex.TicketKeys, extra ...pqkex.ServerOption) (*pqkex.Server, error) {
	opts := []pqkex.ServerOption{pqkex.WithIdentity(id), pqkex.WithRoots(roots), pqkex.WithMode(mode), pqkex.WithMetrics(reg)}
	if tickets != nil {
		opts = append(opts, pqkex.WithTicketKeys(tickets))
	}
	return pqkex.NewServer(append(opts, extra...)...)
}

// reloadTicketKeysOnHangup rereads the ticket-key file on SIGHUP, and every minute so that
// a rotation by a scheduled 'veil ticket-keys' needs no signal, and rotates to its current
// key, keeping the old one for tickets already issued (the key set erases it a period
// later). A current key older than the period is logged as overdue: it still seals, since
// refusing would stop the service (docs/pqkex.md section 7.2).
func reloadTicketKeysOnHangup(ctx context.Context, path string, keys *pqkex.TicketKeys, logger *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	tick := time.NewTicker(time.Minute)
	defer tick.Stop()
	var overdue uint32
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
		case <-tick.C:
		}
		b, err := os.ReadFile(path)
		if err != nil {
			logger.Error("ticket keys not reloaded", "err", err)
			continue
		}
		fileKeys, err := rpc.ReadTicketKeys(b)
		if err != nil {
			logger.Error("ticket keys not reloaded", "err", err)
			continue
		}
		cur := fileKeys[0]
		if !cur.Created.IsZero() && time.Since(cur.Created) > keys.Period() && overdue != cur.ID {
			overdue = cur.ID
			logger.Warn("ticket key overdue: rotate the file with 'veil ticket-keys' every period", "current", cur.ID, "period", keys.Period().String())
		}
		if cur.ID == keys.CurrentID() {
			continue
		}
		if err := keys.Rotate(cur); err != nil {
			logger.Error("ticket keys not rotated", "err", err)
			continue
		}
		logger.Info("ticket keys rotated", "current", cur.ID)
	}
}

func runTicketKeys(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ticket-keys", "ticket-keys --file FILE [--json]", stderr)
	file := fs.String("file", "", "ticket-key file to create or rotate (0600)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "file"); err != nil {
		return err
	}
	id, err := rpc.RotateTicketKeyFile(*file)
	if err != nil {
		return err
	}
	return emit(stdout, *asJSON, map[string]any{"file": *file, "current_id": id}, func(w io.Writer) {
		fmt.Fprintf(w, "ticket key %d is current in %s (the previous one still opens tickets for one period); running servers reread the file within a minute or on SIGHUP; rotate again within the ticket lifetime\n", id, *file)
	})
}

// newSealingClient builds the pqkex client from the sealing identity in dir: it expects the
// servers authorize accepts and binds to the TLS channel unless bind is false.
func newSealingClient(dir string, authorize pqkex.Authorizer, bind bool, extra ...pqkex.Option) (*pqkex.Client, error) {
	id, roots, err := rpc.LoadSealingIdentity(dir)
	if err != nil {
		return nil, err
	}
	return sealingClient(id, roots, authorize, bind, extra...)
}

func sealingClient(id pqkex.IdentitySource, roots pqkex.Roots, authorize pqkex.Authorizer, bind bool, extra ...pqkex.Option) (*pqkex.Client, error) {
	opts := append([]pqkex.Option{pqkex.WithIdentity(id), pqkex.WithRoots(roots), pqkex.WithAuthorizer(authorize)}, extra...)
	if !bind {
		opts = append(opts, pqkex.WithoutChannelBinding())
	}
	return pqkex.NewClient(opts...)
}

// pqSealUsage describes the client commands' --pq-seal values.
const pqSealUsage = "seal calls end to end: on (bound to the TLS connection), proxied (through a TLS-terminating proxy: no channel binding, needs --server-id) or off (default on when the identity holds pq.cred)"

// newIdentityClient is the HTTP client of the CLI's client commands: the identity in
// dir, the server authorized by serverID (default: any ID of the identity's trust
// domain), and calls sealed end to end unless seal is off (default: sealed when dir
// holds a sealing identity). Sealed calls expect the same server as the TLS hop and are
// bound to the TLS connection, so its peer is the sealed peer; proxied drops the binding
// for a TLS-terminating proxy and then needs serverID, the only statement of which workload
// answers. It reports whether calls are sealed.
// copts are further rpc client options (HTTP/3), popts further sealing options (a suite
// policy, which needs sealed calls).
func newIdentityClient(dir, serverID string, seal clientSeal, copts []rpc.ClientOption, popts ...pqkex.Option) (*http.Client, bool, error) {
	if seal == sealProxied && serverID == "" {
		return nil, false, fmt.Errorf("%w: --pq-seal proxied needs --server-id: through a proxy only the sealed credential says which workload answers", errUsage)
	}
	src, err := transport.LoadFiles(dir)
	if err != nil {
		return nil, false, err
	}
	svid, err := src.GetX509SVID()
	if err != nil {
		return nil, false, err
	}
	authorize := transport.AuthorizeMatching(transport.MustParsePattern("spiffe://" + svid.ID.TrustDomain().Name()))
	if serverID != "" {
		id, err := spiffeid.FromString(serverID)
		if err != nil {
			return nil, false, fmt.Errorf("%w: --server-id: %v", errUsage, err)
		}
		authorize = transport.AuthorizeID(id)
	}
	sealed := seal.sealed(dir)
	if len(popts) != 0 && !sealed {
		return nil, false, fmt.Errorf("%w: --pq-suite needs sealed calls (a sealing identity, --pq-seal on or proxied)", errUsage)
	}
	var opts []rpc.ClientOption
	if sealed {
		pc, err := newSealingClient(dir, rpc.SealedAuthorizer(authorize), seal != sealProxied, popts...)
		if err != nil {
			return nil, false, err
		}
		opts = append(opts, rpc.WithClientSealing(pc))
	}
	return rpc.NewHTTPClient(src, authorize, append(opts, copts...)...), sealed, nil
}
