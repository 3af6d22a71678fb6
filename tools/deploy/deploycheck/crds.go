package deploycheck

import (
	"errors"
	"fmt"
	"net/url"
	"slices"
	"sort"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Certificate is the part of cert-manager.io/v1 Certificate the chart may use, field for
// field as in cert-manager's CertificateSpec (github.com/cert-manager/cert-manager
// pkg/apis/certmanager/v1). A field outside it is an error when decoding, like an
// unknown field in a built-in type: add it here when the chart starts using it.
type Certificate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              CertificateSpec `json:"spec"`
}

type CertificateSpec struct {
	SecretName           string                     `json:"secretName"`
	SecretTemplate       *CertificateSecretTemplate `json:"secretTemplate,omitempty"`
	CommonName           string                     `json:"commonName,omitempty"`
	Duration             string                     `json:"duration,omitempty"`
	RenewBefore          string                     `json:"renewBefore,omitempty"`
	DNSNames             []string                   `json:"dnsNames,omitempty"`
	IPAddresses          []string                   `json:"ipAddresses,omitempty"`
	URIs                 []string                   `json:"uris,omitempty"`
	EmailAddresses       []string                   `json:"emailAddresses,omitempty"`
	IsCA                 bool                       `json:"isCA,omitempty"`
	Usages               []string                   `json:"usages,omitempty"`
	PrivateKey           *CertificatePrivateKey     `json:"privateKey,omitempty"`
	IssuerRef            IssuerReference            `json:"issuerRef"`
	RevisionHistoryLimit *int32                     `json:"revisionHistoryLimit,omitempty"`
}

type CertificateSecretTemplate struct {
	Annotations map[string]string `json:"annotations,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
}

type CertificatePrivateKey struct {
	RotationPolicy string `json:"rotationPolicy,omitempty"`
	Encoding       string `json:"encoding,omitempty"`
	Algorithm      string `json:"algorithm,omitempty"`
	Size           int    `json:"size,omitempty"`
}

type IssuerReference struct {
	Name  string `json:"name"`
	Kind  string `json:"kind,omitempty"`
	Group string `json:"group,omitempty"`
}

// keyUsages are cert-manager's KeyUsage values.
var keyUsages = []string{"signing", "digital signature", "content commitment", "key encipherment",
	"key agreement", "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only",
	"any", "server auth", "client auth", "code signing", "email protection", "s/mime",
	"ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
	"microsoft sgc", "netscape sgc"}

// Validate checks what the CRD's OpenAPI schema and cert-manager's webhook would, for
// the fields above, plus Veil's rule: exactly one URI SAN, a SPIFFE ID.
func (c *Certificate) Validate() error {
	var problems []string
	s := c.Spec
	if s.SecretName == "" {
		problems = append(problems, "spec.secretName is required")
	}
	if s.IssuerRef.Name == "" {
		problems = append(problems, "spec.issuerRef.name is required")
	}
	if k := s.IssuerRef.Kind; k != "" && k != "Issuer" && k != "ClusterIssuer" && s.IssuerRef.Group == "cert-manager.io" {
		problems = append(problems, fmt.Sprintf("spec.issuerRef.kind %q: want Issuer or ClusterIssuer", k))
	}
	var d, rb time.Duration
	var err error
	if s.Duration != "" {
		if d, err = time.ParseDuration(s.Duration); err != nil {
			problems = append(problems, "spec.duration: "+err.Error())
		}
	}
	if s.RenewBefore != "" {
		if rb, err = time.ParseDuration(s.RenewBefore); err != nil {
			problems = append(problems, "spec.renewBefore: "+err.Error())
		}
	}
	if d > 0 && rb >= d {
		problems = append(problems, "spec.renewBefore must be shorter than spec.duration")
	}
	if d > 0 && d < time.Hour {
		problems = append(problems, "spec.duration below cert-manager's minimum of 1h")
	}
	for _, u := range s.Usages {
		if !slices.Contains(keyUsages, u) {
			problems = append(problems, fmt.Sprintf("spec.usages: unknown usage %q", u))
		}
	}
	if pk := s.PrivateKey; pk != nil {
		if pk.Algorithm != "" && !slices.Contains([]string{"RSA", "ECDSA", "Ed25519"}, pk.Algorithm) {
			problems = append(problems, fmt.Sprintf("spec.privateKey.algorithm %q", pk.Algorithm))
		}
		if pk.RotationPolicy != "" && pk.RotationPolicy != "Never" && pk.RotationPolicy != "Always" {
			problems = append(problems, fmt.Sprintf("spec.privateKey.rotationPolicy %q", pk.RotationPolicy))
		}
		if pk.Encoding != "" && pk.Encoding != "PKCS1" && pk.Encoding != "PKCS8" {
			problems = append(problems, fmt.Sprintf("spec.privateKey.encoding %q", pk.Encoding))
		}
		if pk.Algorithm == "ECDSA" && pk.Size != 0 && pk.Size != 256 && pk.Size != 384 && pk.Size != 521 {
			problems = append(problems, fmt.Sprintf("spec.privateKey.size %d for ECDSA", pk.Size))
		}
	}
	if s.IsCA {
		problems = append(problems, "spec.isCA: a workload certificate must not be a CA")
	}
	if len(s.URIs) != 1 {
		problems = append(problems, fmt.Sprintf("spec.uris: Veil needs exactly one URI SAN (a SPIFFE ID), got %d", len(s.URIs)))
	}
	for _, u := range s.URIs {
		if err := checkSPIFFEID(u); err != nil {
			problems = append(problems, "spec.uris: "+err.Error())
		}
	}
	if s.CommonName == "" && len(s.DNSNames)+len(s.URIs)+len(s.IPAddresses)+len(s.EmailAddresses) == 0 {
		problems = append(problems, "spec: at least one of commonName, dnsNames, uris, ipAddresses, emailAddresses")
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// ClusterSPIFFEID is spire.spiffe.io/v1alpha1 ClusterSPIFFEID of the
// spire-controller-manager (github.com/spiffe/spire-controller-manager api/v1alpha1).
type ClusterSPIFFEID struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              ClusterSPIFFEIDSpec `json:"spec"`
}

type ClusterSPIFFEIDSpec struct {
	SPIFFEIDTemplate          string                `json:"spiffeIDTemplate"`
	TTL                       *metav1.Duration      `json:"ttl,omitempty"`
	JWTTTL                    *metav1.Duration      `json:"jwtTtl,omitempty"`
	DNSNameTemplates          []string              `json:"dnsNameTemplates,omitempty"`
	WorkloadSelectorTemplates []string              `json:"workloadSelectorTemplates,omitempty"`
	NamespaceSelector         *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
	PodSelector               *metav1.LabelSelector `json:"podSelector,omitempty"`
	FederatesWith             []string              `json:"federatesWith,omitempty"`
	Admin                     bool                  `json:"admin,omitempty"`
	Downstream                bool                  `json:"downstream,omitempty"`
	AutoPopulateDNSNames      bool                  `json:"autoPopulateDNSNames,omitempty"`
	ClassName                 string                `json:"className,omitempty"`
	Fallback                  bool                  `json:"fallback,omitempty"`
	Hint                      string                `json:"hint,omitempty"`
}

// Validate checks the template's shape and that the entry is narrow: a pod selector
// and a namespace selector, no admin or downstream rights.
func (c *ClusterSPIFFEID) Validate() error {
	var problems []string
	s := c.Spec
	if !strings.HasPrefix(s.SPIFFEIDTemplate, "spiffe://") {
		problems = append(problems, fmt.Sprintf("spec.spiffeIDTemplate %q: want spiffe://...", s.SPIFFEIDTemplate))
	}
	if s.PodSelector == nil || len(s.PodSelector.MatchLabels)+len(s.PodSelector.MatchExpressions) == 0 {
		problems = append(problems, "spec.podSelector must select the workload's pods (an empty one selects every pod)")
	}
	if s.NamespaceSelector == nil || len(s.NamespaceSelector.MatchLabels)+len(s.NamespaceSelector.MatchExpressions) == 0 {
		problems = append(problems, "spec.namespaceSelector must select the release's namespace")
	}
	if s.Admin || s.Downstream {
		problems = append(problems, "spec.admin and spec.downstream must be off for workloads")
	}
	for _, sel := range []*metav1.LabelSelector{s.PodSelector, s.NamespaceSelector} {
		if sel != nil {
			if _, err := metav1.LabelSelectorAsSelector(sel); err != nil {
				problems = append(problems, "selector: "+err.Error())
			}
		}
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// checkSPIFFEID checks the shape of a SPIFFE ID (spiffe://trust-domain/path).
func checkSPIFFEID(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return err
	}
	if u.Scheme != "spiffe" || u.Host == "" || u.Path == "" || u.Path == "/" || u.RawQuery != "" || u.Fragment != "" || u.User != nil || u.Port() != "" {
		return fmt.Errorf("%q is not a SPIFFE ID with a path", s)
	}
	return nil
}

func sortStrings(s []string) { sort.Strings(s) }
