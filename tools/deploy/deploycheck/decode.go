// Package deploycheck validates what the Veil Helm chart renders: every object is
// decoded strictly (unknown fields, wrong types and duplicate keys are errors) into the
// Kubernetes API types of its apiVersion and kind, or into small structs for the custom
// resources the chart creates (cert-manager Certificate, SPIRE ClusterSPIFFEID); a kind
// it does not know is an error. Check then asserts the chart's secure defaults.
package deploycheck

import (
	"bytes"
	"errors"
	"fmt"
	"regexp"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// Object is one decoded manifest.
type Object struct {
	APIVersion string
	Kind       string
	Name       string
	Namespace  string
	Source     string // the "# Source:" comment helm writes, if any
	Value      any    // pointer to the typed object
}

func (o Object) String() string { return o.Kind + "/" + o.Name }

// kinds maps apiVersion/kind to a constructor of its Go type. Anything else is refused.
var kinds = map[string]func() any{
	"v1/ConfigMap":                             func() any { return new(corev1.ConfigMap) },
	"v1/Secret":                                func() any { return new(corev1.Secret) },
	"v1/Service":                               func() any { return new(corev1.Service) },
	"v1/ServiceAccount":                        func() any { return new(corev1.ServiceAccount) },
	"v1/PersistentVolumeClaim":                 func() any { return new(corev1.PersistentVolumeClaim) },
	"apps/v1/Deployment":                       func() any { return new(appsv1.Deployment) },
	"apps/v1/StatefulSet":                      func() any { return new(appsv1.StatefulSet) },
	"batch/v1/Job":                             func() any { return new(batchv1.Job) },
	"policy/v1/PodDisruptionBudget":            func() any { return new(policyv1.PodDisruptionBudget) },
	"autoscaling/v2/HorizontalPodAutoscaler":   func() any { return new(autoscalingv2.HorizontalPodAutoscaler) },
	"networking.k8s.io/v1/NetworkPolicy":       func() any { return new(networkingv1.NetworkPolicy) },
	"cert-manager.io/v1/Certificate":           func() any { return new(Certificate) },
	"spire.spiffe.io/v1alpha1/ClusterSPIFFEID": func() any { return new(ClusterSPIFFEID) },
}

// clusterScoped kinds have no namespace.
var clusterScoped = map[string]bool{"ClusterSPIFFEID": true}

var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)

// Decode splits a multi-document manifest and decodes every document strictly.
func Decode(manifest []byte) ([]Object, error) {
	var objs []Object
	var errs []error
	for i, doc := range docSep.Split(string(manifest), -1) {
		source := ""
		for _, line := range strings.Split(doc, "\n") {
			if s, ok := strings.CutPrefix(line, "# Source: "); ok {
				source = s
				break
			}
		}
		if isEmpty(doc) {
			continue
		}
		obj, err := decodeOne([]byte(doc))
		if err != nil {
			where := fmt.Sprintf("document %d", i)
			if source != "" {
				where += " (" + source + ")"
			}
			errs = append(errs, fmt.Errorf("%s: %w", where, err))
			continue
		}
		obj.Source = source
		objs = append(objs, obj)
	}
	return objs, errors.Join(errs...)
}

func isEmpty(doc string) bool {
	for _, line := range strings.Split(doc, "\n") {
		t := strings.TrimSpace(line)
		if t != "" && !strings.HasPrefix(t, "#") {
			return false
		}
	}
	return true
}

func decodeOne(doc []byte) (Object, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return Object{}, fmt.Errorf("not a YAML object: %w", err)
	}
	if tm.APIVersion == "" || tm.Kind == "" {
		return Object{}, errors.New("apiVersion and kind are required")
	}
	newValue, ok := kinds[tm.APIVersion+"/"+tm.Kind]
	if !ok {
		return Object{}, fmt.Errorf("unknown kind %s %s (deploycheck knows: %s)", tm.APIVersion, tm.Kind, knownKinds())
	}
	v := newValue()
	if err := strictUnmarshal(doc, v); err != nil {
		return Object{}, fmt.Errorf("%s %s: %w", tm.APIVersion, tm.Kind, err)
	}
	meta := objectMeta(v)
	obj := Object{APIVersion: tm.APIVersion, Kind: tm.Kind, Name: meta.Name, Namespace: meta.Namespace, Value: v}
	if err := validateMeta(tm.Kind, meta); err != nil {
		return Object{}, fmt.Errorf("%s/%s: %w", tm.Kind, meta.Name, err)
	}
	return obj, nil
}

// strictUnmarshal decodes YAML as the API server's strict field validation does: YAML
// to JSON refusing duplicate keys, then sigs.k8s.io/json, which matches field names
// case-sensitively (encoding/json would take "RunAsUser" for "runAsUser") and reports
// unknown and duplicate fields.
func strictUnmarshal(doc []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(bytes.TrimSpace(doc))
	if err != nil {
		return err
	}
	strictErrs, err := kjson.UnmarshalStrict(j, v)
	if err != nil {
		return err
	}
	return errors.Join(strictErrs...)
}

func knownKinds() string {
	var ks []string
	for k := range kinds {
		ks = append(ks, k)
	}
	sortStrings(ks)
	return strings.Join(ks, ", ")
}

// objectMeta returns the metadata of any decoded object (the k8s.io/api types and the
// custom resource structs all embed metav1.ObjectMeta, which has GetObjectMeta).
func objectMeta(v any) *metav1.ObjectMeta {
	if o, ok := v.(interface{ GetObjectMeta() metav1.Object }); ok {
		if m, ok := o.GetObjectMeta().(*metav1.ObjectMeta); ok {
			return m
		}
	}
	panic(fmt.Sprintf("deploycheck: no metadata in %T", v))
}

func validateMeta(kind string, m *metav1.ObjectMeta) error {
	var problems []string
	if m.Name == "" {
		problems = append(problems, "metadata.name is empty")
	} else {
		check := validation.IsDNS1123Subdomain
		if kind == "Service" {
			check = validation.IsDNS1035Label
		}
		for _, p := range check(m.Name) {
			problems = append(problems, "metadata.name "+m.Name+": "+p)
		}
	}
	if clusterScoped[kind] != (m.Namespace == "") {
		if clusterScoped[kind] {
			problems = append(problems, "cluster-scoped object with a namespace")
		} else {
			problems = append(problems, "metadata.namespace is empty")
		}
	}
	problems = append(problems, labelProblems(m.Labels)...)
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

func labelProblems(labels map[string]string) []string {
	var problems []string
	for k, v := range labels {
		for _, p := range validation.IsQualifiedName(k) {
			problems = append(problems, "label key "+k+": "+p)
		}
		for _, p := range validation.IsValidLabelValue(v) {
			problems = append(problems, "label "+k+" value "+v+": "+p)
		}
	}
	return problems
}
