package analytics

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"sort"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/gen/veil/analytics/v1/analyticsv1connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
)

func newServiceClient(hc connect.HTTPClient, baseURL string, opts []connect.ClientOption) analyticsv1connect.AnalyticsServiceClient {
	return analyticsv1connect.NewAnalyticsServiceClient(hc, baseURL, append([]connect.ClientOption{connect.WithAcceptCompression("gzip", nil, nil)}, opts...)...)
}

// StudySpec is what an analyst chooses for a study.
type StudySpec struct {
	ID            string   // lowercase letters, digits and dashes
	OwnerPatterns []string // transport.Pattern strings of who may submit
	Dimension     int      // values per record
	Covariance    bool     // owners send all pairwise products (Dimension^2 <= slots)
	// HistogramEdges, when set (2 to 257 strictly increasing values), makes owners
	// also send per-coordinate bin counts (see HistogramCounts).
	HistogramEdges []float64
	// Ranges declares each coordinate's interval (one Range for all coordinates, or
	// one per coordinate); owners clip their values to it. Required.
	Ranges []Range
	// MinOwners is the number of distinct owners a close needs (0: DefaultMinOwners;
	// 1 is refused).
	MinOwners int
	// MaxSubmissionsPerOwner caps each owner's counted submissions (0:
	// DefaultMaxSubmissionsPerOwner).
	MaxSubmissionsPerOwner int
	// Privacy, when set, makes every release differentially private: Laplace noise
	// sized from Ranges, EpsilonPerRelease of the budget each (docs/services.md).
	Privacy *Privacy
}

// Range is a closed interval [Min, Max].
type Range struct{ Min, Max float64 }

// Analyst creates studies and decrypts their results. It holds the secret key.
type Analyst struct {
	svc analyticsv1connect.AnalyticsServiceClient
	key *he.Client
	id  x509svid.Source
}

// NewAnalyst returns an analyst client whose studies use key (he.NewClient with the
// parameters of choice, he.ParamsN13 being plenty for aggregation) and are signed
// with the X.509-SVID of id (the analyst's identity), so that owners can check that
// the key they encrypt under is the analyst's.
func NewAnalyst(hc connect.HTTPClient, baseURL string, key *he.Client, id x509svid.Source, opts ...connect.ClientOption) *Analyst {
	return &Analyst{svc: newServiceClient(hc, baseURL, opts), key: key, id: id}
}

// CreateStudy registers spec with the analyst's public key, signed.
func (a *Analyst) CreateStudy(ctx context.Context, spec StudySpec) error {
	return a.create(ctx, spec, nil)
}

// create registers spec, a committee study when committee is set (its key then is
// the committee's, and the analyst's public key is the reader key results are
// re-encrypted to).
func (a *Analyst) create(ctx context.Context, spec StudySpec, committee *analyticsv1.Committee) error {
	if spec.Dimension < 1 {
		return errors.New("analytics: a study needs a dimension of at least 1")
	}
	if len(spec.Ranges) == 0 {
		return errors.New("analytics: a study needs declared ranges")
	}
	if a.id == nil {
		return errors.New("analytics: the analyst needs an identity to sign its study")
	}
	svid, err := a.id.GetX509SVID()
	if err != nil {
		return fmt.Errorf("analytics: analyst identity: %w", err)
	}
	pk, err := he.MarshalPublicKey(a.key.PublicKey())
	if err != nil {
		return err
	}
	m := &analyticsv1.Study{
		StudyId:       spec.ID,
		Analyst:       svid.ID.String(),
		OwnerPatterns: spec.OwnerPatterns,
		Dimension:     uint32(spec.Dimension),
		Covariance:    spec.Covariance,

		HistogramEdges:         spec.HistogramEdges,
		MinOwners:              uint32(max(spec.MinOwners, 0)),
		MaxSubmissionsPerOwner: uint32(max(spec.MaxSubmissionsPerOwner, 0)),
	}
	for _, r := range spec.Ranges {
		m.Ranges = append(m.Ranges, &analyticsv1.Range{Min: r.Min, Max: r.Max})
	}
	if p := spec.Privacy; p != nil {
		m.Privacy = &analyticsv1.Privacy{Epsilon: p.Epsilon, EpsilonPerRelease: p.EpsilonPerRelease}
	}
	if committee != nil {
		committee.ReaderKey = pk
		m.Committee = committee
	} else {
		m.PublicKey = pk
	}
	if err := signStudy(m, svid); err != nil {
		return err
	}
	res, err := a.svc.CreateStudy(ctx, connect.NewRequest(&analyticsv1.CreateStudyRequest{Study: m}))
	if err != nil {
		return err
	}
	if got := res.Msg.GetStudy().GetAnalyst(); got != svid.ID.String() {
		return fmt.Errorf("analytics: the server recorded the analyst as %s, the caller is %s", got, svid.ID)
	}
	return nil
}

// Closed is the server's answer to a close.
type Closed struct {
	Submissions uint64 // submissions the study counts
	Owners      int    // distinct owners among them
}

// Close ends the study's submissions: it fails (failed_precondition) until owners
// from the study's MinOwners distinct identities have submitted.
func (a *Analyst) Close(ctx context.Context, studyID string) (Closed, error) {
	res, err := a.svc.CloseStudy(ctx, connect.NewRequest(&analyticsv1.CloseStudyRequest{StudyId: studyID}))
	if err != nil {
		return Closed{}, err
	}
	return Closed{Submissions: res.Msg.GetSubmissions(), Owners: int(res.Msg.GetOwners())}, nil
}

// Result is a decrypted study result. Variances and covariances are population
// statistics over all records (divide by Count, not Count-1).
type Result struct {
	Release     uint64 // the service's sequence number for this release
	Submissions uint64
	Count       uint64
	Sum         []float64
	Mean        []float64
	// SecondMoment is E[x_i^2] (length Dimension), or E[x_i x_j] row-major
	// (Dimension^2) for a covariance study.
	SecondMoment []float64
	Variance     []float64
	// Covariance is nil unless the study has covariance.
	Covariance [][]float64
	// Histogram[i][k] counts the records whose coordinate i falls in bin k (decrypted
	// and rounded to the nearest integer); nil unless the study has histogram edges.
	Histogram [][]uint64
	// HistogramMismatch is set when some coordinate's bins do not add up to Count.
	// An honest owner's histogram counts each of its records once per coordinate, so
	// a mismatch means some owner misreported its record count (or sent a histogram
	// that is not of its records): Count, and the mean with it, cannot be trusted.
	// Record counts are self-reported; only a study with histogram edges can be
	// checked this way, and an owner that lies consistently is not detected.
	HistogramMismatch bool
}

// Result fetches and decrypts a closed study's aggregate (each call is a recorded
// release). opts go to he.Client.Decrypt: pass he.WithFlooding(securityBits, queries)
// when the decrypted values will be published to parties that include the server or
// an owner; the noise bound it needs is derived from the study's computation.
//
// The server returns only the encrypted sums (GetResultRequest.sums_only); the mean
// and the second moments are the decrypted sums divided by Count here, in the clear
// (moments), rather than the server's homomorphic product by 1/Count, whose constant
// is rounded at the level's prime (a relative error of about Count/2^41 at N13).
func (a *Analyst) Result(ctx context.Context, studyID string, opts ...he.DecryptOption) (*Result, error) {
	res, err := a.svc.GetResult(ctx, connect.NewRequest(&analyticsv1.GetResultRequest{StudyId: studyID, SumsOnly: true}))
	if err != nil {
		return nil, err
	}
	// The server's computation is known: sums of fresh public-key encryptions. Their
	// noise bound sizes flooding (he.WithFlooding).
	p := a.key.Params()
	sumBound := he.SumNoiseBound(he.FreshNoiseBound(p), int(res.Msg.GetSubmissions()))
	dec := func(m *hev1.EncryptedVector, bound float64) ([]float64, error) {
		v, err := he.UnmarshalVector(p, m)
		if err != nil {
			return nil, err
		}
		return a.key.Decrypt(v, append([]he.DecryptOption{he.WithNoiseBound(bound)}, opts...)...)
	}
	out := &Result{Release: res.Msg.GetRelease(), Submissions: res.Msg.GetSubmissions(), Count: res.Msg.GetCount()}
	if out.Sum, err = dec(res.Msg.GetSum(), sumBound); err != nil {
		return nil, err
	}
	sumProducts, err := dec(res.Msg.GetSumProducts(), sumBound)
	if err != nil {
		return nil, err
	}
	if out.Mean, out.SecondMoment, err = moments(out.Sum, sumProducts, out.Count); err != nil {
		return nil, err
	}
	d := len(out.Mean)
	if m := res.Msg.GetHistogram(); m != nil {
		h, err := dec(m, sumBound)
		if err != nil {
			return nil, err
		}
		if len(h)%d != 0 {
			return nil, fmt.Errorf("analytics: histogram of %d counts for dimension %d", len(h), d)
		}
		nb := len(h) / d
		out.Histogram = make([][]uint64, d)
		for i := range d {
			out.Histogram[i] = make([]uint64, nb)
			var total float64
			for k := range nb {
				out.Histogram[i][k] = uint64(max(0, math.Round(h[i*nb+k])))
				total += math.Round(h[i*nb+k])
			}
			if total != float64(out.Count) {
				out.HistogramMismatch = true
			}
		}
	}
	switch len(out.SecondMoment) {
	case d:
		out.Variance = make([]float64, d)
		for i := range d {
			out.Variance[i] = out.SecondMoment[i] - out.Mean[i]*out.Mean[i]
		}
	case d * d:
		out.Variance = make([]float64, d)
		out.Covariance = make([][]float64, d)
		for i := range d {
			out.Covariance[i] = make([]float64, d)
			for j := range d {
				out.Covariance[i][j] = out.SecondMoment[i*d+j] - out.Mean[i]*out.Mean[j]
			}
			out.Variance[i] = out.Covariance[i][i]
		}
	default:
		return nil, fmt.Errorf("analytics: result has %d second moments for dimension %d", len(out.SecondMoment), d)
	}
	return out, nil
}

// moments returns the mean sum/count and the second moments sumProducts/count,
// computed in the clear from decrypted sums: exact up to the decryption's own error,
// which the division by count shrinks.
func moments(sum, sumProducts []float64, count uint64) (mean, second []float64, err error) {
	if count == 0 {
		return nil, nil, errors.New("analytics: a result of zero records")
	}
	n := float64(count)
	mean = make([]float64, len(sum))
	for i, s := range sum {
		mean[i] = s / n
	}
	second = make([]float64, len(sumProducts))
	for i, s := range sumProducts {
		second[i] = s / n
	}
	return mean, second, nil
}

// Owner submits encrypted contributions to studies. It holds no secret: it encrypts
// under each study's public key, once it has checked that the key is the one a
// trusted analyst signed.
type Owner struct {
	svc      analyticsv1connect.AnalyticsServiceClient
	params   []*he.Parameters
	bundle   x509bundle.Source
	analysts spiffeid.Matcher
}

// NewOwner returns an owner client. It submits only to studies signed by an analyst
// whose X.509-SVID verifies to bundle (the owner's trust bundle) and whose ID analysts
// accepts (for example spiffeid.MatchID of the analyst the owner agreed to work with).
// Studies may use any he.Presets parameters.
func NewOwner(hc connect.HTTPClient, baseURL string, bundle x509bundle.Source, analysts spiffeid.Matcher, opts ...connect.ClientOption) *Owner {
	return &Owner{svc: newServiceClient(hc, baseURL, opts), params: he.Presets(), bundle: bundle, analysts: analysts}
}

// Clip returns a copy of records with every value clipped to its coordinate's range
// (ranges holds one range for all coordinates or one per coordinate), and how many
// values it changed.
func Clip(records [][]float64, ranges []Range) ([][]float64, int) {
	out := make([][]float64, len(records))
	clipped := 0
	for i, x := range records {
		out[i] = make([]float64, len(x))
		for j, v := range x {
			r := ranges[0]
			if len(ranges) > 1 && j < len(ranges) {
				r = ranges[j]
			}
			c := min(max(v, r.Min), r.Max)
			if c != v {
				clipped++
			}
			out[i][j] = c
		}
	}
	return out, clipped
}

// Contribution sums records into what an owner submits: per-coordinate sums and sums
// of squares, or of all pairwise products (row-major) when covariance is set.
func Contribution(records [][]float64, dimension int, covariance bool) (sums, products []float64, err error) {
	if len(records) == 0 {
		return nil, nil, errors.New("analytics: no records")
	}
	sums = make([]float64, dimension)
	if covariance {
		products = make([]float64, dimension*dimension)
	} else {
		products = make([]float64, dimension)
	}
	for r, x := range records {
		if len(x) != dimension {
			return nil, nil, fmt.Errorf("analytics: record %d has %d values, the study %d", r, len(x), dimension)
		}
		for i, v := range x {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				return nil, nil, fmt.Errorf("analytics: record %d value %d is not finite", r, i)
			}
			sums[i] += v
			if !covariance {
				products[i] += v * v
				continue
			}
			for j, w := range x {
				products[i*dimension+j] += v * w
			}
		}
	}
	return sums, products, nil
}

// HistogramCounts returns, coordinate-major, how many records fall in each bin of
// edges per coordinate: bin k is [edges[k], edges[k+1]), values below the first edge
// count in the first bin and values at or above the last edge in the last bin.
func HistogramCounts(records [][]float64, edges []float64) []float64 {
	if len(records) == 0 || len(edges) < 2 {
		return nil
	}
	d, nb := len(records[0]), len(edges)-1
	out := make([]float64, d*nb)
	for _, x := range records {
		for i, v := range x {
			// The first edge above v, minus one, clamped to [0, nb-1].
			k := sort.SearchFloat64s(edges, math.Nextafter(v, math.Inf(1))) - 1
			out[i*nb+min(max(k, 0), nb-1)]++
		}
	}
	return out
}

// Submitted is the service's answer to a submission.
type Submitted struct {
	Duplicate   bool   // counted before (same owner and idempotency key)
	Submissions uint64 // the caller's own submissions counted in the study (never the study's total)
	Clipped     int    // values clipped to the study's declared ranges
}

// Submit fetches the study, verifies the analyst's signature over it (its public key
// included; a failure wraps ErrUntrustedStudy and nothing is sent), clips records to
// the declared ranges, sums them locally, encrypts the sums under the analyst's public
// key and submits them. Retrying with the same idempotencyKey and records counts once.
func (o *Owner) Submit(ctx context.Context, studyID, idempotencyKey string, records [][]float64) (Submitted, error) {
	res, err := o.svc.GetStudy(ctx, connect.NewRequest(&analyticsv1.GetStudyRequest{StudyId: studyID}))
	if err != nil {
		return Submitted{}, err
	}
	study := res.Msg.GetStudy()
	if study.GetStudyId() != studyID {
		return Submitted{}, fmt.Errorf("%w: asked for study %q, got %q", ErrUntrustedStudy, studyID, study.GetStudyId())
	}
	if err := VerifyStudy(study, o.bundle, o.analysts); err != nil {
		return Submitted{}, err
	}
	paramID := study.GetPublicKey().GetParamId()
	if c := study.GetCommittee(); c != nil {
		paramID = c.GetReaderKey().GetParamId()
	}
	if len(study.GetRanges()) == 0 {
		return Submitted{}, fmt.Errorf("analytics: study %q declares no ranges", studyID)
	}
	ranges := make([]Range, len(study.GetRanges()))
	for i, r := range study.GetRanges() {
		ranges[i] = Range{r.GetMin(), r.GetMax()}
	}
	records, clipped := Clip(records, ranges)
	var params *he.Parameters
	for _, p := range o.params {
		if string(p.ID()) == paramID {
			params = p
		}
	}
	if params == nil {
		return Submitted{}, fmt.Errorf("analytics: study %q uses unknown parameters %s", studyID, paramID)
	}
	var pk *he.PublicKey
	if study.GetCommittee() != nil {
		// The owner recomputes the collective key from the members' signed shares
		// and refuses a server that serves any other (the substitution attack).
		cr, err := o.svc.GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: studyID}))
		if err != nil {
			return Submitted{}, err
		}
		cs := cr.Msg.GetStudy()
		if !bytes.Equal(studyStatement(cs), studyStatement(study)) {
			return Submitted{}, fmt.Errorf("%w: the server answered two versions of study %q", ErrUntrustedStudy, studyID)
		}
		if pk, err = VerifyCommittee(params, cs, cr.Msg.GetJoins(), o.bundle); err != nil {
			return Submitted{}, err
		}
	} else if pk, err = he.UnmarshalPublicKey(params, study.GetPublicKey()); err != nil {
		return Submitted{}, err
	}
	enc, err := he.NewEncryptor(pk)
	if err != nil {
		return Submitted{}, err
	}
	sums, products, err := Contribution(records, int(study.GetDimension()), study.GetCovariance())
	if err != nil {
		return Submitted{}, err
	}
	req := &analyticsv1.SubmitRequest{StudyId: studyID, IdempotencyKey: idempotencyKey, Count: uint64(len(records))}
	parts := []struct {
		values []float64
		dst    **hev1.EncryptedVector
	}{{sums, &req.Sums}, {products, &req.Products}}
	if edges := study.GetHistogramEdges(); len(edges) >= 2 {
		parts = append(parts, struct {
			values []float64
			dst    **hev1.EncryptedVector
		}{HistogramCounts(records, edges), &req.Histogram})
	}
	for _, p := range parts {
		v, err := enc.Encrypt(p.values)
		if err != nil {
			return Submitted{}, err
		}
		if *p.dst, err = he.MarshalVector(v); err != nil {
			return Submitted{}, err
		}
	}
	sr, err := o.svc.Submit(ctx, connect.NewRequest(req))
	if err != nil {
		return Submitted{}, err
	}
	return Submitted{Duplicate: sr.Msg.GetDuplicate(), Submissions: sr.Msg.GetSubmissions(), Clipped: clipped}, nil
}
