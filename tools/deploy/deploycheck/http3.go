package deploycheck

import (
	"reflect"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// checkHTTP3 asserts that a veil serve workload serves HTTP/3 exactly when Expect.HTTP3
// says so, and then that the rpc port's number is open over UDP end to end: in the
// container, in a Service selecting the pods, and in the NetworkPolicy ingress from the
// same peers as the TCP port (HTTP/3 must not be reachable by more callers than HTTP/2).
func (c *checker) checkHTTP3(w workload, cfg map[string]any, objs []Object) {
	o, lbls, ns := w.obj, w.tmpl.Labels, w.obj.Namespace
	on, _ := cfg["http3"].(bool)
	if on != c.e.HTTP3 {
		c.errorf(o, "serve.yaml: http3 %v, want %v (http3.enabled)", on, c.e.HTTP3)
	}
	var rpc, udp *corev1.ContainerPort
	for _, ctr := range w.tmpl.Spec.Containers {
		for i, p := range ctr.Ports {
			switch {
			case p.Name == "rpc" && p.Protocol == corev1.ProtocolTCP:
				rpc = &ctr.Ports[i]
			case p.Protocol == corev1.ProtocolUDP:
				udp = &ctr.Ports[i]
			}
		}
	}
	if rpc == nil {
		c.errorf(o, "no TCP container port named rpc")
		return
	}
	if !c.e.HTTP3 {
		if udp != nil {
			c.errorf(o, "container port %s is UDP although http3 is off", udp.Name)
		}
		return
	}
	if udp == nil || udp.ContainerPort != rpc.ContainerPort {
		c.errorf(o, "http3: no UDP container port with the rpc port's number %d", rpc.ContainerPort)
		return
	}
	svcOK := false
	for _, s := range byKind[*corev1.Service](objs) {
		if s.Namespace != ns || len(s.Spec.Selector) == 0 || !labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(lbls)) {
			continue
		}
		var tcpPort int32 = -1
		for _, p := range s.Spec.Ports {
			if p.Protocol == corev1.ProtocolTCP && p.TargetPort.String() == rpc.Name {
				tcpPort = p.Port
			}
		}
		for _, p := range s.Spec.Ports {
			t := p.TargetPort.String()
			if p.Protocol == corev1.ProtocolUDP && p.Port == tcpPort && (t == udp.Name || t == itoa(udp.ContainerPort)) {
				svcOK = true
			}
		}
	}
	if !svcOK {
		c.errorf(o, "http3: no Service carries the rpc port over UDP on the TCP port's number (Alt-Svc announces that number)")
	}
	npOK := false
	for _, np := range byKind[*networkingv1.NetworkPolicy](objs) {
		if np.Namespace != ns || !selects(&np.Spec.PodSelector, lbls) {
			continue
		}
		for _, r := range np.Spec.Ingress {
			var tcp, udpOpen bool
			for _, p := range r.Ports {
				if p.Port == nil || p.Port.String() != itoa(rpc.ContainerPort) || p.Protocol == nil {
					continue
				}
				tcp = tcp || *p.Protocol == corev1.ProtocolTCP
				udpOpen = udpOpen || *p.Protocol == corev1.ProtocolUDP
			}
			if udpOpen && !tcp {
				c.errorf(o, "NetworkPolicy %s: UDP %d open in a rule without its TCP port (peers may differ)", np.Name, rpc.ContainerPort)
			}
			npOK = npOK || (udpOpen && tcp)
		}
		for i, r := range np.Spec.Ingress {
			for _, r2 := range np.Spec.Ingress[i+1:] {
				if hasPort(r, rpc.ContainerPort, corev1.ProtocolUDP) && hasPort(r2, rpc.ContainerPort, corev1.ProtocolTCP) && !reflect.DeepEqual(r.From, r2.From) {
					c.errorf(o, "NetworkPolicy %s: UDP and TCP %d open to different peers", np.Name, rpc.ContainerPort)
				}
			}
		}
	}
	if !npOK {
		c.errorf(o, "http3: no NetworkPolicy ingress rule opens UDP %d beside TCP %d", rpc.ContainerPort, rpc.ContainerPort)
	}
}

func hasPort(r networkingv1.NetworkPolicyIngressRule, port int32, proto corev1.Protocol) bool {
	for _, p := range r.Ports {
		if p.Port != nil && p.Port.String() == itoa(port) && p.Protocol != nil && *p.Protocol == proto {
			return true
		}
	}
	return false
}

func itoa(n int32) string { return strconv.Itoa(int(n)) }
