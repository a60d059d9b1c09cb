#!/usr/bin/env bash
# The long form of the fuzzing (CI runs the short one: tests/it/fuzz.rs, a few thousand mutants
# per target). Targets: fuzz/targets.rs (envelope, sealed, token, policy, config, audit_line);
# corpus: fuzz/corpus/<target>/.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 60 s, every target)
#
# - With cargo-afl installed (`cargo install cargo-afl`, stable toolchain; it builds AFL++ as it
#   installs), runs AFL++ on the targets of fuzz/afl/ (coverage-guided), one after the other,
#   output in target/afl-out/<target>/. Crashes and hangs found are listed and the script fails:
#   fix the bug, then copy the input into fuzz/corpus/<target>/ as a regression.
# - Without it (or with FUZZ_ENGINE=builtin), runs the in-tree mutational harness of
#   tests/it/fuzz.rs in release for SECONDS_PER_TARGET per target (PIIGUARD_FUZZ_SEED picks
#   another seed; failures land in target/fuzz-failures/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(envelope sealed token policy config audit_line)

if [ "${FUZZ_ENGINE:-}" != builtin ] && cargo afl --version >/dev/null 2>&1; then
    echo "fuzz: AFL++ (cargo-afl), ${SECS}s per target: ${TARGETS[*]}"
    export CARGO_TARGET_DIR="$ROOT/target/afl"
    (cd fuzz/afl && cargo afl build --release)
    # No UI, and no refusal over the machine's core_pattern or CPU governor (a CI box).
    export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
    export AFL_BENCH_UNTIL_CRASH=0 AFL_NO_AFFINITY=1
    found=0
    for t in "${TARGETS[@]}"; do
        out="$ROOT/target/afl-out/$t"
        mkdir -p "$out"
        # -V: run time in seconds; -t: per-input timeout in ms (a slower input is a hang).
        cargo afl fuzz -i "fuzz/corpus/$t" -o "$out" -V "$SECS" -t 2000 \
            -- "$CARGO_TARGET_DIR/release/$t" >"$out/fuzz.log" 2>&1 || {
            echo "fuzz: $t: afl-fuzz failed, see $out/fuzz.log"; tail -20 "$out/fuzz.log"; exit 1; }
        stats="$out/default/fuzzer_stats"
        execs=$(awk -F': *' '/^execs_done/ {print $2}' "$stats")
        paths=$(awk -F': *' '/^corpus_count/ {print $2}' "$stats")
        crashes=$(find "$out/default/crashes" "$out/default/hangs" -type f ! -name README.txt 2>/dev/null | wc -l)
        echo "fuzz: $t: $execs executions, $paths inputs in the queue, $crashes crashes or hangs"
        if [ "$crashes" -gt 0 ]; then
            find "$out/default/crashes" "$out/default/hangs" -type f ! -name README.txt
            found=1
        fi
    done
    exit $found
fi

echo "fuzz: cargo-afl not installed (or FUZZ_ENGINE=builtin): in-tree harness, ${SECS}s per target"
export PIIGUARD_FUZZ_SECS=$SECS
PIIGUARD_FUZZ_TARGETS=$(IFS=,; echo "${TARGETS[*]}")
export PIIGUARD_FUZZ_TARGETS
exec cargo test --release --test it fuzz_targets_survive_mutated_corpus -- --nocapture
