#!/usr/bin/env bash
# Run the evolve driver as a Ray Job on a throw-away single-node cluster, then stop that cluster only.
#
#   scripts/ray_job_submit.sh OUTPUT_DIR [section.key=value ...]       # preset shapes_cpu
#   CONFIG=/abs/path/evolve.yaml scripts/ray_job_submit.sh /tmp/evolve  # a config file over the preset
#
# The head gets its own --temp-dir and free ports, so other Ray clusters on the machine are never
# touched; it is stopped by killing the processes of that temp dir (never `ray stop`, which stops
# every cluster of the machine). Exits 0 when the job SUCCEEDED.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/ray_job_submit.sh OUTPUT_DIR [overrides...]}; shift
PRESET=${PRESET:-shapes_cpu}
CONFIG_ARGS=()
if [ -n "${CONFIG:-}" ]; then CONFIG_ARGS=(--config "$CONFIG"); fi
PY=${PYTHON:-$(pwd)/.venv/bin/python}
RAY="$(dirname "$PY")/ray"
export RAY_AUTH_MODE=disabled PATH="$(dirname "$PY"):$PATH"
TMP=$(mktemp -d /tmp/raypref_rayjob.XXXXXX)
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GCS=$(free_port); DASH=$(free_port); CLIENT=$(free_port); AGENT=$(free_port); AGENT_GRPC=$(free_port)
METRICS=$(free_port); RTENV=$(free_port); NM=$(free_port); OM=$(free_port)
stop_head() {  # kill only the processes of this head (their command lines name its temp dir)
  for pid in $(pgrep -f -- "$TMP" || true); do kill "$pid" 2>/dev/null || true; done
  sleep 2
  for pid in $(pgrep -f -- "$TMP" || true); do kill -9 "$pid" 2>/dev/null || true; done
}
trap stop_head EXIT
"$RAY" start --head --temp-dir="$TMP" --port="$GCS" --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
  --ray-client-server-port="$CLIENT" --dashboard-agent-listen-port="$AGENT" --dashboard-agent-grpc-port="$AGENT_GRPC" \
  --metrics-export-port="$METRICS" --runtime-env-agent-port="$RTENV" --node-manager-port="$NM" \
  --object-manager-port="$OM" --num-cpus="${NUM_CPUS:-4}" --include-dashboard=true --disable-usage-stats
ADDR="http://127.0.0.1:$DASH"
set +e
JOB_ID="raypref-evolve-$$"
"$RAY" job submit --address "$ADDR" --submission-id "$JOB_ID" --working-dir . -- \
  python jobs/evolve_and_train.py --preset "$PRESET" "${CONFIG_ARGS[@]}" run.output_dir="$OUT" "$@"
set -e
STATUS=$("$PY" -c "from ray.job_submission import JobSubmissionClient as C; print(C('$ADDR').get_job_status('$JOB_ID').value)" 2>/dev/null || true)
echo "job status: ${STATUS:-unknown}"
[ "$STATUS" = "SUCCEEDED" ]
