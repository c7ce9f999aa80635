{{/* Names and labels shared by every object of the chart. */}}

{{- define "llavarun-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llavarun-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "llavarun-operator.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "llavarun-operator.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "llavarun-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llavarun-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llavarun-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llavarun-operator.labels" -}}
helm.sh/chart: {{ include "llavarun-operator.chart" . }}
{{ include "llavarun-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llavarun
{{- end }}

{{- define "llavarun-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llavarun-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llavarun-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
What the operator does in the namespaces it serves. Each rule is needed; see docs/OPERATOR.md.
Creating the per-run Role/RoleBinding (patch llavaruns/status of one run) requires holding
those permissions ourselves: RBAC escalation prevention, hence llavaruns/status get+patch.
*/}}
{{/* The backends the operator serves, comma-separated (the kinds whose children it watches). */}}
{{- define "llavarun-operator.servedBackends" -}}
{{- $served := list }}
{{- if .Values.backends.pyTorchJob.enabled }}{{ $served = append $served "PyTorchJob" }}{{ end }}
{{- if .Values.backends.trainJob.enabled }}{{ $served = append $served "TrainJob" }}{{ end }}
{{- join "," $served }}
{{- end }}

{{- define "llavarun-operator.namespacedRules" -}}
- apiGroups: ["llavarun.io"]
  resources: ["llavaruns"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["llavarun.io"]
  resources: ["llavaruns/status"]
  verbs: ["get", "patch"]
{{- if .Values.backends.pyTorchJob.enabled }}
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
{{- end }}
{{- if .Values.backends.trainJob.enabled }}
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
{{- end }}
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end }}
