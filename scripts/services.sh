#!/usr/bin/env bash
# Makes sure PostgreSQL and Redis answer on 127.0.0.1 (5432 and 6379), as subledger's
# defaults expect (ensure_services), and, for the tests of cluster mode, that a three-node
# Redis Cluster answers on 127.0.0.1:7101-7103 (ensure_redis_cluster): starts them when
# stopped, installs Debian's packages when absent. Sourced by serve.sh and test.sh; safe
# to run again and again.
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

# A Redis Cluster of three masters on loopback ports, for the tests of cluster mode
# (SUBLEDGER_REDIS_CLUSTER): REDIS_CLUSTER_PORTS (default 7101-7103), each node's files
# under /tmp/subledger-redis-cluster/PORT. Safe to run again and again, and from runs
# beside each other: a formed cluster is left alone; nodes that stopped are started again
# (they find each other from their nodes.conf); a cluster that does not come back whole
# (stale or mismatched nodes.conf) is reset and created afresh (it holds only test keys).
REDIS_CLUSTER_PORTS=${REDIS_CLUSTER_PORTS:-"7101 7102 7103"}
REDIS_CLUSTER_DIR=/tmp/subledger-redis-cluster

# Whether every node sees the whole cluster, healthy.
redis_cluster_ok() {
  local port info
  for port in $REDIS_CLUSTER_PORTS; do
    info=$(redis-cli -h 127.0.0.1 -p "$port" cluster info 2>/dev/null) || return 1
    grep -q '^cluster_state:ok' <<<"$info" || return 1
    grep -q "^cluster_known_nodes:$(wc -w <<<"$REDIS_CLUSTER_PORTS")" <<<"$info" || return 1
    grep -q '^cluster_slots_assigned:16384' <<<"$info" || return 1
  done
}

ensure_redis_cluster() {
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "services: installing Redis from Debian's packages" >&2
    apt_install redis-server
  fi
  mkdir -p "$REDIS_CLUSTER_DIR"
  # One run at a time forms it; the others wait and then find it whole.
  local lock
  exec {lock}>"$REDIS_CLUSTER_DIR/lock"
  flock "$lock"
  if redis_cluster_ok; then
    flock -u "$lock"
    return 0
  fi
  local port nodes=() started=0
  for port in $REDIS_CLUSTER_PORTS; do
    nodes+=("127.0.0.1:$port")
    if [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" != PONG ]; then
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "services: something that is not Redis listens on 127.0.0.1:$port (set REDIS_CLUSTER_PORTS)" >&2
        flock -u "$lock"
        return 1
      fi
      mkdir -p "$REDIS_CLUSTER_DIR/$port"
      redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --cluster-enabled yes \
        --cluster-config-file nodes.conf --cluster-node-timeout 5000 --save "" --appendonly no \
        --dir "$REDIS_CLUSTER_DIR/$port" --logfile "$REDIS_CLUSTER_DIR/$port/redis.log"
      started=1
    elif ! redis-cli -h 127.0.0.1 -p "$port" cluster info >/dev/null 2>&1; then
      echo "services: the Redis on 127.0.0.1:$port is not cluster-enabled (set REDIS_CLUSTER_PORTS)" >&2
      flock -u "$lock"
      return 1
    fi
  done
  local redis_cluster_node_answers
  for port in $REDIS_CLUSTER_PORTS; do
    redis_cluster_node_answers() { [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; }
    wait_for redis_cluster_node_answers 40 0.25 "Redis Cluster node on 127.0.0.1:$port"
  done
  # Nodes started again from their nodes.conf meet again within seconds.
  if [ "$started" = 1 ] && grep -q 'myself,master .* connected [0-9]' "$REDIS_CLUSTER_DIR"/*/nodes.conf 2>/dev/null; then
    wait_for redis_cluster_ok 20 0.5 "Redis Cluster (from nodes.conf)" 2>/dev/null || true
  fi
  if ! redis_cluster_ok; then
    echo "services: creating the Redis Cluster on ${nodes[*]}" >&2
    for port in $REDIS_CLUSTER_PORTS; do
      redis-cli -h 127.0.0.1 -p "$port" flushall >/dev/null
      redis-cli -h 127.0.0.1 -p "$port" cluster reset hard >/dev/null
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
    wait_for redis_cluster_ok 60 0.5 "Redis Cluster on ${nodes[*]}"
  fi
  flock -u "$lock"
}

# The cluster's nodes as subledger's REDIS_URL takes them in cluster mode.
redis_cluster_urls() {
  local port urls=()
  for port in $REDIS_CLUSTER_PORTS; do urls+=("redis://127.0.0.1:$port"); done
  (IFS=,; echo "${urls[*]}")
}

ensure_services() {
  if ! command -v psql >/dev/null 2>&1; then apt_install postgresql-client; fi
  ensure_postgres
  ensure_redis
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_services
fi
