package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/veilrpc/veil/internal/atomicfile"
	"github.com/veilrpc/veil/internal/certpem"
)

// More files of a CA directory (see docs/ca.md).
const (
	caBundleFile   = "bundle.crt"    // every trusted root, the signing one first; absent: root.crt alone
	caNextCertFile = "next.crt"      // a prepared root, trusted but not yet signing
	caNextKeyFile  = "next.key"      // its key, 0600
	caLedgerFile   = "issued.json"   // per root, the latest NotAfter of a leaf it signed
	caDenyFile     = "denylist.json" // revoked serials and SPIFFE IDs
	caLockFile     = ".lock"         // held while a process changes the files above
)

func (c *CA) loadState() error {
	if b, err := os.ReadFile(filepath.Join(c.dir, caBundleFile)); err == nil {
		roots, err := certpem.ParseCertificates(b)
		if err != nil {
			return fmt.Errorf("pki: %s: %w", caBundleFile, err)
		}
		if !slices.ContainsFunc(roots, c.cert.Equal) {
			return fmt.Errorf("pki: %s does not contain the signing root %s", caBundleFile, caCertFile)
		}
		for _, r := range roots {
			if !r.IsCA {
				return fmt.Errorf("pki: %s: %q is not a CA certificate", caBundleFile, r.Subject)
			}
		}
		c.bundle = roots
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("pki: %w", err)
	}
	if b, err := os.ReadFile(filepath.Join(c.dir, caNextCertFile)); err == nil {
		certs, err := certpem.ParseCertificates(b)
		if err != nil || len(certs) != 1 {
			return fmt.Errorf("pki: %s: want one certificate", caNextCertFile)
		}
		c.next = certs[0]
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("pki: %w", err)
	}
	d, err := readDenylist(c.dir)
	if err != nil {
		return err
	}
	c.denylist = d
	return c.loadIntermediate()
}

func readDenylist(dir string) (*Denylist, error) {
	b, err := os.ReadFile(filepath.Join(dir, caDenyFile))
	if errors.Is(err, os.ErrNotExist) {
		return &Denylist{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	d := &Denylist{}
	if err := json.Unmarshal(b, d); err != nil {
		return nil, fmt.Errorf("pki: %s: %w", caDenyFile, err)
	}
	return d, nil
}

// Bundle returns the roots the CA's workloads must trust: the signing root first, and
// during a rotation the other root too.
func (c *CA) Bundle() []*x509.Certificate { return slices.Clone(c.bundle) }

// Denylist returns the revoked serials and SPIFFE IDs (never nil).
func (c *CA) Denylist() *Denylist {
	if c.denylist == nil {
		return &Denylist{}
	}
	return c.denylist
}

// Dir is the CA's directory.
func (c *CA) Dir() string { return c.dir }

// Stale reports whether another process (veil ca rotate, veil ca revoke) changed the
// CA's files since they were read: then LoadCA gives the current CA.
func (c *CA) Stale() bool { return c.dir != "" && stampOf(c.dir) != c.stamp }

// Sequence identifies the version of the trust material (roots and denylist); it
// grows when they change.
func (c *CA) Sequence() uint64 { return c.seq }

func sequenceOf(dir string) uint64 {
	var seq int64
	for _, f := range []string{caCertFile, caBundleFile, caNextCertFile, caDenyFile, caInterCertFile, caSM2KeyFile} {
		if fi, err := os.Stat(filepath.Join(dir, f)); err == nil {
			seq = max(seq, fi.ModTime().UnixNano())
		}
	}
	return uint64(max(seq, 0))
}

func stampOf(dir string) string {
	var b strings.Builder
	for _, f := range []string{caCertFile, caBundleFile, caNextCertFile, caDenyFile, caInterCertFile, caSM2KeyFile} {
		if fi, err := os.Stat(filepath.Join(dir, f)); err == nil {
			fmt.Fprintf(&b, "%s:%d:%d;", f, fi.Size(), fi.ModTime().UnixNano())
		}
	}
	return b.String()
}

// RotationPhase is where a CA stands in a root rotation. Its zero value, "", is no
// phase: CA.Rotation never reports it.
type RotationPhase string

// The phases of a root rotation, in order (see docs/ca.md).
const (
	RotationNone      RotationPhase = "none"      // one root, signing and trusted
	RotationPrepared  RotationPhase = "prepared"  // a new root is trusted, the old one still signs
	RotationActivated RotationPhase = "activated" // the new root signs, the old one is still trusted
)

// RotationStatus describes a CA's root rotation.
type RotationStatus struct {
	Phase RotationPhase
	// Signing is the root that signs new leaves; Trusted are all roots in the bundle.
	Signing *x509.Certificate
	Trusted []*x509.Certificate
	// RetiringUntil is, in the activated phase, when the last leaf signed by a root
	// that is no longer signing expires: FinishRotation refuses to run before then.
	RetiringUntil time.Time
}

// Rotation reports the CA's rotation phase.
func (c *CA) Rotation() (RotationStatus, error) {
	st := RotationStatus{Phase: RotationNone, Signing: c.cert, Trusted: c.Bundle()}
	switch {
	case c.next != nil:
		st.Phase = RotationPrepared
	case len(c.bundle) > 1:
		st.Phase = RotationActivated
		ledger, err := readLedger(c.dir)
		if err != nil {
			return st, err
		}
		for _, r := range c.bundle {
			if !r.Equal(c.cert) {
				if t := ledger[rootKey(r)]; t.After(st.RetiringUntil) {
					st.RetiringUntil = t
				}
			}
		}
	}
	return st, nil
}

// PrepareRotation is step 1 of a root rotation: it creates a new root in dir and adds
// it to the trust bundle, while the current root keeps signing. Workloads pick up the
// bundle with their next renewal or bundle refresh; then run ActivateRotation.
func PrepareRotation(dir string) (*x509.Certificate, error) {
	ca, unlock, err := loadLocked(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	switch st, _ := ca.Rotation(); st.Phase {
	case RotationPrepared:
		return nil, errors.New("pki: a new root is already prepared: activate it")
	case RotationActivated:
		return nil, errors.New("pki: the previous rotation is not finished: finish it first")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: root key: %w", err)
	}
	cert, _, err := newRoot(ca.td, key, "Veil root CA "+ca.td.Name()+" "+time.Now().UTC().Format("20060102T150405Z"))
	if err != nil {
		return nil, err
	}
	if err := writeKeyPair(dir, caNextKeyFile, caNextCertFile, key, cert); err != nil {
		return nil, err
	}
	if err := prepareSM2(dir, ca); err != nil {
		return nil, err
	}
	if err := atomicfile.Write(filepath.Join(dir, caBundleFile), certpem.EncodeCertificates(append(ca.Bundle(), cert)), 0o644); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	return cert, nil
}

// ActivateRotation is step 2: the prepared root becomes the signing root; the old root
// stays trusted so that leaves it signed keep working until they expire. It can be run
// again after a crash.
func ActivateRotation(dir string) (*x509.Certificate, error) {
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	certPEM, err := os.ReadFile(filepath.Join(dir, caNextCertFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, errors.New("pki: no prepared root: run the prepare step first")
	}
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, caNextKeyFile))
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	certs, err := certpem.ParseCertificates(certPEM)
	if err != nil || len(certs) != 1 {
		return nil, fmt.Errorf("pki: %s: want one certificate", caNextCertFile)
	}
	key, err := certpem.ParsePrivateKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: %s: %w", caNextKeyFile, err)
	}
	if ek, ok := key.(*ecdsa.PrivateKey); !ok || !ek.PublicKey.Equal(certs[0].PublicKey) {
		return nil, fmt.Errorf("pki: %s does not match %s", caNextKeyFile, caNextCertFile)
	}
	bundlePEM, err := os.ReadFile(filepath.Join(dir, caBundleFile))
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	trusted, err := certpem.ParseCertificates(bundlePEM)
	if err != nil || !slices.ContainsFunc(trusted, certs[0].Equal) {
		return nil, fmt.Errorf("pki: %s does not trust the prepared root", caBundleFile)
	}
	// The key first: a crash between the two writes leaves next.* in place, and running
	// this again completes the step.
	if err := atomicfile.Write(filepath.Join(dir, caKeyFile), keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, caCertFile), certPEM, 0o644); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	// The signing root goes first in the bundle.
	ordered := append([]*x509.Certificate{certs[0]}, slices.DeleteFunc(trusted, certs[0].Equal)...)
	if err := atomicfile.Write(filepath.Join(dir, caBundleFile), certpem.EncodeCertificates(ordered), 0o644); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	// An intermediate signed by the old root is replaced by one from the new root.
	if err := renewIntermediate(dir, certs[0], key.(*ecdsa.PrivateKey)); err != nil {
		return nil, err
	}
	// The SM2 key prepared with the root, if any, signs ShangMi credentials from now on.
	if err := activateSM2(dir); err != nil {
		return nil, err
	}
	for _, f := range []string{caNextKeyFile, caNextCertFile} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("pki: %w", err)
		}
	}
	return certs[0], nil
}

// FinishRotation is step 3: it drops every root but the signing one from the bundle.
// It refuses while a leaf signed by a dropped root may still be valid (the ledger of
// issued leaves says until when), unless force is set: dropping a root too early breaks
// every workload that still holds one of its leaves.
func FinishRotation(dir string, now time.Time, force bool) ([]*x509.Certificate, error) {
	ca, unlock, err := loadLocked(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st, err := ca.Rotation()
	if err != nil {
		return nil, err
	}
	switch st.Phase {
	case RotationNone:
		return nil, errors.New("pki: no rotation in progress")
	case RotationPrepared:
		return nil, errors.New("pki: the new root is not signing yet: activate it first")
	}
	if now.Before(st.RetiringUntil) && !force {
		return nil, fmt.Errorf("pki: leaves signed by the old root are valid until %s: finish after that", st.RetiringUntil.UTC().Format(time.RFC3339))
	}
	dropped := slices.DeleteFunc(ca.Bundle(), ca.cert.Equal)
	if err := atomicfile.Write(filepath.Join(dir, caBundleFile), certpem.EncodeCertificates([]*x509.Certificate{ca.cert}), 0o644); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	ledger, err := readLedger(dir)
	if err != nil {
		return nil, err
	}
	for _, r := range dropped {
		delete(ledger, rootKey(r))
	}
	if err := writeLedger(dir, ledger); err != nil {
		return nil, err
	}
	return dropped, nil
}

// Revoke adds serial numbers (hexadecimal) and SPIFFE IDs to the CA's denylist. Workloads
// receive it with the bundle.
func Revoke(dir string, serials, ids []string) (*Denylist, error) {
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	cur, err := readDenylist(dir)
	if err != nil {
		return nil, err
	}
	d, err := cur.With(serials, ids)
	if err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, caDenyFile), append(b, '\n'), 0o644); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	return d, nil
}

// recordIssued notes in the ledger that the signing root vouches for a leaf until its
// NotAfter, so that FinishRotation knows when the root may be dropped.
func (c *CA) recordIssued(leaf *x509.Certificate) error {
	if c.dir == "" {
		return nil
	}
	unlock, err := lockDir(c.dir)
	if err != nil {
		return err
	}
	defer unlock()
	ledger, err := readLedger(c.dir)
	if err != nil {
		return err
	}
	k := rootKey(c.cert)
	if !leaf.NotAfter.After(ledger[k]) {
		return nil
	}
	ledger[k] = leaf.NotAfter.UTC()
	return writeLedger(c.dir, ledger)
}

func rootKey(root *x509.Certificate) string {
	if len(root.SubjectKeyId) > 0 {
		return hex.EncodeToString(root.SubjectKeyId)
	}
	return root.SerialNumber.Text(16)
}

func readLedger(dir string) (map[string]time.Time, error) {
	m := map[string]time.Time{}
	b, err := os.ReadFile(filepath.Join(dir, caLedgerFile))
	if errors.Is(err, os.ErrNotExist) {
		return m, nil
	}
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("pki: %s: %w", caLedgerFile, err)
	}
	return m, nil
}

func writeLedger(dir string, m map[string]time.Time) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, caLedgerFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return nil
}

// loadLocked takes dir's lock and reads the CA under it; the caller must unlock.
func loadLocked(dir string) (ca *CA, unlock func(), err error) {
	if unlock, err = lockDir(dir); err != nil {
		return nil, nil, err
	}
	if ca, err = LoadCA(dir); err != nil {
		unlock()
		return nil, nil, err
	}
	return ca, unlock, nil
}

// writeKeyPair writes a CA key (0600) and then its certificate, each atomically.
func writeKeyPair(dir, keyFile, certFile string, key *ecdsa.PrivateKey, cert *x509.Certificate) error {
	keyPEM, err := certpem.EncodePrivateKey(key)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, keyFile), keyPEM, 0o600); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, certFile), certpem.EncodeCertificates([]*x509.Certificate{cert}), 0o644); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return nil
}

// lockDir takes the CA directory's lock file, so that processes sharing the directory
// (veil ca serve, veil ca token, veil ca rotate) do not lose each other's updates. A
// lock older than staleLock is left over from a crash and is broken.
func lockDir(dir string) (unlock func(), err error) {
	const staleLock = 30 * time.Second
	p := filepath.Join(dir, caLockFile)
	deadline := time.Now().Add(2 * staleLock)
	wait := time.Millisecond
	for {
		f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err == nil {
			_ = f.Close()
			return func() { _ = os.Remove(p) }, nil
		}
		if !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("pki: lock %s: %w", dir, err)
		}
		if fi, err := os.Stat(p); err == nil && time.Since(fi.ModTime()) > staleLock {
			_ = os.Remove(p)
			continue
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("pki: %s is locked by another process", dir)
		}
		time.Sleep(wait)
		wait = min(2*wait, 50*time.Millisecond)
	}
}
