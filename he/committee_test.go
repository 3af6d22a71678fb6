package he

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// committeeSetup runs the key generation of a committee of n members, threshold t,
// bound to context: public-key shares aggregated, Shamir shares exchanged.
func committeeSetup(t *testing.T, context string, n, thr int) (*Committee, []*Member, *PublicKey) {
	t.Helper()
	c, err := NewCommittee(ParamsN13(), []byte(context), n, thr)
	if err != nil {
		t.Fatal(err)
	}
	members := make([]*Member, n)
	var shares []*PublicKeyShare
	for i := range members {
		if members[i], err = c.NewMember(i + 1); err != nil {
			t.Fatal(err)
		}
		// Through the wire encoding, as the server receives it.
		b, err := members[i].PublicKeyShare().MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		s, err := c.UnmarshalPublicKeyShare(i+1, b)
		if err != nil {
			t.Fatal(err)
		}
		shares = append(shares, s)
	}
	pk, err := c.PublicKey(shares)
	if err != nil {
		t.Fatal(err)
	}
	if thr < n {
		for _, from := range members {
			for _, to := range members {
				s, err := from.ShamirShareFor(to.Index())
				if err != nil {
					t.Fatal(err)
				}
				if err := to.AddShamirShare(s); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	return c, members, pk
}

func release(t *testing.T, c *Committee, members []*Member, active []int, reader *Client, v *Vector, sigma float64) (*Vector, error) {
	t.Helper()
	var shares []*ReleaseShare
	for _, i := range active {
		s, err := members[i-1].ReleaseShare(active, reader.PublicKey(), v, sigma)
		if err != nil {
			t.Fatal(err)
		}
		b, err := s.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		if s, err = c.UnmarshalReleaseShare(i, active, v, b); err != nil {
			t.Fatal(err)
		}
		shares = append(shares, s)
	}
	return c.Release(v, reader.PublicKey(), shares)
}

// Three members, threshold 2: the collective key encrypts like a single key (within
// CKKS precision), any two members release to the reader, one member alone gets
// nothing, and shares bound to another context do not combine.
func TestCommitteeThreshold(t *testing.T) {
	c, members, pk := committeeSetup(t, "study-a", 3, 2)
	reader, err := NewClient(ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(11, 12))
	want := randValues(r, 100)
	enc, err := NewEncryptor(pk)
	if err != nil {
		t.Fatal(err)
	}
	v, err := enc.Encrypt(want)
	if err != nil {
		t.Fatal(err)
	}
	// The same values under one key, for comparison.
	single, err := NewClient(ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	singleEnc, _ := NewEncryptor(single.PublicKey())
	sv, err := singleEnc.Encrypt(want)
	if err != nil {
		t.Fatal(err)
	}
	singleGot, err := single.Decrypt(sv)
	if err != nil {
		t.Fatal(err)
	}
	singleErr := maxErr(t, singleGot, want)

	// Small smudging first: the collective key matches the single key's precision.
	for _, active := range [][]int{{1, 3}, {2, 3}, {1, 2}} {
		out, err := release(t, c, members, active, reader, v, 1<<10)
		if err != nil {
			t.Fatalf("release by %v: %v", active, err)
		}
		got, err := reader.Decrypt(out)
		if err != nil {
			t.Fatal(err)
		}
		e := maxErr(t, got, want)
		t.Logf("members %v: max error %.3g (single key %.3g)", active, e, singleErr)
		if e > 1e-6 {
			t.Errorf("members %v: error %g", active, e)
		}
	}
	// Smudging sized for 30 bits against one release of a fresh encryption.
	sigma := FloodingSigma(FreshNoiseBound(ParamsN13()), 30, 1)
	out, err := release(t, c, members, []int{1, 3}, reader, v, sigma)
	if err != nil {
		t.Fatal(err)
	}
	got, err := reader.Decrypt(out)
	if err != nil {
		t.Fatal(err)
	}
	bound := 2 * 8 * sigma * math.Sqrt(float64(ParamsN13().N())) / ParamsN13().DefaultScale()
	e := maxErr(t, got, want)
	t.Logf("sized smudging sigma 2^%.1f: max error %.3g (bound %.3g)", math.Log2(sigma), e, bound)
	if e > bound {
		t.Errorf("sized smudging error %g above %g", e, bound)
	}
	// One member alone: refused, and its share is not a decryption.
	s1, err := members[0].ReleaseShare([]int{1, 2}, reader.PublicKey(), v, 1<<10)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Release(v, reader.PublicKey(), []*ReleaseShare{s1}); kindOf(err) != KindPrecondition {
		t.Errorf("release with t-1 shares: %v", err)
	}
	if _, err := members[0].ReleaseShare([]int{1}, reader.PublicKey(), v, 1<<10); kindOf(err) != KindInvalid {
		t.Errorf("release share for a one-member set: %v", err)
	}
	// Two shares made for different active sets do not combine.
	s3, err := members[2].ReleaseShare([]int{2, 3}, reader.PublicKey(), v, 1<<10)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Release(v, reader.PublicKey(), []*ReleaseShare{s1, s3}); kindOf(err) != KindInvalid {
		t.Errorf("shares for different active sets: %v", err)
	}
	// The same member twice.
	if _, err := c.Release(v, reader.PublicKey(), []*ReleaseShare{s1, s1}); kindOf(err) != KindInvalid {
		t.Errorf("one member's share twice: %v", err)
	}

	// A member of another study's committee (another context): its shares are made
	// against another common reference polynomial; the key they form does not decrypt.
	_, membersB, _ := committeeSetup(t, "study-b", 3, 2)
	mixed := []*PublicKeyShare{members[0].PublicKeyShare(), members[1].PublicKeyShare(), membersB[2].PublicKeyShare()}
	badPK, err := c.PublicKey(mixed)
	if err != nil {
		t.Fatal(err)
	}
	badEnc, _ := NewEncryptor(badPK)
	bv, err := badEnc.Encrypt(want)
	if err != nil {
		t.Fatal(err)
	}
	out, err = release(t, c, members, []int{1, 2}, reader, bv, 1<<10)
	if err != nil {
		t.Fatal(err)
	}
	got, err = reader.Decrypt(out)
	if err != nil {
		t.Fatal(err)
	}
	if e := maxErr(t, got, want); e < 1 {
		t.Errorf("a key mixing another study's share decrypted with error %g", e)
	}
	// Malformed and misattributed shares.
	pkShare, _ := members[0].PublicKeyShare().MarshalBinary()
	if _, err := c.UnmarshalPublicKeyShare(4, pkShare); kindOf(err) != KindInvalid {
		t.Errorf("share of member 4 in a committee of 3: %v", err)
	}
	if _, err := c.UnmarshalPublicKeyShare(1, pkShare[:len(pkShare)-1]); kindOf(err) != KindInvalid {
		t.Errorf("truncated share: %v", err)
	}
	if _, err := c.PublicKey(mixed[:2]); kindOf(err) != KindPrecondition {
		t.Errorf("public key from 2 of 3 shares: %v", err)
	}
	if _, err := c.UnmarshalReleaseShare(1, []int{1, 2}, v, []byte{1, 2, 3}); kindOf(err) != KindInvalid {
		t.Errorf("garbage release share: %v", err)
	}
}

// Untrusted committee shares never panic the decoder.
func FuzzCommitteeShares(f *testing.F) {
	c, err := NewCommittee(ParamsN13(), []byte("fuzz"), 3, 2)
	if err != nil {
		f.Fatal(err)
	}
	m, err := c.NewMember(1)
	if err != nil {
		f.Fatal(err)
	}
	good, _ := m.PublicKeyShare().MarshalBinary()
	f.Add(good[:64], uint8(1))
	sh, err := m.ShamirShareFor(2)
	if err != nil {
		f.Fatal(err)
	}
	shb, _ := sh.MarshalBinary()
	f.Add(shb[:64], uint8(1))
	f.Add([]byte{}, uint8(0))
	client, err := NewClient(ParamsN13())
	if err != nil {
		f.Fatal(err)
	}
	v, err := client.Encrypt([]float64{1})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, b []byte, member uint8) {
		_, _ = c.UnmarshalPublicKeyShare(int(member), b)
		_, _ = c.UnmarshalReleaseShare(int(member), []int{1, 2}, v, b)
		_, _ = c.UnmarshalShamirShare(int(member), 2, b)
	})
}

// BenchmarkCommittee measures a committee of n members, threshold 2, at N13: per
// member, its public-key share and its n Shamir shares (setup) and its release share
// of one ciphertext; the server's aggregation of the public key and its combination of
// the release; and the bytes a member sends.
func BenchmarkCommittee(b *testing.B) {
	for _, n := range []int{3, 5} {
		c, err := NewCommittee(ParamsN13(), []byte("bench"), n, 2)
		if err != nil {
			b.Fatal(err)
		}
		members := make([]*Member, n)
		var shares []*PublicKeyShare
		for i := range members {
			members[i], _ = c.NewMember(i + 1)
			shares = append(shares, members[i].PublicKeyShare())
		}
		for _, from := range members {
			for _, to := range members {
				s, _ := from.ShamirShareFor(to.Index())
				if err := to.AddShamirShare(s); err != nil {
					b.Fatal(err)
				}
			}
		}
		pk, err := c.PublicKey(shares)
		if err != nil {
			b.Fatal(err)
		}
		reader, _ := NewClient(ParamsN13())
		enc, _ := NewEncryptor(pk)
		v, _ := enc.Encrypt([]float64{1, 2, 3})
		sigma := FloodingSigma(FreshNoiseBound(ParamsN13()), 30, 1)
		pkBytes, _ := shares[0].MarshalBinary()
		b.Run(fmt.Sprintf("n=%d/member-setup", n), func(b *testing.B) {
			for b.Loop() {
				members[0].PublicKeyShare()
				for j := 1; j <= n; j++ {
					if _, err := members[0].ShamirShareFor(j); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(len(pkBytes)), "pkshare-bytes")
		})
		b.Run(fmt.Sprintf("n=%d/server-public-key", n), func(b *testing.B) {
			for b.Loop() {
				if _, err := c.PublicKey(shares); err != nil {
					b.Fatal(err)
				}
			}
		})
		var rel []*ReleaseShare
		b.Run(fmt.Sprintf("n=%d/member-release", n), func(b *testing.B) {
			for b.Loop() {
				rs, err := members[0].ReleaseShare([]int{1, 2}, reader.PublicKey(), v, sigma)
				if err != nil {
					b.Fatal(err)
				}
				rb, _ := rs.MarshalBinary()
				b.ReportMetric(float64(len(rb)), "share-bytes")
			}
		})
		for _, i := range []int{0, 1} {
			rs, err := members[i].ReleaseShare([]int{1, 2}, reader.PublicKey(), v, sigma)
			if err != nil {
				b.Fatal(err)
			}
			rel = append(rel, rs)
		}
		b.Run(fmt.Sprintf("n=%d/server-combine", n), func(b *testing.B) {
			for b.Loop() {
				if _, err := c.Release(v, reader.PublicKey(), rel); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestShamirShareEncoding: a Shamir share survives its encoding (what members seal to
// each other), and a truncated or misaddressed one is refused.
func TestShamirShareEncoding(t *testing.T) {
	c, err := NewCommittee(ParamsN13(), []byte("encoding"), 3, 2)
	if err != nil {
		t.Fatal(err)
	}
	m1, err := c.NewMember(1)
	if err != nil {
		t.Fatal(err)
	}
	m2, err := c.NewMember(2)
	if err != nil {
		t.Fatal(err)
	}
	sh, err := m1.ShamirShareFor(2)
	if err != nil {
		t.Fatal(err)
	}
	b, err := sh.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.UnmarshalShamirShare(1, 2, b)
	if err != nil {
		t.Fatal(err)
	}
	if err := m2.AddShamirShare(got); err != nil {
		t.Fatal(err)
	}
	if _, err := c.UnmarshalShamirShare(1, 2, b[:len(b)-1]); kindOf(err) != KindInvalid {
		t.Errorf("truncated: %v", err)
	}
	if _, err := c.UnmarshalShamirShare(1, 4, b); kindOf(err) != KindInvalid {
		t.Errorf("to a member outside the committee: %v", err)
	}
	again, err := c.UnmarshalShamirShare(1, 2, b)
	if err != nil {
		t.Fatal(err)
	}
	if err := m2.AddShamirShare(again); kindOf(err) != KindInvalid {
		t.Errorf("the same sender twice: %v", err)
	}
	full, err := NewCommittee(ParamsN13(), []byte("encoding"), 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := full.UnmarshalShamirShare(1, 2, b); kindOf(err) != KindPrecondition {
		t.Errorf("n-of-n committee: %v", err)
	}
}

// A member that sees the others' public-key shares before it fixes its own (a rogue
// key): it sends its own share minus theirs, and the collective key becomes its own
// key, which it decrypts alone. The he layer cannot tell such a share from an honest
// one (it is well formed and reduced): the protocol must fix every share before any is
// revealed (services/analytics serves no join before every member has joined).
func TestCommitteeRogueKeyShare(t *testing.T) {
	c, err := NewCommittee(ParamsN13(), []byte("rogue"), 3, 2)
	if err != nil {
		t.Fatal(err)
	}
	var shares []*PublicKeyShare
	members := make([]*Member, 3)
	for i := range members {
		if members[i], err = c.NewMember(i + 1); err != nil {
			t.Fatal(err)
		}
	}
	for _, m := range members[:2] {
		shares = append(shares, m.PublicKeyShare())
	}
	// Member 3, last to join, having read shares 1 and 2.
	rq := c.params.p.RingQP()
	own := members[2].PublicKeyShare()
	rogue := c.ckg.AllocateShare()
	rq.Sub(own.share.Value, shares[0].share.Value, rogue.Value)
	rq.Sub(rogue.Value, shares[1].share.Value, rogue.Value)
	b, err := rogue.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	decoded, err := c.UnmarshalPublicKeyShare(3, b)
	if err != nil {
		t.Fatalf("the rogue share is well formed, yet refused: %v", err)
	}
	pk, err := c.PublicKey(append(shares, decoded))
	if err != nil {
		t.Fatal(err)
	}
	enc, err := NewEncryptor(pk)
	if err != nil {
		t.Fatal(err)
	}
	want := []float64{3.25, -7.5, 42}
	v, err := enc.Encrypt(want)
	if err != nil {
		t.Fatal(err)
	}
	// Member 3 alone decrypts with its own secret.
	alone := newClient(c.params, members[2].sk, pk.pk)
	got, err := alone.Decrypt(v)
	if err != nil {
		t.Fatal(err)
	}
	if e := maxErr(t, got, want); e > 1e-6 {
		t.Fatalf("the rogue key did not decrypt (error %g): the attack no longer works", e)
	}
}
