#!/usr/bin/env bash
# Worker container: one Celery worker holding one model copy on the one GPU this container sees.
# The solo pool runs tasks in the main process, so the model is loaded once and never forked.
set -euo pipefail
cd "$(dirname "$0")/.."

log_dir="${VLGATE_LOG_DIR:-}"
if [[ -n "$log_dir" && -d "$log_dir" && -w "$log_dir" ]]; then
  # Keep stdout for `docker compose logs` and also append to the logs volume, one file per worker.
  exec > >(tee -a "$log_dir/worker-${VLGATE_WORKER_ID:-$(hostname)}.log") 2>&1
fi

exec celery -A worker.celery_app:app worker --pool solo --concurrency 1 -Q chat,batch \
  -n 'worker@%h' --loglevel "${CELERY_LOGLEVEL:-INFO}"
