#!/usr/bin/env bash
# The run command: sets up PostgreSQL and Redis if needed, then serves subledger on
# SUBLEDGER_LISTEN (default 127.0.0.1:8080). Configure it with the environment (see
# README.md); development defaults are filled in below when unset.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services

export SUBLEDGER_CATALOG="${SUBLEDGER_CATALOG:-catalog.example.toml}"
if [ -z "${STRIPE_WEBHOOK_SECRET:-}" ]; then
  echo "serve.sh: STRIPE_WEBHOOK_SECRET is unset; webhooks will be refused until it is set" >&2
fi
if [ -z "${SUBLEDGER_API_TOKEN:-}" ]; then
  echo "serve.sh: SUBLEDGER_API_TOKEN is unset; /v1 will refuse every request" >&2
fi
exec cargo run --release --bin subledger -- serve "$@"
