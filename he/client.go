package he

import (
	"bytes"
	"math"
	"math/big"
	"sync"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/he/hefloat"
	"github.com/tuneinsight/lattigo/v5/ring"
	"github.com/tuneinsight/lattigo/v5/utils/sampling"
)

// Client holds a secret key: it encrypts, decrypts and generates evaluation keys.
// It is safe for concurrent use.
type Client struct {
	params *Parameters
	sk     *SecretKey
	pk     *PublicKey
	pool   sync.Pool // *clientWorker
}

type clientWorker struct {
	enc *hefloat.Encoder
	skE *rlwe.Encryptor
	dec *rlwe.Decryptor
	pt  *rlwe.Plaintext // encoding scratch: the ciphertext does not keep it
}

// NewClient generates a fresh secret and public key for params.
func NewClient(params *Parameters) (c *Client, err error) {
	defer recoverInto(&err, "key generation")
	if params == nil {
		return nil, invalidf("nil parameters")
	}
	kgen := rlwe.NewKeyGenerator(params.p)
	sk, pk := kgen.GenKeyPairNew()
	return newClient(params, sk, pk), nil
}

func newClient(params *Parameters, sk *rlwe.SecretKey, pk *rlwe.PublicKey) *Client {
	c := &Client{params: params, sk: &SecretKey{params, sk}, pk: newPublicKey(params, pk)}
	c.pool.New = func() any {
		return &clientWorker{
			enc: hefloat.NewEncoder(hefloat.Parameters{Parameters: params.p}),
			skE: rlwe.NewEncryptor(params.p, sk),
			dec: rlwe.NewDecryptor(params.p, sk),
			pt:  hefloat.NewPlaintext(hefloat.Parameters{Parameters: params.p}, params.MaxLevel()),
		}
	}
	return c
}

// Params returns the client's parameters.
func (c *Client) Params() *Parameters { return c.params }

// PublicKey returns the public key, for data owners who encrypt without the secret key.
func (c *Client) PublicKey() *PublicKey { return c.pk }

// SecretKey returns the secret key. It cannot be serialized (see SecretKey).
func (c *Client) SecretKey() *SecretKey { return c.sk }

// Encrypt packs values into as many ciphertexts as they need (zero-padded) and
// encrypts them under the secret key. The ciphertexts are seeded: their c1 is
// regenerated from a 32-byte PRNG key, so on the wire each is about half the size of
// a public-key ciphertext.
func (c *Client) Encrypt(values []float64) (*Vector, error) {
	w := c.pool.Get().(*clientWorker)
	defer c.pool.Put(w)
	v, err := encryptValues(c.params, c.pk.fp, w.enc, w.pt, values, func(pt *rlwe.Plaintext, ct *rlwe.Ciphertext) ([]byte, error) {
		seed, err := newSeed()
		if err != nil {
			return nil, err
		}
		return seed, w.skE.WithPRNG(seededPRNG(ciphertextSeedKey(c.params, seed, ciphertextEncoding))).Encrypt(pt, ct)
	})
	if v != nil {
		v.noise = freshNoise(c.params, false)
	}
	return v, err
}

// encryptValues packs values into ciphertexts and encrypts each with encrypt, which
// returns the ciphertext's seed when it is seeded. pt is the worker's scratch
// plaintext at the maximum level.
func encryptValues(params *Parameters, fp []byte, enc *hefloat.Encoder, pt *rlwe.Plaintext, values []float64, encrypt func(*rlwe.Plaintext, *rlwe.Ciphertext) ([]byte, error)) (v *Vector, err error) {
	defer recoverInto(&err, "encrypt")
	if err := checkValues(values); err != nil {
		return nil, err
	}
	n := ciphertextsFor(len(values), params.Slots())
	v = &Vector{params: params, length: len(values), cts: make([]*rlwe.Ciphertext, n), seeds: make([][]byte, n), fp: fp}
	for i := range n {
		if err := encodeChunk(params, enc, pt, values, i); err != nil {
			return nil, err
		}
		ct := rlwe.NewCiphertext(params.p, 1, pt.Level())
		seed, err := encrypt(pt, ct)
		if err != nil {
			return nil, internalf("encrypt")
		}
		v.cts[i], v.seeds[i] = ct, seed
	}
	if v.seeds[0] == nil {
		v.seeds = nil
	}
	return v, nil
}

func checkValues(values []float64) error {
	if len(values) == 0 {
		return invalidf("empty vector")
	}
	if len(values) > maxVectorLength {
		return invalidf("vector of %d values exceeds %d", len(values), maxVectorLength)
	}
	for i, x := range values {
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return invalidf("value %d is not finite", i)
		}
	}
	return nil
}

// encodeChunk encodes ciphertext i's values into pt (lattigo zero-pads a short slice).
func encodeChunk(params *Parameters, enc *hefloat.Encoder, pt *rlwe.Plaintext, values []float64, i int) error {
	slots := params.Slots()
	if err := enc.Encode(values[i*slots:min(len(values), (i+1)*slots)], pt); err != nil {
		return invalidf("encode: values too large for the scale")
	}
	return nil
}

// DecryptOption configures Client.Decrypt.
type DecryptOption interface{ applyDecrypt(*decryptConfig) }

type decryptConfig struct {
	maxAbs       float64
	floodSec     int
	floodQueries int
	noiseBound   float64
}

type decryptOptionFunc func(*decryptConfig)

func (f decryptOptionFunc) applyDecrypt(c *decryptConfig) { f(c) }

// WithMaxAbs declares that every value of the vector has magnitude below maxAbs.
// Decrypt then drops each ciphertext to the lowest level whose modulus still holds
// maxAbs * scale with a 16x margin before decrypting: at level 0 decoding needs no
// multi-precision arithmetic and costs a fraction of a full-level decode. A wrong
// bound gives wrong results, so declare it only when it is known (for inputs in
// [-1,1] and the presets, anything up to Parameters.LevelZeroMaxAbs decodes at level 0).
func WithMaxAbs(maxAbs float64) DecryptOption {
	return decryptOptionFunc(func(c *decryptConfig) { c.maxAbs = maxAbs })
}

// Decrypt decrypts v and returns its Len values.
func (c *Client) Decrypt(v *Vector, opts ...DecryptOption) (out []float64, err error) {
	defer recoverInto(&err, "decrypt")
	if v == nil || len(v.cts) == 0 {
		return nil, invalidf("nil vector")
	}
	if v.params.id != c.params.id {
		return nil, paramMismatch("vector", v.params.id, c.params.id)
	}
	if len(v.fp) != 0 && !bytes.Equal(v.fp, c.pk.fp) {
		return nil, preconditionf("vector encrypted under key %x, not this client's %x", v.fp, c.pk.fp)
	}
	var cfg decryptConfig
	for _, o := range opts {
		o.applyDecrypt(&cfg)
	}
	sigma, err := cfg.floodingSigma(v)
	if err != nil {
		return nil, err
	}
	w := c.pool.Get().(*clientWorker)
	defer c.pool.Put(w)
	slots := c.params.Slots()
	out = make([]float64, 0, v.length)
	buf := make([]float64, slots)
	for i, ct := range v.cts {
		level := ct.Level()
		if cfg.maxAbs > 0 {
			level = min(level, c.params.decryptLevel(cfg.maxAbs, sigma, &ct.Scale))
		}
		if sigma > 0 && !c.params.floodFits(level, sigma) {
			return nil, preconditionf("flooding of sigma 2^%.1f does not fit the modulus of level %d (2^%d)", math.Log2(sigma), level, c.params.p.LogQLvl(level))
		}
		pt := hefloat.NewPlaintext(hefloat.Parameters{Parameters: c.params.p}, level)
		w.dec.Decrypt(ct, pt)
		if sigma > 0 {
			if err := flood(c.params, pt, sigma); err != nil {
				return nil, err
			}
		}
		if err := w.enc.Decode(pt, buf); err != nil {
			return nil, internalf("decode")
		}
		out = append(out, buf[:v.validSlots(i)]...)
	}
	return out, nil
}

// decryptLevel returns the lowest level whose modulus holds
// 2 * 16 * (maxAbs * scale + noiseTail * sigma), sigma being the flooding's.
func (p *Parameters) decryptLevel(maxAbs, sigma float64, scale *rlwe.Scale) int {
	need := new(big.Float).Mul(&scale.Value, big.NewFloat(maxAbs))
	need.Add(need, big.NewFloat(noiseTail*sigma))
	need.Mul(need, big.NewFloat(2*16))
	needInt, _ := need.Int(nil)
	for l := 0; l <= p.MaxLevel(); l++ {
		if p.p.QLvl(l).Cmp(needInt) > 0 {
			return l
		}
	}
	return p.MaxLevel()
}

// floodFits reports whether flooding of standard deviation sigma, cut at noiseTail
// sigma, leaves the level's modulus 2^20 times the room it takes (the values need
// the rest; WithMaxAbs checks them too).
func (p *Parameters) floodFits(level int, sigma float64) bool {
	return math.Log2(noiseTail*sigma)+20 < float64(p.p.LogQLvl(level))
}

func flood(params *Parameters, pt *rlwe.Plaintext, sigma float64) error {
	prng, err := sampling.NewPRNG()
	if err != nil {
		return internalf("PRNG")
	}
	ringQ := params.p.RingQ().AtLevel(pt.Level())
	s, err := ring.NewSampler(prng, ringQ, ring.DiscreteGaussian{Sigma: sigma, Bound: noiseTail * sigma}, false)
	if err != nil {
		return internalf("flooding sampler")
	}
	e := ringQ.NewPoly()
	s.Read(e)
	ringQ.NTT(e, e)
	ringQ.Add(pt.Value, e, pt.Value)
	return nil
}

// Encryptor encrypts under a public key: data owners use it to contribute values
// that only the key's holder can decrypt. It is safe for concurrent use.
type Encryptor struct {
	params *Parameters
	fp     []byte
	pool   sync.Pool
}

type pkWorker struct {
	enc *hefloat.Encoder
	pkE *rlwe.Encryptor
	pt  *rlwe.Plaintext // encoding scratch
}

// NewEncryptor returns an Encryptor for pk.
func NewEncryptor(pk *PublicKey) (*Encryptor, error) {
	if pk == nil || pk.pk == nil {
		return nil, invalidf("nil public key")
	}
	params := pk.params
	e := &Encryptor{params: params, fp: pk.fp}
	e.pool.New = func() any {
		return &pkWorker{
			enc: hefloat.NewEncoder(hefloat.Parameters{Parameters: params.p}),
			pkE: rlwe.NewEncryptor(params.p, pk.pk),
			pt:  hefloat.NewPlaintext(hefloat.Parameters{Parameters: params.p}, params.MaxLevel()),
		}
	}
	return e, nil
}

// Encrypt packs and encrypts values under the public key. Public-key ciphertexts
// cannot be seeded: they travel in full.
func (e *Encryptor) Encrypt(values []float64) (*Vector, error) {
	w := e.pool.Get().(*pkWorker)
	defer e.pool.Put(w)
	v, err := encryptValues(e.params, e.fp, w.enc, w.pt, values, func(pt *rlwe.Plaintext, ct *rlwe.Ciphertext) ([]byte, error) {
		return nil, w.pkE.Encrypt(pt, ct)
	})
	if v != nil {
		v.noise = freshNoise(e.params, true)
	}
	return v, err
}
