#!/usr/bin/env bash
# Prometheus scraping a running Orchard control plane, so that a run's real series can be browsed
# (and shown by the Grafana dashboards of deploy/grafana).
#
#   deploy/dashboards.sh [CONTROL_PLANE_URL]        # or: make dashboards [URL=...]
#
# CONTROL_PLANE_URL defaults to $ORCHARD_URL, else http://127.0.0.1:8470 (where `orchard run`
# serves its control plane unless `--set control.port=...` says otherwise). Start the run first or
# afterwards: Prometheus retries the target until it answers.
#
# Environment:
#   PROM_HOST        address Prometheus listens on (127.0.0.1)
#   PROM_PORT        its port (9090, the port the provisioned Grafana data source uses)
#   SCRAPE_INTERVAL  how often /metrics is scraped (5s)
#
# Prometheus runs in the foreground with its storage in a temporary directory, removed when it
# stops (Ctrl-C). When the `prometheus` binary is missing and this runs as root on Debian/Ubuntu,
# Debian's `prometheus` package is installed first.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
URL="${1:-${ORCHARD_URL:-http://127.0.0.1:8470}}"
PROM_HOST="${PROM_HOST:-127.0.0.1}"
PROM_PORT="${PROM_PORT:-9090}"
SCRAPE_INTERVAL="${SCRAPE_INTERVAL:-5s}"

fail() {
  echo "dashboards: $*" >&2
  exit 1
}

# ---------------------------------------------------------------- the control plane's address
case "$URL" in
  http://* | https://*) ;;
  *) fail "control plane URL must start with http:// or https:// (got '$URL')" ;;
esac
scheme="${URL%%://*}"
rest="${URL#*://}"
target="${rest%%/*}"
prefix=""
if [[ "$rest" == */* ]]; then
  prefix="/${rest#*/}"
  prefix="${prefix%/}"
fi
[ -n "$target" ] || fail "no host in control plane URL '$URL'"
if [[ "$target" != *:* ]]; then
  if [ "$scheme" = https ]; then target="$target:443"; else target="$target:80"; fi
fi
metrics_path="$prefix/metrics"

# ---------------------------------------------------------------- the prometheus binary
if ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "dashboards: installing Debian's prometheus package" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # On a systemd machine the package starts its own service on :9090; this script runs its own.
    if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
      systemctl stop prometheus
      echo "dashboards: stopped the prometheus service the package started (systemctl start prometheus restarts it)" >&2
    fi
  else
    fail "prometheus not found: install it (Debian/Ubuntu: apt-get install prometheus) or put it on PATH"
  fi
fi

port_answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if port_answers "$PROM_HOST" "$PROM_PORT"; then
  fail "$PROM_HOST:$PROM_PORT is already in use (Debian's prometheus service? systemctl stop prometheus), or choose another port: PROM_PORT=9091"
fi
host="${target%:*}"
host="${host#[}"
host="${host%]}"
if ! port_answers "$host" "${target##*:}"; then
  echo "dashboards: nothing answers at $target yet; start a run (orchard run) and Prometheus will pick it up" >&2
fi

# ---------------------------------------------------------------- config, storage, run
data="$(mktemp -d -t orchard-prometheus.XXXXXX)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$data"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cat >"$data/prometheus.yml" <<EOF
# Written by deploy/dashboards.sh for $URL; see deploy/prometheus/prometheus.yml.
global:
  scrape_interval: $SCRAPE_INTERVAL
  evaluation_interval: $SCRAPE_INTERVAL
scrape_configs:
  - job_name: orchard
    scheme: $scheme
    metrics_path: $metrics_path
    static_configs:
      - targets: ["$target"]
EOF

browse="http://$PROM_HOST:$PROM_PORT"
cat <<EOF
Prometheus at $browse scraping $scheme://$target$metrics_path every $SCRAPE_INTERVAL
  targets:     $browse/targets
  a series:    $browse/graph?g0.expr=orchard_learner_step&g0.tab=0&g0.range_input=15m
  the API:     $browse/api/v1/query?query=orchard_learner_step
Storage in $data (removed on exit). Ctrl-C to stop.

Grafana (not packaged by Debian) with the Orchard data source and dashboard, on the host network:
  docker run --rm --network host \\
    -v "$REPO/deploy/grafana/provisioning:/etc/grafana/provisioning:ro" \\
    -v "$REPO/deploy/grafana/dashboards:/var/lib/grafana/dashboards/orchard:ro" \\
    grafana/grafana
  then browse http://127.0.0.1:3000 (admin / admin): Dashboards > Orchard > Orchard run.
  Or Grafana's own package (https://apt.grafana.com, apt-get install grafana): copy
  deploy/grafana/provisioning/* to /etc/grafana/provisioning/ and deploy/grafana/dashboards/*.json
  to /var/lib/grafana/dashboards/orchard/, then restart grafana-server.
EOF
if [ "$PROM_PORT" != 9090 ] || [ "$PROM_HOST" != 127.0.0.1 ]; then
  echo "  The provisioned data source expects http://127.0.0.1:9090: edit its url in"
  echo "  deploy/grafana/provisioning/datasources/prometheus.yaml to $browse."
fi
echo

prometheus \
  --config.file="$data/prometheus.yml" \
  --storage.tsdb.path="$data/tsdb" \
  --storage.tsdb.retention.time=1d \
  --web.listen-address="$PROM_HOST:$PROM_PORT" \
  --log.level=warn &
pid=$!
status=0
wait "$pid" || status=$?
pid=""
exit "$status"
