{{/* Names and labels shared by every object of the chart. */}}

{{- define "orchard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "orchard.fullname" -}}
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

{{- define "orchard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orchard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "orchard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "orchard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "orchard.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* The control plane's token Secret and key. */}}
{{- define "orchard.tokenSecret" -}}
{{- default (printf "%s-control-token" (include "orchard.fullname" .)) .Values.control.token.existingSecret -}}
{{- end -}}
{{- define "orchard.tokenSecretKey" -}}
{{- if .Values.control.token.existingSecret -}}{{ .Values.control.token.existingSecretKey }}{{- else -}}token{{- end -}}
{{- end -}}

{{- define "orchard.controlService" -}}
{{- printf "%s-control" (include "orchard.fullname" .) -}}
{{- end -}}

{{- define "orchard.redisService" -}}
{{- printf "%s-redis" (include "orchard.fullname" .) -}}
{{- end -}}

{{- define "orchard.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc:%d/0" (include "orchard.redisService" .) .Release.Namespace (int .Values.redis.port) -}}
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "orchard.prometheusService" -}}
{{- printf "%s-prometheus" (include "orchard.fullname" .) -}}
{{- end -}}

{{/* The command line of the run: `orchard run` tied to this deployment. Words with shell characters single-quoted. */}}
{{- define "orchard.entrypoint" -}}
{{- $words := list "orchard" "run" .Values.run.config "--quiet" -}}
{{- $sets := list (printf "control.host=%s" "0.0.0.0") (printf "control.port=%d" (int .Values.control.port)) "buffer.backend=redis" (printf "buffer.redis_url=%s" (include "orchard.redisUrl" .)) (printf "runs_dir=%s/runs" .Values.storage.mountPath) (printf "warmstart.cache_dir=%s/cache" .Values.storage.mountPath) -}}
{{- $quotas := dict "max_rollout_workers" .Values.quotas.maxRolloutWorkers "max_cpus" .Values.quotas.maxCpus "max_gpus" .Values.quotas.maxGpus -}}
{{- range $name, $quota := $quotas -}}
{{- if not (kindIs "invalid" $quota) -}}
{{- $sets = append $sets (printf "cluster.%s=%v" $name $quota) -}}
{{- end -}}
{{- end -}}
{{- range concat $sets .Values.run.overrides -}}
{{- $words = append $words "--set" -}}
{{- $words = append $words . -}}
{{- end -}}
{{- $quoted := list -}}
{{- range $words -}}
{{- if contains "'" . -}}{{- fail (printf "run: %q holds a single quote, which the entrypoint cannot carry" .) -}}{{- end -}}
{{- if regexMatch "^[A-Za-z0-9_./:=@%+,-]+$" . -}}
{{- $quoted = append $quoted . -}}
{{- else -}}
{{- $quoted = append $quoted (squote .) -}}
{{- end -}}
{{- end -}}
{{- join " " $quoted -}}
{{- end -}}

{{/* Environment every Ray container gets: the control token from its Secret. */}}
{{- define "orchard.tokenEnv" -}}
- name: ORCHARD_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "orchard.tokenSecret" . }}
      key: {{ include "orchard.tokenSecretKey" . }}
{{- end -}}

{{- define "orchard.storageVolume" -}}
- name: orchard-storage
{{- if .Values.storage.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.storage.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/*
The RayCluster spec, shared by the RayCluster (mode raycluster) and the RayJob (mode rayjob).
In raycluster mode the head container runs KubeRay's generated `ray start` and, beside it,
`orchard serve`, and its probes ask the control plane's /healthz. In rayjob mode the control plane
exists only once KubeRay has submitted the job, which it does only after the head is ready, so the
head keeps KubeRay's own probes.
*/}}
{{- define "orchard.rayClusterSpec" -}}
{{- $root := . -}}
rayVersion: {{ .Values.ray.version | quote }}
enableInTreeAutoscaling: {{ .Values.ray.autoscaling }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    {{- toYaml .Values.ray.head.rayStartParams | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "orchard.labels" . | nindent 8 }}
        app.kubernetes.io/component: ray-head
      {{- if eq .Values.mode "raycluster" }}
      annotations:
        ray.io/overwrite-container-cmd: "true"
      {{- end }}
    spec:
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.ray.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.ray.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.ray.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumes:
        {{- include "orchard.storageVolume" . | nindent 8 }}
      containers:
        - name: ray-head
          image: {{ include "orchard.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          {{- if eq .Values.mode "raycluster" }}
          command: ["/bin/bash", "-c", "--"]
          args:
            - >-
              ulimit -n 65536;
              orchard serve --host 0.0.0.0 --port {{ int .Values.control.port }} --max-active-runs {{ int .Values.control.maxActiveRuns }} &
              exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"
          {{- end }}
          ports:
            - {name: gcs-server, containerPort: 6379}
            - {name: dashboard, containerPort: 8265}
            - {name: client, containerPort: 10001}
            - {name: control, containerPort: {{ int .Values.control.port }}}
          env:
            {{- include "orchard.tokenEnv" . | nindent 12 }}
            {{- if eq .Values.mode "raycluster" }}
            # `orchard serve` joins the Ray cluster of this pod when a run is created.
            - name: RAY_ADDRESS
              value: "127.0.0.1:6379"
            {{- end }}
            {{- with .Values.ray.head.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- if eq .Values.mode "raycluster" }}
          readinessProbe:
            httpGet: {path: /healthz, port: control}
            periodSeconds: 10
            failureThreshold: 3
          livenessProbe:
            httpGet: {path: /healthz, port: control}
            initialDelaySeconds: 30
            periodSeconds: 20
            failureThreshold: 3
          {{- end }}
          resources:
            {{- toYaml .Values.ray.head.resources | nindent 12 }}
          volumeMounts:
            - {name: orchard-storage, mountPath: {{ .Values.storage.mountPath }}}
workerGroupSpecs:
  {{- range .Values.ray.workerGroups }}
  - groupName: {{ .name }}
    replicas: {{ .replicas }}
    minReplicas: {{ default .replicas .minReplicas }}
    maxReplicas: {{ default .replicas .maxReplicas }}
    rayStartParams:
      {{- toYaml (default dict .rayStartParams) | nindent 6 }}
    template:
      metadata:
        labels:
          {{- include "orchard.labels" $root | nindent 10 }}
          app.kubernetes.io/component: ray-worker
      spec:
        {{- with $root.Values.imagePullSecrets }}
        imagePullSecrets:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        volumes:
          {{- include "orchard.storageVolume" $root | nindent 10 }}
          # NCCL and vLLM need more shared memory than a container's default 64 MiB.
          - name: dshm
            emptyDir: {medium: Memory}
        containers:
          - name: ray-worker
            image: {{ include "orchard.image" $root }}
            imagePullPolicy: {{ $root.Values.image.pullPolicy }}
            {{- with .env }}
            env:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            resources:
              {{- toYaml .resources | nindent 14 }}
            volumeMounts:
              - {name: orchard-storage, mountPath: {{ $root.Values.storage.mountPath }}}
              - {name: dshm, mountPath: /dev/shm}
  {{- end }}
{{- end -}}
