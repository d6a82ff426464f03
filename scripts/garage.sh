#!/usr/bin/env bash
# Installs Garage (an S3-compatible object store, https://garagehq.deuxfleurs.fr), the real
# S3 server the tests of the origin-on-S3 start, at a pinned version; does nothing when that
# version is installed already. Built from crates.io with only what a test server needs:
# LMDB metadata with its bundled C sources (no metrics, no SQLite, no K2V API).
# A cold build takes about 5 minutes on 2 cores.
set -euo pipefail
version=2.5.0
bin="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "[: v]$version "; then
    exit 0
fi
echo "installing garage $version (cargo install) ..." >&2
cargo install --locked --quiet garage --version "$version" \
    --no-default-features --features bundled-libs,lmdb
