#!/usr/bin/env bash
# Chaos trials (issue 11): random operations and faults on a fleet of real processes,
# checked against a model. Needs root (a tmpfs for the agent whose disk fills, overlay
# mounts). Not part of .ci/run: 200 trials take about 35 minutes on 2 cores.
#   bash scripts/chaos.sh [TRIALS] [SEED] [--ha]
# With --ha, the coordinators run in failover (three over a three-member etcd cluster, the
# origin in Garage) and the faults of failover strike too; etcd and Garage are installed
# first where missing.
# Prints one JSON object; a failing trial prints its seed and keeps its directory.
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-200}
seed=${2:-1}
ha=()
if [ "${3:-}" = "--ha" ]; then
    ha=(--ha)
    bash scripts/etcd.sh
    bash scripts/garage.sh
fi
cargo build --release -p voltool-testnet
# Trials start their nodes from the running binary's own path: run a copy, so a rebuild
# of target/ during the hour does not pull the file out from under the remaining trials.
bin=$(mktemp -d /tmp/voltool-chaos-bin.XXXXXX)
trap 'rm -rf "$bin"' EXIT
cp ./target/release/voltool-testnet "$bin/"
"$bin/voltool-testnet" chaos --trials "$trials" --seed "$seed" "${ha[@]}" --json
