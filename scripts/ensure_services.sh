#!/usr/bin/env bash
# Make sure the services the tests use answer, installing and starting them on a fresh machine:
# Redis on 127.0.0.1:6379 and Postgres on 127.0.0.1:5432 with a database "test" that user postgres
# reaches without a password. Idempotent; when both already answer it only checks (well under 1 s).
# REDIS_PORT, PG_PORT and PG_DATABASE override the defaults (used to try the script on the side).
# It also installs promtool (Debian's prometheus package) for tests/test_promtool.py, unless PROMTOOL=skip;
# that install is best effort: without it the test skips and says why.
set -euo pipefail

REDIS_PORT="${REDIS_PORT:-6379}"
PG_PORT="${PG_PORT:-5432}"
PG_DATABASE="${PG_DATABASE:-test}"
PROMTOOL="${PROMTOOL:-install}"
SUDO=""
if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo -n"; fi
apt_updated=""

say() { echo "ensure_services: $*" >&2; }  # stderr: stdout carries function results

apt_install() {
  say "installing $*"
  if [[ -z "$apt_updated" ]]; then $SUDO apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Poll a check command until it succeeds or the timeout (seconds) passes.
wait_for() {
  local timeout=$1; shift
  local end=$((SECONDS + timeout))
  until "$@"; do
    if ((SECONDS >= end)); then return 1; fi
    sleep 0.2
  done
}

redis_answers() {
  # Speak RESP over bash's /dev/tcp: needs no redis-cli and takes milliseconds.
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT && printf 'PING\r\n' >&3 \
    && IFS= read -r -t 1 reply <&3 && [[ \$reply == +PONG* ]]" 2>/dev/null
}

ensure_redis() {
  if redis_answers; then say "redis answers on 127.0.0.1:$REDIS_PORT"; return; fi
  if ! command -v redis-server >/dev/null; then
    apt_install redis-server
    # The package may have started its own server on the default port.
    if wait_for 3 redis_answers; then say "redis installed and answering"; return; fi
  fi
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /var/lib/redis --logfile "/var/log/redis/ci-$REDIS_PORT.log"
  wait_for 10 redis_answers || { say "redis did not start; see /var/log/redis/ci-$REDIS_PORT.log"; exit 1; }
  say "started redis on 127.0.0.1:$REDIS_PORT"
}

psql_postgres() {
  # -w: never prompt; with trust auth for 127.0.0.1 no password is needed.
  PGCONNECT_TIMEOUT=3 psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -w -X -q -At "$@"
}

pg_answers() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2; }

# Print "version name" of the cluster configured on PG_PORT (pg_lsclusters: Ver Cluster Port ...).
pg_cluster() { pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$3 == port {print $1, $2; exit}'; }

ensure_pg_cluster() {
  if ! command -v pg_lsclusters >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt_install postgresql
  fi
  local cluster
  cluster="$(pg_cluster)"
  if [[ -z "$cluster" ]]; then
    local version
    version="$(basename "$(ls -d /usr/lib/postgresql/*/ | sort -V | tail -n 1)")"
    say "creating postgres cluster $version/main on port $PG_PORT"
    $SUDO pg_createcluster "$version" main --port "$PG_PORT" >/dev/null
    cluster="$version main"
  fi
  echo "$cluster"
}

ensure_trust_auth() {
  local version=$1 name=$2
  local hba="/etc/postgresql/$version/$name/pg_hba.conf"
  say "allowing password-less connections from 127.0.0.1 and ::1 in $hba"
  # pg_hba.conf is first-match, so the trust lines go on top.
  $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" "$name" reload
}

ensure_postgres() {
  local version="" name=""
  if ! command -v pg_isready >/dev/null || ! pg_answers; then
    local cluster
    cluster="$(ensure_pg_cluster)"  # an assignment, so that a failure inside stops the script
    read -r version name <<<"$cluster"
    if ! pg_answers; then
      say "starting postgres cluster $version/$name"
      $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start || true
      wait_for 30 pg_answers || { say "postgres did not start on 127.0.0.1:$PG_PORT"; exit 1; }
    fi
  fi
  if ! psql_postgres -d postgres -c 'select 1' >/dev/null 2>&1; then
    [[ -n "$version" ]] || read -r version name <<<"$(pg_cluster)"
    [[ -n "$version" ]] || { say "postgres on port $PG_PORT refuses user postgres and is not a local cluster"; exit 1; }
    ensure_trust_auth "$version" "$name"
    wait_for 5 psql_postgres -d postgres -c 'select 1' >/dev/null 2>&1 \
      || { say "user postgres still cannot connect without a password"; exit 1; }
  fi
  if [[ "$(psql_postgres -d postgres -c "select 1 from pg_database where datname = '$PG_DATABASE'")" != 1 ]]; then
    psql_postgres -d postgres -c "create database \"$PG_DATABASE\"" >/dev/null
    say "created database $PG_DATABASE"
  fi
  say "postgres answers on 127.0.0.1:$PG_PORT (database $PG_DATABASE)"
}

# promtool lints the /metrics expositions. Measured on Debian 12 (2 cores): 10-13 s (apt-get update included),
# 19 MB downloaded, 96 MB installed, beside a suite of ~10 minutes; then a check only. The package's
# Prometheus server is not wanted running: where the package started it (systemd hosts), it is stopped.
ensure_promtool() {
  if command -v promtool >/dev/null; then say "promtool present"; return; fi
  if [[ "$PROMTOOL" == skip ]]; then say "PROMTOOL=skip: tests/test_promtool.py will skip"; return; fi
  if ! (apt_install prometheus); then
    say "could not install prometheus (promtool): tests/test_promtool.py will skip"
    return
  fi
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  say "promtool installed: $(promtool --version 2>&1 | head -n 1)"
}

ensure_redis
ensure_postgres
ensure_promtool
