package main

import (
	"context"
	"crypto/hpke"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"time"

	"github.com/veilrpc/veil/he"
)

// The committee figures of `bench he` (issue 17): a t-of-n committee study's setup
// (per member: CPU and bytes sent: its public-key share, and its Shamir shares sealed
// with HPKE to the others) and release (per member: the public-key-switching shares
// of the sums and sums of squares; combined: the server's combination; the reader's
// decryption), for n = 3 and n = 5 with t = n/2+1, against a single-key study on the
// same statistics (key generation; decryption by the analyst), and the precision of
// the released mean and variance against plaintext. In process, without RPC: the
// figures are the cryptography's.

const (
	committeeOwners = 3
	committeeDim    = 8
	committeeRecs   = 200
	smudgingBits    = 30 // analytics.SmudgingSecurityBits
)

// committeeData is the study's records per owner, and the plaintext statistics.
type committeeData struct {
	sums, squares [][]float64 // per owner
	count         int
	mean, vari    []float64
}

func newCommitteeData() *committeeData {
	r := rand.New(rand.NewPCG(17, 3))
	d := &committeeData{mean: make([]float64, committeeDim), vari: make([]float64, committeeDim)}
	tot, tot2 := make([]float64, committeeDim), make([]float64, committeeDim)
	for range committeeOwners {
		s, q := make([]float64, committeeDim), make([]float64, committeeDim)
		for range committeeRecs {
			for j := range committeeDim {
				x := 50 + 10*float64(j) + 15*r.NormFloat64()
				s[j] += x
				q[j] += x * x
			}
		}
		for j := range committeeDim {
			tot[j] += s[j]
			tot2[j] += q[j]
		}
		d.sums, d.squares = append(d.sums, s), append(d.squares, q)
		d.count += committeeRecs
	}
	for j := range committeeDim {
		d.mean[j] = tot[j] / float64(d.count)
		d.vari[j] = tot2[j]/float64(d.count) - d.mean[j]*d.mean[j]
	}
	return d
}

// aggregate encrypts each owner's sums and squares under pk and adds them up.
func (d *committeeData) aggregate(params *he.Parameters, pk *he.PublicKey) (sum, sq *he.Vector, err error) {
	enc, err := he.NewEncryptor(pk)
	if err != nil {
		return nil, nil, err
	}
	ev, err := he.NewEvaluator(params, nil)
	if err != nil {
		return nil, nil, err
	}
	for i := range d.sums {
		a, err := enc.Encrypt(d.sums[i])
		if err != nil {
			return nil, nil, err
		}
		b, err := enc.Encrypt(d.squares[i])
		if err != nil {
			return nil, nil, err
		}
		if sum == nil {
			sum, sq = a, b
			continue
		}
		if sum, err = ev.Add(context.Background(), sum, a); err != nil {
			return nil, nil, err
		}
		if sq, err = ev.Add(context.Background(), sq, b); err != nil {
			return nil, nil, err
		}
	}
	return sum, sq, nil
}

// errors returns the largest |mean error| and |variance error| of decrypted sums.
func (d *committeeData) errors(sum, sq []float64) (float64, float64) {
	var em, ev float64
	for j := range committeeDim {
		m := sum[j] / float64(d.count)
		v := sq[j]/float64(d.count) - m*m
		em, ev = max(em, math.Abs(m-d.mean[j])), max(ev, math.Abs(v-d.vari[j]))
	}
	return em, ev
}

func cpuOf(f func() error) (time.Duration, error) {
	runtime.GC()
	c0 := cpuTime()
	err := f()
	return cpuTime() - c0, err
}

// committeeRound runs one setup and release of a t-of-n committee and records its
// figures in sys.
func committeeRound(params *he.Parameters, d *committeeData, n, t int, sys *System) error {
	c, err := he.NewCommittee(params, []byte("bench committee"), n, t)
	if err != nil {
		return err
	}
	reader, err := he.NewClient(params)
	if err != nil {
		return err
	}
	members := make([]*he.Member, n)
	hpkeKeys := make([]hpke.PrivateKey, n)
	shares := make([]*he.PublicKeyShare, n)
	var setupCPU time.Duration
	var sent int
	// Setup, round 1: key share, HPKE key, public-key share.
	for i := range n {
		cpu, err := cpuOf(func() error {
			var err error
			if members[i], err = c.NewMember(i + 1); err != nil {
				return err
			}
			if hpkeKeys[i], err = hpke.MLKEM768X25519().GenerateKey(); err != nil {
				return err
			}
			shares[i] = members[i].PublicKeyShare()
			b, err := shares[i].MarshalBinary()
			sent += len(b) + len(hpkeKeys[i].PublicKey().Bytes())
			return err
		})
		if err != nil {
			return err
		}
		setupCPU += cpu
	}
	// Round 2: Shamir shares sealed to each other member; each opens and adds its own.
	sealed := map[[2]int][2][]byte{}
	for i := range n {
		if t == n {
			break
		}
		cpu, err := cpuOf(func() error {
			for j := range n {
				sh, err := members[i].ShamirShareFor(j + 1)
				if err != nil {
					return err
				}
				if j == i {
					if err := members[i].AddShamirShare(sh); err != nil {
						return err
					}
					continue
				}
				b, err := sh.MarshalBinary()
				if err != nil {
					return err
				}
				enc, s, err := hpke.NewSender(hpkeKeys[j].PublicKey(), hpke.HKDFSHA256(), hpke.AES256GCM(), nil)
				if err != nil {
					return err
				}
				ct, err := s.Seal(nil, b)
				if err != nil {
					return err
				}
				sealed[[2]int{i, j}] = [2][]byte{enc, ct}
				sent += len(enc) + len(ct)
			}
			return nil
		})
		if err != nil {
			return err
		}
		setupCPU += cpu
	}
	for j := range n {
		if t == n {
			break
		}
		cpu, err := cpuOf(func() error {
			for i := range n {
				if i == j {
					continue
				}
				m := sealed[[2]int{i, j}]
				r, err := hpke.NewRecipient(m[0], hpkeKeys[j], hpke.HKDFSHA256(), hpke.AES256GCM(), nil)
				if err != nil {
					return err
				}
				b, err := r.Open(nil, m[1])
				if err != nil {
					return err
				}
				sh, err := c.UnmarshalShamirShare(i+1, j+1, b)
				if err != nil {
					return err
				}
				if err := members[j].AddShamirShare(sh); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		setupCPU += cpu
	}
	var pk *he.PublicKey
	combineKey, err := cpuOf(func() error { pk, err = c.PublicKey(shares); return err })
	if err != nil {
		return err
	}
	sys.add("setup_cpu_ms_per_member", ms(setupCPU)/float64(n))
	sys.add("setup_bytes_sent_per_member", float64(sent)/float64(n))
	sys.add("collective_key_ms", ms(combineKey))

	sum, sq, err := d.aggregate(params, pk)
	if err != nil {
		return err
	}
	// Release by the first t members.
	active := make([]int, t)
	for i := range t {
		active[i] = i + 1
	}
	sigma := he.FloodingSigma(he.SumNoiseBound(he.FreshNoiseBound(params), committeeOwners), smudgingBits, 1)
	var rsSum, rsSq []*he.ReleaseShare
	var relCPU time.Duration
	var relBytes int
	for i := range t {
		cpu, err := cpuOf(func() error {
			a, err := members[i].ReleaseShare(active, reader.PublicKey(), sum, sigma)
			if err != nil {
				return err
			}
			b, err := members[i].ReleaseShare(active, reader.PublicKey(), sq, sigma)
			if err != nil {
				return err
			}
			ab, err := a.MarshalBinary()
			if err != nil {
				return err
			}
			bb, err := b.MarshalBinary()
			relBytes += len(ab) + len(bb)
			rsSum, rsSq = append(rsSum, a), append(rsSq, b)
			return err
		})
		if err != nil {
			return err
		}
		relCPU += cpu
	}
	var outSum, outSq *he.Vector
	combine, err := cpuOf(func() error {
		var err error
		if outSum, err = c.Release(sum, reader.PublicKey(), rsSum); err != nil {
			return err
		}
		outSq, err = c.Release(sq, reader.PublicKey(), rsSq)
		return err
	})
	if err != nil {
		return err
	}
	var gotSum, gotSq []float64
	decrypt, err := cpuOf(func() error {
		var err error
		if gotSum, err = reader.Decrypt(outSum); err != nil {
			return err
		}
		gotSq, err = reader.Decrypt(outSq)
		return err
	})
	if err != nil {
		return err
	}
	em, ev := d.errors(gotSum, gotSq)
	sys.add("release_cpu_ms_per_member", ms(relCPU)/float64(t))
	sys.add("release_bytes_per_member", float64(relBytes)/float64(t))
	sys.add("release_combine_ms", ms(combine))
	sys.add("reader_decrypt_ms", ms(decrypt))
	sys.add("mean_abs_error", em)
	sys.add("variance_abs_error", ev)
	return nil
}

// singleKeyRound is the single-key study on the same statistics.
func singleKeyRound(params *he.Parameters, d *committeeData, sys *System) error {
	var key *he.Client
	keygen, err := cpuOf(func() error { var err error; key, err = he.NewClient(params); return err })
	if err != nil {
		return err
	}
	pkMsg, err := he.MarshalPublicKey(key.PublicKey())
	if err != nil {
		return err
	}
	sum, sq, err := d.aggregate(params, key.PublicKey())
	if err != nil {
		return err
	}
	var gotSum, gotSq []float64
	decrypt, err := cpuOf(func() error {
		var err error
		if gotSum, err = key.Decrypt(sum); err != nil {
			return err
		}
		gotSq, err = key.Decrypt(sq)
		return err
	})
	if err != nil {
		return err
	}
	em, ev := d.errors(gotSum, gotSq)
	sys.add("setup_cpu_ms", ms(keygen))
	sys.add("setup_bytes_sent", float64(len(pkMsg.GetA())+len(pkMsg.GetB())))
	sys.add("reader_decrypt_ms", ms(decrypt))
	sys.add("mean_abs_error", em)
	sys.add("variance_abs_error", ev)
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// heCommittee adds the committee systems and ratios to the he report (N13).
func heCommittee(cfg *config, rep *Report) error {
	params := he.ParamsN13()
	d := newCommitteeData()
	single := newSystem("single_key_n13", "single-key study (analyst's key), same statistics, n13")
	systems := []*System{single}
	sizes := []int{3, 5}
	for _, n := range sizes {
		systems = append(systems, newSystem(fmt.Sprintf("committee_%d_of_%d_n13", n/2+1, n), fmt.Sprintf("committee study, t = %d of n = %d, n13", n/2+1, n)))
	}
	for range max(cfg.reps, 1) {
		if err := singleKeyRound(params, d, single); err != nil {
			return fmt.Errorf("single key: %w", err)
		}
		for i, n := range sizes {
			if err := committeeRound(params, d, n, n/2+1, systems[i+1]); err != nil {
				return fmt.Errorf("committee of %d: %w", n, err)
			}
		}
	}
	rep.Systems = append(rep.Systems, systems...)
	for _, s := range systems[1:] {
		rep.ratio(s.Name+"_setup_cpu_per_member_vs_single_keygen", s, "setup_cpu_ms_per_member", single, "setup_cpu_ms")
		rep.ratio(s.Name+"_setup_bytes_per_member_vs_single_public_key", s, "setup_bytes_sent_per_member", single, "setup_bytes_sent")
		rep.ratio(s.Name+"_release_cpu_per_member_vs_single_decrypt", s, "release_cpu_ms_per_member", single, "reader_decrypt_ms")
	}
	rep.Config["committee"] = fmt.Sprintf("%d owners x %d records of %d values; sums and sums of squares; smudging for %d bits, one release; HPKE ML-KEM-768+X25519 for Shamir shares; in process (no RPC)",
		committeeOwners, committeeRecs, committeeDim, smudgingBits)
	return nil
}
