#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) with cargo-fuzz, on a nightly
# toolchain (installed with rustup if missing; skipped, saying so, if it cannot be had).
# Corpora live in fuzz/corpus/<target> (not committed); a crash stops the run and leaves
# its input in fuzz/artifacts/<target>. Prints the seconds and runs of each target.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal >/dev/null 2>&1 || {
        echo "no nightly toolchain can be installed here: fuzzing skipped" >&2
        exit 0
    }
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build -O >/dev/null
for t in $targets; do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 \
        >"$log" 2>&1 || { tail -40 "$log"; echo "fuzz target $t failed" >&2; exit 1; }
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    echo "$t: ${secs}s, $runs runs, no crash"
    rm -f "$log"
done
