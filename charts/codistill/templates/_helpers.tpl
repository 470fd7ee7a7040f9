{{/* Names and labels, defined once for every template. */}}

{{- define "codistill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: the release name, unless it lacks the chart name. */}}
{{- define "codistill.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := include "codistill.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "codistill.operatorName" -}}
{{ include "codistill.fullname" . }}-operator
{{- end }}

{{- define "codistill.storeName" -}}
{{ include "codistill.fullname" . }}-minio
{{- end }}

{{/* The dev object store's credentials Secret: the name a Codistillation's credentialsSecret uses. */}}
{{- define "codistill.storeSecret" -}}
{{ include "codistill.fullname" . }}-bucket
{{- end }}

{{/* In-cluster S3 endpoint of the dev object store (reachable from every namespace). */}}
{{- define "codistill.storeEndpoint" -}}
http://{{ include "codistill.storeName" . }}.{{ .Release.Namespace }}.svc:9000
{{- end }}

{{/*
Namespaces that get the dev object store's Secret (a run reads its credentialsSecret in its own
namespace): the release's, the watched ones (or `default` when watching all), and any extra.
*/}}
{{- define "codistill.storeSecretNamespaces" -}}
{{- $watched := .Values.watchNamespaces | default (list "default") }}
{{- concat (list .Release.Namespace) $watched .Values.devObjectStore.secretNamespaces | uniq | toJson }}
{{- end }}

{{- define "codistill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "codistill.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The images are built by the user (`make images`), never pulled from a public name we do not own:
an empty repository fails here, with what to set (the schema allows "" so that this message, not
a bare minLength error, is what the user reads).
*/}}
{{- define "codistill.operatorImage" -}}
{{- if not .Values.image.repository }}
{{- fail "image.repository: required: set it to where `make images REGISTRY=...` pushed the operator image, e.g. --set image.repository=localhost:5000/codistill/operator" }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The trainer image of runs without spec.image: by default beside the operator's, with its tag but
not its digest (`<tag>@sha256:...` is the operator image's own).
*/}}
{{- define "codistill.trainerImage" -}}
{{- $repository := .Values.trainerImage.repository }}
{{- if not $repository }}
{{- if not (hasSuffix "/operator" .Values.image.repository) }}
{{- fail "trainerImage.repository: required when image.repository does not end in /operator: set it to where `make images` pushed the trainer image, e.g. --set trainerImage.repository=localhost:5000/codistill/trainer" }}
{{- end }}
{{- $repository = printf "%s/trainer" (trimSuffix "/operator" .Values.image.repository) }}
{{- end }}
{{- printf "%s:%s" $repository (.Values.trainerImage.tag | default (regexReplaceAll "@.*" .Values.image.tag "") | default .Chart.AppVersion) }}
{{- end }}

{{/* Standard app.kubernetes.io labels; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "codistill.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "codistill.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: codistill
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/* Labels that select one component's pods; the component keeps trainer pods out. */}}
{{- define "codistill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "codistill.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The restricted Pod Security Standard, for every pod of this chart. */}}
{{- define "codistill.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "codistill.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/*
Exactly what the operator and kopf call (operator/codistill_operator/k8s.py; kopf 1.45), no more:
- codistillations: kopf lists and watches them and patches its finalizer and annotations (merge
  and JSON patches); the operator reads one (get) and writes its status subresource (patch).
- pytorchjobs: one per group, created (and dry-run created), converged (patch), deleted; watched.
- events: core v1 only, created; neither kopf nor the operator patches or uses events.k8s.io.
Secrets are not here: rbac.yaml grants `get` on them only in the namespaces runs use.
*/}}
{{- define "codistill.rules" -}}
- apiGroups: [codistill.io]
  resources: [codistillations]
  verbs: [get, list, watch, patch]
- apiGroups: [codistill.io]
  resources: [codistillations/status]
  verbs: [patch]
- apiGroups: [kubeflow.org]
  resources: [pytorchjobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [trainer.kubeflow.org]
  resources: [trainjobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
{{- end }}
