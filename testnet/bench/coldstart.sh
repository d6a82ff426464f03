#!/usr/bin/env bash
# Benchmark B8 (cold start) from issue 28: a sharded safetensors model committed on one
# agent; at the commit's acknowledgement every other agent switches to it and loads every
# tensor with safetensors' own loader (eager: reload then load; lazy: reload --lazy then
# load; follow: the download starts at the commit, reload then load). Prints one JSON
# object per run and a summary of the medians.
#
#   bash testnet/bench/coldstart.sh                 # loopback
#   NET=netns bash testnet/bench/coldstart.sh       # one network namespace per node
#
# Needs root (overlay and FUSE mounts; namespaces with NET=netns). Makes a virtualenv with
# numpy and safetensors under target/ (from PyPI) the first time.
# Env: RUNS (default 3), AGENTS (default 8), SIZE (default 134217728), RATE (default
# 50mbit), NET (loopback or netns), PLOTS (default target/coldstart-plots).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
AGENTS=${AGENTS:-8}
SIZE=${SIZE:-134217728}
RATE=${RATE:-50mbit}
NET=${NET:-loopback}
PLOTS=${PLOTS:-target/coldstart-plots}
venv="$PWD/target/coldstart-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import numpy, safetensors" 2>/dev/null ||
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "numpy>=1.26" "safetensors>=0.4"
cargo build --release -p voltool-testnet
mkdir -p "$PLOTS"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for r in $(seq "$RUNS"); do
  target/release/voltool-testnet bench --scenario coldstart --agents "$AGENTS" --size "$SIZE" \
    --rate "$RATE" --net "$NET" --python "$venv/bin/python" --plot "$PLOTS/run-$r.svg" --json |
    tee -a "$out"
done
"$venv/bin/python" - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda xs: statistics.median(xs)
summary = {"runs": len(runs), "t_min_s": med([r["t_min_s"] for r in runs])}
for m in ("eager", "lazy", "follow"):
    ms = [next(x for x in r["modes"] if x["mode"] == m) for r in runs]
    summary[m] = {k: med([x[k] for x in ms]) for k in
                  ("first_p50_ratio", "last_p50_ratio", "last_max_ratio", "origin_ratio")}
    summary[m]["wrong_tensors"] = sum(x["wrong_tensors"] for x in ms)
summary["lazy_first_to_eager_last"] = med([r["lazy_first_to_eager_last"] for r in runs])
summary["lazy_last_to_eager_last"] = med([r["lazy_last_to_eager_last"] for r in runs])
print(json.dumps({"summary": summary}, indent=1))
PY
