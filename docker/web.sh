#!/usr/bin/env bash
# Web container: serve the API under gunicorn. The worker class and its threads (one per open stream:
# docs/streams.md) come from gunicorn.conf.py; --timeout 0 because token streams stay open as long as a generation.
set -euo pipefail
cd "$(dirname "$0")/.."

log_dir="${VLGATE_LOG_DIR:-}"
if [[ -n "$log_dir" && -d "$log_dir" && -w "$log_dir" ]]; then
  # Keep stdout for `docker compose logs` and also append to the logs volume.
  exec > >(tee -a "$log_dir/web.log") 2>&1
fi

exec gunicorn -w "${GUNICORN_WORKERS:-2}" \
  -b "0.0.0.0:${VLGATE_WEB_PORT:-8501}" --timeout 0 --graceful-timeout 30 \
  --access-logfile - --error-logfile - \
  "web:create_app()"
