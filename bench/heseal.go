package main

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"time"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/he/hefloat"

	"github.com/veilrpc/veil/he"
)

// sealReference holds Microsoft SEAL 4.1.2's figures and lattigo's, measured
// interleaved in one run on this machine kind (docs/he.md, "Reference measurements",
// says how): SEAL is not built here, so he is compared with SEAL through lattigo,
// measured again in this run: he_vs_seal = (he / lattigo, this run) x (lattigo / SEAL,
// reference). Ratios hold across runs where absolute times do not.
var sealReference = map[string]struct{ decryptLattigo, decryptSEAL, relinLattigo, relinSEAL float64 }{
	"n13": {decryptLattigo: 3.14, decryptSEAL: 0.70, relinLattigo: 5.88, relinSEAL: 3.63},
	"n14": {decryptLattigo: 10.7, decryptSEAL: 5.15, relinLattigo: 59.7, relinSEAL: 31.6},
}

// heVersusSEAL measures, interleaved, the two operations where lattigo trails SEAL:
// decrypt+decode (lattigo at full level; he dropping to level 0 first, as the values'
// bound allows) and relinearization-key generation (lattigo; he, rows in parallel).
func heVersusSEAL(cfg *config, rep *Report, name string, params *he.Parameters) error {
	ref, ok := sealReference[name]
	if !ok {
		return nil
	}
	lit := params.Literal()
	p, err := hefloat.NewParametersFromLiteral(hefloat.ParametersLiteral{LogN: lit.LogN, LogQ: lit.LogQ, LogP: lit.LogP, LogDefaultScale: lit.LogDefaultScale})
	if err != nil {
		return err
	}
	kg := rlwe.NewKeyGenerator(p)
	sk, pk := kg.GenKeyPairNew()
	enc, dec, ecd := rlwe.NewEncryptor(p, pk), rlwe.NewDecryptor(p, sk), hefloat.NewEncoder(p)
	values := make([]float64, p.MaxSlots())
	for i := range values {
		values[i] = 2*rand.Float64() - 1
	}
	pt := hefloat.NewPlaintext(p, p.MaxLevel())
	if err := ecd.Encode(values, pt); err != nil {
		return err
	}
	ct, err := enc.EncryptNew(pt)
	if err != nil {
		return err
	}
	client, err := he.NewClient(params)
	if err != nil {
		return err
	}
	vec, err := client.Encrypt(values)
	if err != nil {
		return err
	}
	relinOnly := he.NewManifest(params, he.NeedRelinearization())
	out := make([]float64, p.MaxSlots())

	lattigo := newSystem("lattigo_ops_"+name, "lattigo decrypt+decode (full level) and relinearization-key generation, "+name)
	veil := newSystem("he_ops_"+name, "he decrypt+decode (to level 0 first: WithMaxAbs) and relinearization-key generation (parallel rows), "+name)
	timeMS := func(f func() error) (float64, error) {
		runtime.GC()
		t0 := time.Now()
		err := f()
		return float64(time.Since(t0).Microseconds()) / 1000, err
	}
	for range cfg.reps {
		d, err := timeMS(func() error { return ecd.Decode(dec.DecryptNew(ct), out) })
		if err != nil {
			return err
		}
		lattigo.add("decrypt_ms", d)
		d, err = timeMS(func() error { _, err := client.Decrypt(vec, he.WithMaxAbs(1)); return err })
		if err != nil {
			return err
		}
		veil.add("decrypt_ms", d)
		d, _ = timeMS(func() error { kg.GenRelinearizationKeyNew(sk); return nil })
		lattigo.add("relin_keygen_ms", d)
		d, err = timeMS(func() error { _, err := client.GenEvaluationKeys(relinOnly); return err })
		if err != nil {
			return err
		}
		veil.add("relin_keygen_ms", d)
	}
	rep.Systems = append(rep.Systems, lattigo, veil)
	suffix := "_" + name
	rep.ratio("he_vs_lattigo_decrypt"+suffix, veil, "decrypt_ms", lattigo, "decrypt_ms")
	rep.ratio("he_vs_lattigo_relin_keygen"+suffix, veil, "relin_keygen_ms", lattigo, "relin_keygen_ms")
	decRatio, kgen := rep.Ratios["he_vs_lattigo_decrypt"+suffix], rep.Ratios["he_vs_lattigo_relin_keygen"+suffix]
	rep.Ratios["he_vs_seal_decrypt"+suffix] = round(decRatio * ref.decryptLattigo / ref.decryptSEAL)
	rep.Ratios["he_vs_seal_relin_keygen"+suffix] = round(kgen * ref.relinLattigo / ref.relinSEAL)
	rep.Notes = append(rep.Notes, fmt.Sprintf("%s: he vs SEAL = (he/lattigo measured here) x (lattigo/SEAL from docs/he.md, Reference measurements: decrypt+decode %.2f/%.2f ms, relinearization key %.2f/%.2f ms); SEAL is not built on these machines",
		name, ref.decryptLattigo, ref.decryptSEAL, ref.relinLattigo, ref.relinSEAL))
	return nil
}
