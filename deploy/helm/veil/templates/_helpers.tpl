{{/* Names. */}}
{{- define "veil.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "veil.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's objects: (dict "root" $ "component" "scoring"). */}}
{{- define "veil.componentName" -}}
{{- printf "%s-%s" (include "veil.fullname" .root | trunc 50 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "veil.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "veil.labels" -}}
helm.sh/chart: {{ include "veil.chart" . }}
app.kubernetes.io/name: {{ include "veil.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: veil
{{- end -}}

{{- define "veil.selectorLabels" -}}
app.kubernetes.io/name: {{ include "veil.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "veil.componentLabels" -}}
{{ include "veil.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "veil.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "veil.serviceAccountName" -}}
{{- include "veil.componentName" . -}}
{{- end -}}

{{/* A workload's SPIFFE ID. */}}
{{- define "veil.spiffeID" -}}
{{- $c := index .root.Values .component -}}
{{- if $c.spiffeID -}}
{{- $c.spiffeID -}}
{{- else -}}
{{- printf "spiffe://%s/ns/%s/sa/%s" .root.Values.trustDomain .root.Release.Namespace (include "veil.serviceAccountName" .) -}}
{{- end -}}
{{- end -}}

{{- define "veil.caServiceName" -}}
{{- include "veil.componentName" (dict "root" . "component" "ca") -}}
{{- end -}}

{{- define "veil.caURL" -}}
{{- if .Values.identity.veilCA.url -}}
{{- .Values.identity.veilCA.url -}}
{{- else -}}
{{- printf "https://%s.%s.svc:%d" (include "veil.caServiceName" .) .Release.Namespace (int .Values.ca.port) -}}
{{- end -}}
{{- end -}}

{{- define "veil.caBundleConfigMap" -}}
{{- default (printf "%s-ca-bundle" (include "veil.fullname" .)) .Values.identity.veilCA.bundleConfigMap -}}
{{- end -}}

{{- define "veil.authSigningKeySecret" -}}
{{- default (printf "%s-auth-signing-key" (include "veil.fullname" .)) .Values.auth.signingKey.secret -}}
{{- end -}}

{{- define "veil.authPublicKeyConfigMap" -}}
{{- default (printf "%s-auth-public-key" (include "veil.fullname" .)) .Values.auth.publicKey.configMap -}}
{{- end -}}

{{- define "veil.caClaimName" -}}
{{- default (printf "%s-ca" (include "veil.fullname" .)) .Values.ca.persistence.existingClaim -}}
{{- end -}}

{{/* Validation of values that would otherwise render something that cannot work. */}}
{{- define "veil.validate" -}}
{{- $modes := list "veil-ca" "spire" "cert-manager" -}}
{{- if not (has .Values.identity.mode $modes) -}}
{{- fail (printf "identity.mode %q: want one of veil-ca, spire, cert-manager" .Values.identity.mode) -}}
{{- end -}}
{{- if not (has .Values.state.backend (list "embedded" "nats")) -}}
{{- fail (printf "state.backend %q: want embedded or nats" .Values.state.backend) -}}
{{- end -}}
{{- if and (eq .Values.state.backend "nats") (or (lt (int .Values.state.replicas) 1) (gt (int .Values.state.replicas) 5)) -}}
{{- fail (printf "state.replicas %v: JetStream allows 1 to 5" .Values.state.replicas) -}}
{{- end -}}
{{- if and (eq .Values.state.backend "nats") (not .Values.state.url) -}}
{{- fail "state.backend nats needs state.url" -}}
{{- end -}}
{{- if and (eq .Values.identity.mode "veil-ca") (not .Values.ca.enabled) (not .Values.identity.veilCA.url) -}}
{{- fail "identity.mode veil-ca needs ca.enabled or identity.veilCA.url" -}}
{{- end -}}
{{- if and (eq .Values.identity.mode "spire") (not (has .Values.identity.spire.socketVolume (list "csi" "hostPath"))) -}}
{{- fail (printf "identity.spire.socketVolume %q: want csi or hostPath" .Values.identity.spire.socketVolume) -}}
{{- end -}}
{{- if and .Values.auth.enabled .Values.auth.publicKey.pem (not (hasPrefix "-----BEGIN PUBLIC KEY-----" (trim .Values.auth.publicKey.pem))) -}}
{{- fail "auth.publicKey.pem: want the token service's public key in PEM (-----BEGIN PUBLIC KEY-----, from openssl pkey -pubout)" -}}
{{- end -}}
{{- if and .Values.networkPolicy.egressRegion.enabled (empty .Values.networkPolicy.egressRegion.allowedCIDRs) -}}
{{- fail "networkPolicy.egressRegion.enabled needs allowedCIDRs" -}}
{{- end -}}
{{- if .Values.networkPolicy.egressRegion.enabled -}}
{{- range .Values.networkPolicy.extraEgress -}}
{{- if empty .to -}}
{{- fail "networkPolicy.egressRegion: every networkPolicy.extraEgress rule needs peers (to)" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Whether a component may run several replicas: not in veil-ca mode (a join token
serves one pod) and only with shared state (embedded state is per replica: a client's
evaluation keys or a study on one replica are unknown to the others). */}}
{{- define "veil.scalable" -}}
{{- if and (ne .Values.identity.mode "veil-ca") (eq .Values.state.backend "nats") -}}true{{- end -}}
{{- end -}}

{{- define "veil.replicas" -}}
{{- $c := index .root.Values .component -}}
{{- if include "veil.scalable" .root -}}{{ $c.replicas }}{{- else -}}1{{- end -}}
{{- end -}}

{{- define "veil.autoscaling" -}}
{{- $c := index .root.Values .component -}}
{{- if and $c.autoscaling.enabled (include "veil.scalable" .root) -}}true{{- end -}}
{{- end -}}

{{/* DNS egress rule. */}}
{{- define "veil.dnsEgress" -}}
- to:
    - namespaceSelector:
        {{- toYaml .Values.networkPolicy.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .Values.networkPolicy.dns.podSelector | nindent 8 }}
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- end -}}

{{/* Peers for an external destination: the given peers; else, with egressRegion, the
region's CIDRs; else none (any address). */}}
{{- define "veil.externalPeers" -}}
{{- if .peers -}}
{{- toYaml .peers -}}
{{- else if .root.Values.networkPolicy.egressRegion.enabled -}}
{{- range .root.Values.networkPolicy.egressRegion.allowedCIDRs }}
- ipBlock:
    cidr: {{ . }}
{{- end -}}
{{- end -}}
{{- end -}}
