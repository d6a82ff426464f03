#!/usr/bin/env bash
# The whole test suite: the Rust workspace (real nodes on 127.0.0.1 in temp dirs), then the
# Python package against a real local fleet. Installs what the Python side needs into a
# virtualenv under target/ (maturin and pytest from PyPI); needs cargo and python3 (3.9+).
# VOLTOOL_SNAPSHOTS=copy runs it all on the copy fallback instead of overlay snapshots.
# The tests of the origin on S3 start a real Garage server: scripts/garage.sh installs the
# pinned version (once; about 5 minutes cold), and those tests then refuse to skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/garage.sh
export VOLTOOL_REQUIRE_S3=1
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
