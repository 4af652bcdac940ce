#!/usr/bin/env bash
# One-shot: apply the Alembic migrations, retrying with backoff while the database does not answer
# yet (its health check can turn green a moment before it accepts this user's connections).
set -euo pipefail
cd "$(dirname "$0")/.."

deadline=$((SECONDS + ${MIGRATE_TIMEOUT_S:-60}))
delay=1
attempt=1
until alembic upgrade head; do
  if ((SECONDS + delay > deadline)); then
    echo "migrate: giving up after $attempt attempts; is the database at VLGATE_DATABASE_URL up?" >&2
    exit 1
  fi
  echo "migrate: attempt $attempt failed; retrying in ${delay}s" >&2
  sleep "$delay"
  attempt=$((attempt + 1))
  delay=$((delay * 2 > 8 ? 8 : delay * 2))
done
echo "migrate: database is at the latest revision"
