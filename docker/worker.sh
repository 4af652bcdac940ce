#!/usr/bin/env bash
# Worker container: one Celery worker per GPU this container sees (VLGATE_GPUS, default all), each
# pinned to its device and holding one model copy. The supervisor restarts a worker that dies (a GPU
# that stays broken exits 75) with backoff, without touching the others, and forwards SIGTERM so
# that every worker finishes its generation (Celery's warm shutdown) before the container stops.
set -euo pipefail
cd "$(dirname "$0")/.."

log_dir="${VLGATE_LOG_DIR:-}"
if [[ -n "$log_dir" && -d "$log_dir" && -w "$log_dir" ]]; then
  # Keep stdout for `docker compose logs` and also append to the logs volume, one file per container
  # (each line starts with the worker's name, e.g. "worker gpu1 |").
  exec > >(tee -a "$log_dir/worker-${VLGATE_WORKER_ID:-$(hostname)}.log") 2>&1
fi

# Stop within compose's stop_grace_period (5m): kill what is still generating after 290 s.
exec python scripts/supervise.py --stop-timeout "${WORKER_STOP_TIMEOUT_S:-290}" \
  --loglevel "${CELERY_LOGLEVEL:-INFO}"
