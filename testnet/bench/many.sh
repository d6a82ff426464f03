#!/usr/bin/env bash
# Benchmark B4 (many files) from shared/BENCH.md: a volume of FILES files of FILE_KIB KiB
# (1000 to a directory), on a fresh fleet of a coordinator and 2 agents each run: commit on
# agent-0, cold reload on agent-1, commit of one changed file, reload after it, no-op reload;
# against `rsync -a` of the same tree to an rsync daemon on loopback (plus one sync) in the
# same run; the peak RSS of the agents and the coordinator (B6). Prints one JSON object per
# run and a summary of the medians (ratios: the median of each run's own ratio).
#
#   cargo build --release && bash testnet/bench/many.sh
#
# Needs: python3 (writes the tree), sha256sum; optionally rsync (apt-get install -y rsync):
# when it is missing the rsync figures are null and "rsync" says so, nothing is installed.
# Env: FILES (default 100000), FILE_KIB (default 4), RUNS (default 3), BIN (default
# target/release), LOGS_DIR (optional: keep every node's log of every run there),
# FOLLOW=1: a third agent mounts the volume with --follow from the start; once it holds the
# committed version (follow_held_s, from the commit's end), and after agent-1's cold
# reload, it reloads: all FILES files new to it, the switch prepared during its download
# (follow_reload_s, and follow_reload_vs_cold against agent-1's cold reload).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release}
FILES=${FILES:-100000}
FILE_KIB=${FILE_KIB:-4}
RUNS=${RUNS:-3}
LOGS_DIR=${LOGS_DIR:-}
FOLLOW=${FOLLOW:-0}
PER_DIR=1000
VT="$BIN/voltool"
for b in "$VT" "$BIN/voltool-testnet"; do
  [ -x "$b" ] || { echo "no $b: cargo build --release (or set BIN)" >&2; exit 1; }
done
command -v python3 >/dev/null || { echo "many.sh needs python3 to write the tree" >&2; exit 1; }
ROOT=$(mktemp -d /tmp/voltool-bench-many.XXXXXX)
FLEET=""
RSYNCD_PID=""

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -n "$FLEET" ]; then
    for l in "$FLEET"/*/log; do
      [ -f "$l" ] && { echo "== last lines of $l" >&2; tail -n 20 "$l" >&2; }
    done
  fi
  [ -n "$RSYNCD_PID" ] && kill "$RSYNCD_PID" 2>/dev/null || true
  [ -n "$FLEET" ] && "$BIN/voltool-testnet" down --root "$FLEET" >/dev/null 2>&1 || true
  # What an interrupted run left mounted under the root (mount points stay after a stop).
  awk -v r="$ROOT" 'index($5, r) == 1 { print $5 }' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$ROOT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
# a / b * k, or null when b is null.
div() { if [ "$2" = null ]; then echo null; else awk -v a="$1" -v b="$2" -v k="${3:-1}" -v p="${4:-2}" 'BEGIN { printf "%.*f", p, a / b * k }'; fi; }
field() { grep -o "\"$2\":[0-9.]*" "$1" | head -1 | cut -d: -f2; }
rss_mib() { awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$(cat "$1/pid")/status" 2>/dev/null || echo null; }
# Sorted "sha256  ./path" of every file under a directory (following a mount's link).
sums() { (cd "$1/" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum); }

# rsync daemon on loopback, one module, writing under the temp root.
source testnet/bench/rsyncd.sh
[ "$RSYNC" = ok ] || echo "many.sh: rsync $RSYNC (rsync figures null)" >&2

# FILES files of SIZE random bytes, PER_DIR to a directory: dNNNNN/fNNNNNNN.
gen() {
  python3 - "$1" "$FILES" $((FILE_KIB * 1024)) "$PER_DIR" <<'PY'
import os, sys
root, n, size, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(n):
    d = os.path.join(root, "d%05d" % (i // per))
    if i % per == 0:
        os.makedirs(d, exist_ok=True)
    fd = os.open(os.path.join(d, "f%07d" % i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, os.urandom(size))
    os.close(fd)
PY
}

OK=1
for run in $(seq "$RUNS"); do
  SRC="$ROOT/src"; M0="$ROOT/m0-$run"; M1="$ROOT/m1-$run"; M2="$ROOT/m2-$run"
  equal=true
  rm -rf "$SRC"; mkdir -p "$SRC"
  t=$(now); gen "$SRC"; sync; t_gen=$(elapsed "$t")
  sums "$SRC" > "$ROOT/src.sums"

  # Reference: rsync -a of the tree to the daemon, then one sync.
  t_rsync=null
  if [ "$RSYNC" = ok ]; then
    rm -rf "$ROOT/rsync-dst"; mkdir -p "$ROOT/rsync-dst"
    sync
    t=$(now)
    if rsync -a "$SRC/" "rsync://127.0.0.1:$RPORT/bench/" && sync; then
      t_rsync=$(elapsed "$t")
    else
      echo "many.sh: rsync failed in run $run (rsync_s null)" >&2
    fi
    rm -rf "$ROOT/rsync-dst"; mkdir -p "$ROOT/rsync-dst"
  fi

  # voltool: a fresh fleet, so the reload on agent-1 is cold.
  FLEET="$ROOT/fleet-$run"
  AGENTS=2; [ "$FOLLOW" = 1 ] && AGENTS=3
  "$BIN/voltool-testnet" up --agents "$AGENTS" --root "$FLEET" >/dev/null
  A0="$FLEET/agent-0"; A1="$FLEET/agent-1"; A2="$FLEET/agent-2"
  "$VT" --agent "$A0" volume create many >/dev/null
  "$VT" --agent "$A0" mount many "$M0" >/dev/null
  "$VT" --agent "$A1" mount many "$M1" >/dev/null
  [ "$FOLLOW" = 1 ] && "$VT" --agent "$A2" mount many "$M2" --follow >/dev/null
  t=$(now); cp -a "$SRC/." "$M0/"; sync; t_copy=$(elapsed "$t")

  sync
  t=$(now); "$VT" --agent "$A0" commit --json > "$ROOT/commit.json"; t_commit=$(elapsed "$t")
  t_follow_held=null
  if [ "$FOLLOW" = 1 ]; then
    # Until the follower holds the version whole, its switch prepared.
    t=$(now)
    version=$(field "$ROOT/commit.json" version)
    until "$VT" --agent "$A2" status --json | python3 -c "import json,sys; f=json.load(sys.stdin)['follows']; sys.exit(0 if f and f[0]['held']==$version and f[0]['bytes_to_go']==0 else 1)"; do
      sleep 0.05
    done
    t_follow_held=$(elapsed "$t")
  fi
  sync
  t=$(now); "$VT" --agent "$A1" reload --json > "$ROOT/reload.json"; t_reload=$(elapsed "$t")
  t_follow_reload=null; follow_prepared=null
  if [ "$FOLLOW" = 1 ]; then
    t=$(now); "$VT" --agent "$A2" reload --json > "$ROOT/reload-f.json"; t_follow_reload=$(elapsed "$t")
    follow_prepared=$(grep -o '"prepared":[a-z]*' "$ROOT/reload-f.json" | cut -d: -f2)
    sums "$M2" > "$ROOT/m2.sums"
    cmp -s "$ROOT/src.sums" "$ROOT/m2.sums" || { equal=false; echo "run $run: the follower's reload differs from the source" >&2; }
  fi
  t=$(now); sums "$M1" > "$ROOT/m1.sums"; t_verify=$(elapsed "$t")
  cmp -s "$ROOT/src.sums" "$ROOT/m1.sums" || { equal=false; echo "run $run: cold reload differs from the source" >&2; }

  # One file changed: new random bytes, same size.
  i=$((FILES / 2))
  victim=$(printf 'd%05d/f%07d' $((i / PER_DIR)) "$i")
  head -c $((FILE_KIB * 1024)) /dev/urandom > "$M0/$victim"
  sync
  t=$(now); "$VT" --agent "$A0" commit --json > "$ROOT/commit1.json"; t_commit1=$(elapsed "$t")
  sync
  t=$(now); "$VT" --agent "$A1" reload --json > "$ROOT/reload1.json"; t_reload1=$(elapsed "$t")
  sync
  t=$(now); "$VT" --agent "$A1" reload --json > "$ROOT/reload0.json"; t_noop=$(elapsed "$t")
  sums "$M0" > "$ROOT/m0.sums"; sums "$M1" > "$ROOT/m1.sums"
  cmp -s "$ROOT/m0.sums" "$ROOT/m1.sums" || { equal=false; echo "run $run: reload after one change differs from agent-0's tree" >&2; }
  if cmp -s "$SRC/$victim" "$M1/$victim"; then
    equal=false; echo "run $run: the changed file did not reach agent-1" >&2
  fi
  [ "$equal" = true ] || OK=""

  r0=$(rss_mib "$A0"); r1=$(rss_mib "$A1"); rc=$(rss_mib "$FLEET/coordinator")
  ra=$(printf '%s\n' "$r0" "$r1" | grep -v null | sort -g | tail -1 || true); ra=${ra:-null}
  warns=$(cat "$FLEET"/*/log 2>/dev/null | grep -c 'WARN\|ERROR' || true)
  # A mount point stays through an agent's stop (overlay snapshots): unmount first.
  for a in "$A0" "$A1" "$A2"; do
    [ -d "$a" ] && "$VT" --agent "$a" unmount many --discard >/dev/null
  done
  "$BIN/voltool-testnet" down --root "$FLEET" >/dev/null
  if [ -n "$LOGS_DIR" ]; then
    mkdir -p "$LOGS_DIR"
    for d in "$FLEET"/*/; do
      if [ -f "$d/log" ]; then cp "$d/log" "$LOGS_DIR/run$run-$(basename "$d").log"; fi
    done
  fi
  rm -rf "$FLEET" "$M0" "$M1" "$M2" "$SRC"; FLEET=""

  printf '{"scenario":"B4","run":%d,"files":%d,"file_kib":%d,"commit_s":%s,"cold_reload_s":%s,"commit_one_s":%s,"reload_one_s":%s,"noop_reload_s":%s,"rsync_s":%s,"commit_per_file_us":%s,"reload_per_file_us":%s,"commit_vs_rsync":%s,"reload_vs_rsync":%s,"agent_peak_rss_mib":%s,"coordinator_peak_rss_mib":%s,"verified_equal":%s,"loadavg":"%s","rsync":"%s","agent0_peak_rss_mib":%s,"agent1_peak_rss_mib":%s,"commit_scan_s":%s,"commit_upload_s":%s,"commit_changed":%s,"cold_reload_download_s":%s,"cold_reload_build_s":%s,"commit_one_scan_s":%s,"commit_one_changed":%s,"reload_one_download_s":%s,"reload_one_build_s":%s,"gen_s":%s,"copy_in_s":%s,"sha256_tree_s":%s,"log_warn_error_lines":%s,"follow_held_s":%s,"follow_reload_s":%s,"follow_reload_vs_cold":%s,"follow_prepared":%s}\n' \
    "$run" "$FILES" "$FILE_KIB" "$t_commit" "$t_reload" "$t_commit1" "$t_reload1" "$t_noop" "$t_rsync" \
    "$(div "$t_commit" "$FILES" 1000000 1)" "$(div "$t_reload" "$FILES" 1000000 1)" \
    "$(div "$t_commit" "$t_rsync")" "$(div "$t_reload" "$t_rsync")" "$ra" "$rc" "$equal" \
    "$(cut -d' ' -f1-3 /proc/loadavg)" "$RSYNC" "$r0" "$r1" \
    "$(field "$ROOT/commit.json" scan_seconds)" "$(field "$ROOT/commit.json" upload_seconds)" \
    "$(field "$ROOT/commit.json" changed)" \
    "$(field "$ROOT/reload.json" download_seconds)" "$(field "$ROOT/reload.json" build_seconds)" \
    "$(field "$ROOT/commit1.json" scan_seconds)" "$(field "$ROOT/commit1.json" changed)" \
    "$(field "$ROOT/reload1.json" download_seconds)" "$(field "$ROOT/reload1.json" build_seconds)" \
    "$t_gen" "$t_copy" "$t_verify" "$warns" "$t_follow_held" "$t_follow_reload" \
    "$(if [ "$t_follow_reload" = null ]; then echo null; else div "$t_follow_reload" "$t_reload" 1 3; fi)" \
    "$follow_prepared" | tee -a "$ROOT/runs.jsonl"
done

# Medians of every figure over the runs (nulls left out; all null gives null).
python3 - "$ROOT/runs.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = {"scenario": "B4-median", "runs": len(rows), "files": rows[0]["files"],
       "file_kib": rows[0]["file_kib"]}
skip = {"scenario", "run", "files", "file_kib", "verified_equal", "loadavg", "rsync",
        "follow_prepared"}
for k in rows[0]:
    if k in skip:
        continue
    vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
    med = statistics.median(vals) if vals else None
    out[k] = int(med) if med is not None and float(med).is_integer() else (
        round(med, 3) if med is not None else None)
out["verified_equal"] = all(r["verified_equal"] for r in rows)
out["rsync"] = rows[-1]["rsync"]
out["loadavg"] = [r["loadavg"] for r in rows]
print(json.dumps(out, separators=(",", ":")))
PY
[ -n "$OK" ] || { echo "many.sh: a reloaded tree differed (verified_equal false)" >&2; exit 1; }
