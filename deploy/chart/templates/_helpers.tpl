{{/* Names, labels, the volume key and the security contexts shared by every template. */}}

{{- define "kandinsky22.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kandinsky22.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kandinsky22.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kandinsky22.labels" -}}
{{ include "kandinsky22.commonLabels" . }}
app.kubernetes.io/name: {{ include "kandinsky22.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component (triton, gateway, prepare): call with (list . "triton"). */}}
{{- define "kandinsky22.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "kandinsky22.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "kandinsky22.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end -}}

{{- define "kandinsky22.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kandinsky22.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The headless Service of the replicas: its name resolves to every ready replica. */}}
{{- define "kandinsky22.replicasHost" -}}
{{ include "kandinsky22.fullname" . }}-triton.{{ .Release.Namespace }}.svc
{{- end -}}

{{- define "kandinsky22.claimName" -}}
{{- default (printf "%s-data" (include "kandinsky22.fullname" .)) .Values.storage.existingClaim -}}
{{- end -}}

{{- define "kandinsky22.adminSecretName" -}}
{{- default (printf "%s-admin-key" (include "kandinsky22.fullname" .)) .Values.adminKey.existingSecret -}}
{{- end -}}

{{/*
What a prepared folder is made from: the checkpoint (sources, pinned revisions, preset), the build
settings and the image (its TensorRT and exporter). The key is the first 16 hex digits of the SHA-256 of
this JSON; the Job writes the JSON next to the folders (<volume>/<key>/source.json).
*/}}
{{- define "kandinsky22.keySource" -}}
{{- dict "checkpoint" (omit .Values.checkpoint "hfTokenSecret") "build" .Values.build "image" (printf "%s:%s" .Values.image.repository .Values.image.tag) | toJson -}}
{{- end -}}

{{- define "kandinsky22.key" -}}
{{- include "kandinsky22.keySource" . | sha256sum | trunc 16 -}}
{{- end -}}

{{/* Environment every container of the chart gets: where the volume is and which key to use. */}}
{{- define "kandinsky22.keyEnv" -}}
- name: KANDINSKY_VOLUME
  value: {{ .Values.storage.mountPath | quote }}
- name: KANDINSKY_KEY
  value: {{ include "kandinsky22.key" . | quote }}
- name: HOME
  value: /tmp
{{- end -}}

{{- define "kandinsky22.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "kandinsky22.containerSecurityContext" -}}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Resources with one GPU: the values' requests/limits plus <gpu.resource>: 1 as a limit. */}}
{{- define "kandinsky22.gpuResources" -}}
{{- $root := index . 0 -}}
{{- $resources := deepCopy (index . 1) -}}
{{- $limits := merge (dict $root.Values.gpu.resource 1) (default (dict) $resources.limits) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- toYaml $resources -}}
{{- end -}}

{{- define "kandinsky22.gpuScheduling" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $selector := deepCopy (default (dict) $component.nodeSelector) -}}
{{- if $root.Values.gpu.product -}}
{{- $_ := set $selector "nvidia.com/gpu.product" $root.Values.gpu.product -}}
{{- end -}}
{{- with $selector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := concat $root.Values.gpu.tolerations (default (list) $component.tolerations) -}}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
