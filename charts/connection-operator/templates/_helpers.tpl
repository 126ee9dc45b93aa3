{{- define "connection-operator.labels" -}}
app.kubernetes.io/name: connection-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "connection-operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "connection-operator.rbacName" -}}
crmconnect:{{ .Release.Name }}
{{- end -}}

{{- /* The watched namespaces, comma-separated (empty: all): watchNamespaces, plus the older
single watchNamespace. */ -}}
{{- define "connection-operator.watchNamespaces" -}}
{{- $all := concat (.Values.watchNamespaces | default list) (compact (list .Values.watchNamespace)) | uniq -}}
{{- join "," $all -}}
{{- end -}}
