#!/usr/bin/env bash
# Makes sure PostgreSQL and Redis answer on 127.0.0.1 (5432 and 6379), as subledger's
# defaults expect: starts them when stopped, installs Debian's packages when absent.
# Sourced by serve.sh and test.sh; safe to run again and again.
set -euo pipefail

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq "$@" >/dev/null
}

# wait_for CHECK TRIES DELAY WHAT: runs CHECK until it succeeds, TRIES times at most.
wait_for() {
  local check=$1 tries=$2 delay=$3 what=$4
  for _ in $(seq 1 "$tries"); do
    "$check" && return 0
    sleep "$delay"
  done
  echo "services: $what does not answer" >&2
  return 1
}

postgres_answers() {
  psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1
}

ensure_postgres() {
  postgres_answers && return 0
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "services: installing PostgreSQL from Debian's packages" >&2
    apt_install postgresql postgresql-client
  fi
  local version cluster_conf
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$version" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    as_root pg_createcluster "$version" main >/dev/null
  fi
  cluster_conf="/etc/postgresql/$version/main"
  if ! as_root grep -q '^host all all 127.0.0.1/32 trust' "$cluster_conf/pg_hba.conf"; then
    # A development/CI database: trust local TCP connections, as subledger's default URL
    # (postgres://postgres@127.0.0.1:5432) expects.
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$cluster_conf/pg_hba.conf"
  fi
  echo "services: starting PostgreSQL $version" >&2
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
    || as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload 2>/dev/null || true
  wait_for postgres_answers 60 0.5 "PostgreSQL on 127.0.0.1:5432"
}

redis_answers() {
  [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]
}

ensure_redis() {
  redis_answers && return 0
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "services: installing Redis from Debian's packages" >&2
    apt_install redis-server
  fi
  echo "services: starting Redis" >&2
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/subledger-redis.log
  wait_for redis_answers 40 0.25 "Redis on 127.0.0.1:6379"
}

ensure_services() {
  if ! command -v psql >/dev/null 2>&1; then apt_install postgresql-client; fi
  ensure_postgres
  ensure_redis
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_services
fi
