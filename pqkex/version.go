package pqkex

import (
	"slices"
	"strconv"
	"strings"
)

// Wire versions (spec section 5.5). wireVersion is the version this implementation sends;
// serverVersions are those its server accepts, highest first.
var serverVersions = []uint8{wireVersion}

var (
	wireVersionName      = strconv.Itoa(wireVersion)
	serverVersionsHeader = []string{versionList(serverVersions)}
)

const maxOffers = 8 // the most versions or suites a ClientHello may offer

func versionList(vs []uint8) string {
	s := make([]string, len(vs))
	for i, v := range vs {
		s[i] = strconv.Itoa(int(v))
	}
	return strings.Join(s, ",")
}

// shownVersions is a Veil-Pqkex-Version header as a client's error message shows it: a
// list of at most maxOffers versions (decimal, 1 to 255, comma-separated), else "?". The
// header comes with an unauthenticated refusal (spec 9), so a proxy may have written it:
// nothing else of it reaches the caller.
func shownVersions(h string) string {
	parts := strings.Split(h, ",")
	if len(parts) > maxOffers {
		return "?"
	}
	for _, p := range parts {
		v, err := strconv.Atoi(p)
		if err != nil || v < 1 || v > 255 || strconv.Itoa(v) != p {
			return "?"
		}
	}
	return h
}

// errVersionRefused is the server's refusal of a hello of version v, naming the versions it
// speaks (spec 5.5). Only the version byte of such a hello has been read.
func errVersionRefused(v uint8) *reasonError {
	return newError(reasonVersion, "wire version "+strconv.Itoa(int(v))+" refused: this server speaks "+serverVersionsHeader[0])
}

var errDowngrade = newError(reasonVersion, "downgraded hello: the client offers a higher wire version this server speaks")

// checkOffers checks a ClientHello's offers (spec 5.1, 5.5): the versions include the
// hello's own, the suites the chosen one, neither repeats a value, and no version the client
// offers is one this server speaks above the hello's (a downgrade).
func checkOffers(version uint8, versions []uint8, suites []uint16, suite uint16) error {
	if !distinct(versions) || !distinct(suites) || !slices.Contains(versions, version) {
		return errMalformed
	}
	for _, v := range versions {
		if v > version && slices.Contains(serverVersions, v) {
			return errDowngrade
		}
	}
	if !slices.Contains(suites, suite) {
		return errUnsupported
	}
	return nil
}

func distinct[T comparable](vs []T) bool {
	if len(vs) == 0 || len(vs) > maxOffers {
		return false
	}
	for i, v := range vs {
		if slices.Contains(vs[:i], v) {
			return false
		}
	}
	return true
}

// appendOffers appends the offer lists of a ClientHello.
func appendOffers(b []byte, versions []uint8, suites []uint16) []byte {
	b = appendVec8(b, versions)
	b = append(b, byte(len(suites)))
	for _, s := range suites {
		b = append(b, byte(s>>8), byte(s))
	}
	return b
}

// parseOffers reads the offer lists of a ClientHello.
func (p *parser) offers() (versions []uint8, suites []uint16) {
	versions = p.vec8()
	n := int(p.u8())
	for i := 0; i < n && !p.bad; i++ {
		suites = append(suites, p.u16())
	}
	return versions, suites
}
