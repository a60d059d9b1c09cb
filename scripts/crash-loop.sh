#!/usr/bin/env bash
# The long form of the kill -9 crash loop (tests/it/crash_loop.rs): N crashes (default 500) at
# random moments of a mixed workload, checking after each restart that nothing acknowledged was
# lost, no shred is half-done and the audit log verifies. CI runs the short form (50).
# Usage: scripts/crash-loop.sh [N] [SEED]   (needs OpenBao: PIIGUARD_BAO_BIN or .venv/bin/bao)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIIGUARD_CRASH_LOOPS=${1:-500}
[ -n "${2:-}" ] && export PIIGUARD_CRASH_SEED=$2
exec cargo test --test it crash_loop -- --nocapture
