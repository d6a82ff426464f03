#!/usr/bin/env bash
# Chaos trials (issue 11): random operations and faults on a fleet of real processes,
# checked against a model. Needs root (a tmpfs for the agent whose disk fills, overlay
# mounts). Not part of .ci/run: 200 trials take about an hour on 2 cores.
#   bash scripts/chaos.sh [TRIALS] [SEED]
# Prints one JSON object; a failing trial prints its seed and keeps its directory.
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-200}
seed=${2:-1}
cargo build --release -p voltool-testnet
# Trials start their nodes from the running binary's own path: run a copy, so a rebuild
# of target/ during the hour does not pull the file out from under the remaining trials.
bin=$(mktemp -d /tmp/voltool-chaos-bin.XXXXXX)
trap 'rm -rf "$bin"' EXIT
cp ./target/release/voltool-testnet "$bin/"
"$bin/voltool-testnet" chaos --trials "$trials" --seed "$seed" --json
