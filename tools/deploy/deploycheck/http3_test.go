package deploycheck

import (
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
)

// TestHTTP3ExpectationRefused: a chart rendered without HTTP/3 is refused when HTTP/3
// is expected, and the reverse.
func TestHTTP3ExpectationRefused(t *testing.T) {
	if _, err := Check(render(t, "spire"), Expect{Mode: "spire", HTTP3: true}); err == nil {
		t.Error("a rendering without HTTP/3 passed as http3.enabled")
	}
	if _, err := Check(render(t, "spire-http3"), Expect{Mode: "spire"}); err == nil {
		t.Error("a rendering with HTTP/3 passed as http3 off")
	}
}

// TestHTTP3MutationsRefused breaks the UDP path of spire-http3 in each place.
func TestHTTP3MutationsRefused(t *testing.T) {
	s := scenario(t, "spire-http3")
	eachDeployment := func(f func(*appsv1.Deployment)) func([]Object) []Object {
		return func(objs []Object) []Object {
			for _, o := range objs {
				if d, ok := o.Value.(*appsv1.Deployment); ok && o.Name == "veil-scoring" {
					f(d)
				}
			}
			return objs
		}
	}
	checkMutations(t, s, []mutation{
		{"no UDP container port", eachDeployment(func(d *appsv1.Deployment) {
			ctr := &d.Spec.Template.Spec.Containers[0]
			var ports []corev1.ContainerPort
			for _, p := range ctr.Ports {
				if p.Protocol != corev1.ProtocolUDP {
					ports = append(ports, p)
				}
			}
			ctr.Ports = ports
		}), "no UDP container port"},
		{"the Service without UDP", func(objs []Object) []Object {
			for _, o := range objs {
				if svc, ok := o.Value.(*corev1.Service); ok && o.Name == "veil-scoring" {
					var ports []corev1.ServicePort
					for _, p := range svc.Spec.Ports {
						if p.Protocol != corev1.ProtocolUDP {
							ports = append(ports, p)
						}
					}
					svc.Spec.Ports = ports
				}
			}
			return objs
		}, "no Service carries the rpc port over UDP"},
		{"the NetworkPolicy without UDP", func(objs []Object) []Object {
			for _, o := range objs {
				if np, ok := o.Value.(*networkingv1.NetworkPolicy); ok && o.Name == "veil-scoring" {
					for i, r := range np.Spec.Ingress {
						var ports []networkingv1.NetworkPolicyPort
						for _, p := range r.Ports {
							if p.Protocol == nil || *p.Protocol != corev1.ProtocolUDP {
								ports = append(ports, p)
							}
						}
						np.Spec.Ingress[i].Ports = ports
					}
				}
			}
			return objs
		}, "no NetworkPolicy ingress rule opens UDP"},
		{"UDP open to everyone in its own rule", func(objs []Object) []Object {
			for _, o := range objs {
				if np, ok := o.Value.(*networkingv1.NetworkPolicy); ok && o.Name == "veil-scoring" {
					udp := corev1.ProtocolUDP
					port := np.Spec.Ingress[0].Ports[0].Port
					np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: port}}})
				}
			}
			return objs
		}, "without its TCP port"},
	})
}
