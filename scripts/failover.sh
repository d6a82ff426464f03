#!/usr/bin/env bash
# The failover series (issue 27): three coordinators over a three-member etcd cluster and
# an S3 origin (Garage) on 127.0.0.1; the leader is killed with SIGKILL again and again
# while a writer commits, and the time from each kill to the first commit the next leader
# acknowledges is measured (median and p99, also as multiples of the lease). Not part of
# .ci/run. Installs etcd and Garage first where missing.
#   bash scripts/failover.sh [KILLS] [LEASE_TTL...]
# Prints one JSON object per lease (default: 20 kills, leases of 2 s and 5 s).
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-20}
shift || true
leases=("$@")
[ ${#leases[@]} -gt 0 ] || leases=(2s 5s)
bash scripts/etcd.sh
bash scripts/garage.sh
cargo build --release -p voltool-testnet
for ttl in "${leases[@]}"; do
    ./target/release/voltool-testnet failover --kills "$kills" --lease-ttl "$ttl" --json
done
