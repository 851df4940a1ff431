#!/usr/bin/env bash
# The benchmark: one command, one run, every figure (see benches/harness.rs).
#   ./bench/run.sh            full run (3000 customers, 1M-event replay, 10-minute soak, peer)
#   ./bench/run.sh --quick    a short smoke run
# Options pass through: --customers N --read-secs N --replay-events N --soak-secs N
# --no-peer --no-write --only ingest (the ingestion phase alone). Figures are printed and
# appended to BENCHMARKS.md. An option the harness does not know is refused (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  sed -n '2,7s/^# \{0,1\}//p' bench/run.sh
  exit 0
fi
source scripts/services.sh
ensure_services
command -v pgbench >/dev/null || apt_install postgresql-client
command -v redis-benchmark >/dev/null || apt_install redis-tools
# The read phase's load generator: a C program with one thread, so that as much of the
# machine as possible is left to the server (benches/harness.rs, `wrk_reads`).
command -v wrk >/dev/null || apt_install wrk
if [[ " $* " != *" --no-peer "* ]]; then
  command -v npm >/dev/null || apt_install nodejs npm
  (cd bench/peer && npm ci --no-audit --no-fund --silent)
fi
exec cargo bench --bench harness -- "$@"
