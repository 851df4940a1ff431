#!/usr/bin/env bash
# The test command: sets up PostgreSQL and Redis if needed, then runs every test of the
# workspace against them. Run from anywhere: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services

# Test databases and keys left by earlier runs (kept for inspection until now).
psql -h 127.0.0.1 -U postgres -d postgres -Atqc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'subledger\_test\_%'" |
  while read -r db; do
    psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
  done
redis-cli -h 127.0.0.1 --scan --pattern 'test:*' | xargs -r -n 500 redis-cli -h 127.0.0.1 del >/dev/null

# The domain crate stays pure: no IO crate in its normal dependencies.
io=$(cargo tree -p aggregates -e normal --prefix none | grep -oE '^(sqlx|redis|axum|hyper|reqwest|tokio-postgres) ' | sort -u || true)
if [ -n "$io" ]; then
  echo "aggregates depends on IO crates: $io" >&2
  exit 1
fi

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
cargo test --workspace --all-targets "$@"
