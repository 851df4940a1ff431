#!/usr/bin/env bash
# The test command: sets up PostgreSQL and Redis if needed, then runs every test of the
# workspace against them. Run from anywhere: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services
ensure_redis_cluster

# Test databases and keys left by earlier runs (kept for inspection until now). Their
# names carry their creation time; anything under an hour old may belong to a run still
# going on beside this one, so it stays.
cutoff=$(( $(date +%s) - 3600 ))
psql -h 127.0.0.1 -U postgres -d postgres -Atqc \
  "SELECT datname FROM pg_database WHERE datname ~ '^subledger_test_[0-9]+_' AND split_part(datname, '_', 3)::bigint < $cutoff" |
  while read -r db; do
    psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
  done
# Key names hold whatever ids signed payloads carried (quotes included): one key per line,
# no quote processing by xargs.
redis-cli -h 127.0.0.1 --scan --pattern 'test:*' |
  awk -F: -v cutoff="$cutoff" '$2 ~ /^[0-9]+$/ && $2 < cutoff' |
  xargs -r -d '\n' -n 500 redis-cli -h 127.0.0.1 del >/dev/null
# The same on each node of the cluster, one key a command (a DEL of several keys must keep
# to one slot).
for port in $REDIS_CLUSTER_PORTS; do
  redis-cli -h 127.0.0.1 -p "$port" --scan --pattern 'test:*' |
    awk -F: -v cutoff="$cutoff" '$2 ~ /^[0-9]+$/ && $2 < cutoff' |
    xargs -r -d '\n' -n 1 redis-cli -h 127.0.0.1 -p "$port" del >/dev/null
done

# The domain crate stays pure: no IO crate in its normal dependencies.
io=$(cargo tree -p aggregates -e normal --prefix none | grep -oE '^(sqlx|redis|axum|hyper|reqwest|tokio-postgres) ' | sort -u || true)
if [ -n "$io" ]; then
  echo "aggregates depends on IO crates: $io" >&2
  exit 1
fi

# Formatting and lints are part of the suite: a warning fails the run like a test.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

# The alert rules are unit-tested with promtool (Debian's prometheus package ships it),
# and the admin page is tested in headless Chromium: install both when absent.
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test: installing ${missing[*]} from Debian's packages" >&2
  apt_install "${missing[@]}"
fi
promtool check rules ops/alerts.yml
promtool test rules ops/alerts.test.yml

# The OpenAPI tests run schemathesis (PyPI) against the live service: it is installed, at a
# pinned version, into a virtualenv under target/ when absent (Debian's python3-venv first
# when Python cannot make one).
schemathesis_venv=target/tools/schemathesis
if [ ! -x "$schemathesis_venv/bin/schemathesis" ]; then
  echo "test: installing schemathesis into $schemathesis_venv" >&2
  if ! python3 -m venv "$schemathesis_venv" >/dev/null 2>&1; then
    apt_install python3-venv
    rm -rf "$schemathesis_venv"
    python3 -m venv "$schemathesis_venv"
  fi
  "$schemathesis_venv/bin/pip" install -q 'schemathesis==4.32.5'
fi
export SCHEMATHESIS="$PWD/$schemathesis_venv/bin/schemathesis"

# The TypeScript client (clients/typescript) is tested with node's test runner against the
# live service (tests/integration/openapi.rs): its dev dependencies come from npm, at the
# versions its lock file pins, whenever they are absent or older than the lock.
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
if [ ! -d clients/typescript/node_modules ] ||
  [ clients/typescript/package-lock.json -nt clients/typescript/node_modules ]; then
  (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error)
fi

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
# The cluster the tests of cluster mode use (tests/integration/cluster.rs).
export REDIS_CLUSTER_URLS="${REDIS_CLUSTER_URLS:-$(redis_cluster_urls)}"
cargo test --workspace --all-targets "$@"
