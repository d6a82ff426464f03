#!/usr/bin/env bash
# The whole test suite: the Rust workspace (real nodes on 127.0.0.1 in temp dirs), then the
# Python package against a real local fleet. Installs what the Python side needs into a
# virtualenv under target/ (maturin and pytest from PyPI); needs cargo and python3 (3.9+).
# Runs as root (overlay and tmpfs mounts, programs run as an unprivileged user); with
# VOLTOOL_SNAPSHOTS=overlay or =copy set it runs that one pass only.
# The tests of the origin on S3 start a real Garage server: scripts/garage.sh installs the
# pinned version (once; about 5 minutes cold); without it those tests fail. The tests of
# coordinators in failover start a three-member etcd cluster: scripts/etcd.sh installs etcd
# from Debian's packages where it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# Two passes, each mode forced by name: overlay snapshots (an agent that cannot mount them
# refuses to start, so the pass fails rather than falling back), then the copy fallback.
# Tests that do not depend on the mode run in the first pass only.
if [ -z "${VOLTOOL_SNAPSHOTS:-}" ]; then
    VOLTOOL_SNAPSHOTS=overlay bash "$0"
    VOLTOOL_SNAPSHOTS=copy bash "$0"
    exit 0
fi
echo "== the suite with VOLTOOL_SNAPSHOTS=$VOLTOOL_SNAPSHOTS"
bash scripts/garage.sh
bash scripts/etcd.sh
# Tests that need root, overlay mounts, a tmpfs, namespaces or another user fail without
# them instead of checking nothing.
cargo test --workspace
# The binaries the Python fixture starts (debug), with the very feature set of the test
# build above, so nothing is compiled twice.
cargo build --workspace --all-targets
venv="$PWD/target/py-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "maturin>=1.9.4,<2" "pytest>=8"
# The extension, built in place (abi3; maturin sets PYO3_BUILD_EXTENSION_MODULE).
(cd python && VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop -q)
VOLTOOL_BIN_DIR="$PWD/target/debug" "$venv/bin/python" -m pytest -q python/tests
