{{/*
tts-operator.name: the chart name, or nameOverride; at most 63 characters (a label value).
*/}}
{{- define "tts-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
tts-operator.fullname: the name of every object of a release: fullnameOverride, else
the release name when it already contains the chart name, else "<release>-<chart>".
At most 63 characters (DNS label).
*/}}
{{- define "tts-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
tts-operator.chart: "<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "tts-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
tts-operator.selectorLabels: the labels the Deployment and the Service select pods by.
Never change them in an upgrade: a Deployment's selector is immutable.
*/}}
{{- define "tts-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tts-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
tts-operator.labels: the recommended labels, on every object of the chart.
*/}}
{{- define "tts-operator.labels" -}}
{{ include "tts-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ttsfleet
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "tts-operator.chart" . }}
{{- end }}

{{/*
tts-operator.serviceAccountName: the ServiceAccount the operator runs as, created by
the chart (the full name unless serviceAccount.name is set) or an existing one.
*/}}
{{- define "tts-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tts-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
tts-operator.image: "<repository>@<digest>" when a digest is set, else
"<repository>:<tag>" with the chart's appVersion as the default tag.
*/}}
{{- define "tts-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
tts-operator.agentName: the name of the agent's objects, "<fullname>-agent".
*/}}
{{- define "tts-operator.agentName" -}}
{{- printf "%s-agent" (include "tts-operator.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/*
tts-operator.agentSelectorLabels: the labels the agent's DaemonSet selects its pods by.
Never change them in an upgrade: a DaemonSet's selector is immutable.
*/}}
{{- define "tts-operator.agentSelectorLabels" -}}
app.kubernetes.io/name: {{ include "tts-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{/*
tts-operator.agentLabels: the recommended labels, on every object of the agent.
*/}}
{{- define "tts-operator.agentLabels" -}}
{{ include "tts-operator.agentSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ttsfleet
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "tts-operator.chart" . }}
{{- end }}

{{/*
tts-operator.agentServiceAccountName: the ServiceAccount the agent runs as, created by
the chart (the agent's name unless agent.serviceAccount.name is set) or an existing one.
*/}}
{{- define "tts-operator.agentServiceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "tts-operator.agentName" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
tts-operator.agentImage: the agent's image; the operator's image (the same CLI) unless
agent.image.repository is set.
*/}}
{{- define "tts-operator.agentImage" -}}
{{- $image := .Values.agent.image }}
{{- $repository := default .Values.image.repository $image.repository }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else if $image.repository }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion $image.tag) }}
{{- else }}
{{- include "tts-operator.image" . }}
{{- end }}
{{- end }}

{{/*
tts-operator.validate: fails the render on values that the schema cannot compare with
each other, with a message that names the values and the fix. Leader election's
timings must nest (retryPeriod < renewDeadline < leaseDuration) as the operator
checks them at start; without leader election, two pods would both reconcile.
*/}}
{{- define "tts-operator.validate" -}}
{{- $le := .Values.leaderElection }}
{{- if $le.enabled }}
{{- if ge (int $le.renewDeadline) (int $le.leaseDuration) }}
{{- fail (printf "leaderElection.renewDeadline (%d) must be below leaderElection.leaseDuration (%d), or an old leader could still write when a new one starts: lower renewDeadline or raise leaseDuration" (int $le.renewDeadline) (int $le.leaseDuration)) }}
{{- end }}
{{- if ge (int $le.retryPeriod) (int $le.renewDeadline) }}
{{- fail (printf "leaderElection.retryPeriod (%d) must be below leaderElection.renewDeadline (%d), or the leader gets no second try to renew before it must stop: lower retryPeriod or raise renewDeadline" (int $le.retryPeriod) (int $le.renewDeadline)) }}
{{- end }}
{{- else if gt (int .Values.replicaCount) 1 }}
{{- fail (printf "replicaCount is %d but leaderElection.enabled is false: without leader election every operator pod reconciles every TtsDeployment. Set replicaCount to 0 or 1, or set leaderElection.enabled=true" (int .Values.replicaCount)) }}
{{- end }}
{{- end }}

{{/*
tts-operator.affinity: the operator pod's affinity: the affinity value when set, else a
preferred anti-affinity that puts the release's operator pods (the leader and its
standby) on different nodes where it can, and on one node where it cannot.
*/}}
{{- define "tts-operator.affinity" -}}
{{- if .Values.affinity }}
{{- toYaml .Values.affinity }}
{{- else -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "tts-operator.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}

{{/*
tts-operator.baseEgress: the NetworkPolicy egress rules that the operator and the agent
both need: DNS (UDP and TCP 53) and the Kubernetes API. A destination list left empty
(networkPolicy.dns.to, networkPolicy.apiServer.cidrs) allows any address on those ports.
*/}}
{{- define "tts-operator.baseEgress" -}}
{{- $np := .Values.networkPolicy -}}
# DNS: the cluster's resolver.
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  {{- with $np.dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
# The Kubernetes API, by address: on most clusters no pod selector matches the apiserver.
- ports:
    {{- range $np.apiServer.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $np.apiServer.cidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  {{- end }}
{{- end }}
