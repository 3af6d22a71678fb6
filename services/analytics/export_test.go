package analytics

import (
	"connectrpc.com/connect"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
)

// SignStudyForTest lets attack tests sign a study with an arbitrary SVID.
var SignStudyForTest = signStudy

// Redirect points a member's client at another server (a restarted one, on a new
// port), keeping the member's secret state.
func (m *Member) Redirect(hc connect.HTTPClient, baseURL string) {
	m.svc = newServiceClient(hc, baseURL, nil)
}

// SmudgingQueries returns the decryptions of its key share the member has released
// in study, which its smudging is sized for.
func (m *Member) SmudgingQueries(study string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.studies[study].queries
}

// Record names of a committee study's stored records, for tests that craft them.
var (
	JoinNameForTest         = joinName
	ShamirNameForTest       = shamirName
	ReleaseShareNameForTest = releaseShareName
	RoundNoiseNameForTest   = roundNoiseName
)

// ShamirInfoForTest is the HPKE info a Shamir share from -> to of study is sealed
// under.
func ShamirInfoForTest(study *analyticsv1.Study, from, to int) []byte {
	return shamirInfo(committeeContext(study), from, to)
}
