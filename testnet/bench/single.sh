#!/usr/bin/env bash
# Benchmarks B2 (single reload of a 1 GiB volume vs nginx+curl, then sync, and sendme on the
# same file) and B3 (commit of a new 1 GiB file vs rsync of it to a loopback rsync daemon,
# then sync, and b3sum of it) from shared/BENCH.md, plus the peak RSS
# of the agents and the coordinator (B6). Prints one JSON object per run and a summary
# with medians and ratios measured in the same run.
#
#   cargo build --release && bash testnet/bench/single.sh
#
# Needs: nginx (apt-get install -y nginx-light), curl, and optionally sendme and b3sum
# (cargo install --locked sendme b3sum); a missing (or failing) peer tool is reported as
# null and named in the summary's "missing", not faked, and the other figures go on.
# Env: SIZE_MIB (default 1024), RUNS (default 3), BIN (default target/release).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release}
SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
ROOT=$(mktemp -d /tmp/voltool-bench.XXXXXX)
VT="$BIN/voltool"
NGINX_PID=""
SENDME_PID=""
RSYNCD_PID=""

cleanup() {
  [ -n "$RSYNCD_PID" ] && kill "$RSYNCD_PID" 2>/dev/null || true
  [ -n "$SENDME_PID" ] && kill "$SENDME_PID" 2>/dev/null || true
  [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
  "$BIN/voltool-testnet" down --root "$ROOT/fleet" >/dev/null 2>&1 || true
  # Mount points stay through an agent's stop (overlay snapshots): detach what is left.
  awk -v r="$ROOT" 'index($5, r) == 1 { print $5 }' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$ROOT"
}
trap cleanup EXIT INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

"$BIN/voltool-testnet" up --agents 2 --root "$ROOT/fleet" >/dev/null
A0="$ROOT/fleet/agent-0"; A1="$ROOT/fleet/agent-1"
"$VT" --agent "$A0" volume create bench >/dev/null
"$VT" --agent "$A0" mount bench "$ROOT/m0" >/dev/null
"$VT" --agent "$A1" mount bench "$ROOT/m1" >/dev/null

# nginx serving the data directory on loopback.
mkdir -p "$ROOT/www" "$ROOT/nginx"
PORT=$((20000 + RANDOM % 20000))
cat > "$ROOT/nginx/nginx.conf" <<CONF
daemon off;
user root;
worker_processes 1;
pid $ROOT/nginx/nginx.pid;
error_log $ROOT/nginx/error.log;
events { worker_connections 64; }
http {
  access_log off;
  sendfile on;
  client_body_temp_path $ROOT/nginx;
  proxy_temp_path $ROOT/nginx;
  fastcgi_temp_path $ROOT/nginx;
  uwsgi_temp_path $ROOT/nginx;
  scgi_temp_path $ROOT/nginx;
  server { listen 127.0.0.1:$PORT; root $ROOT/www; }
}
CONF
if command -v nginx >/dev/null; then
  nginx -c "$ROOT/nginx/nginx.conf" -p "$ROOT/nginx" & NGINX_PID=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.05; done
fi

# A peer tool that is not installed leaves its array empty: each run prints its own figures
# (null when not measured), never "${ARR[-1]}" of a possibly empty array (fatal under set -u).
# B3's reference: rsync of the same file to a daemon on loopback, then sync.
source testnet/bench/rsyncd.sh
declare -a T_COMMIT=() T_B3SUM=() T_RELOAD=() T_CURL=() T_SENDME=() T_RSYNC=()
declare -a MISSING=()
[ "$RSYNC" = ok ] || MISSING+=("rsync: $RSYNC")
command -v b3sum >/dev/null || MISSING+=("b3sum: cargo install --locked b3sum")
command -v sendme >/dev/null || MISSING+=("sendme: cargo install --locked sendme")
[ -n "$NGINX_PID" ] || MISSING+=("nginx: apt-get install -y nginx-light")
for x in ${MISSING[@]+"${MISSING[@]}"}; do echo "single.sh: missing $x (reported as null)" >&2; done
for run in $(seq "$RUNS"); do
  t_b3sum=null; t_curl=null; t_sendme=null; t_rsync=null
  f="$ROOT/www/data-$run"
  head -c $((SIZE_MIB << 20)) /dev/urandom > "$f"
  cp "$f" "$ROOT/m0/data-$run"
  sync
  # B3: hash with b3sum (all cores, mmap) vs commit (scan, hash + outboard, copy into the
  # store, upload to the origin, signed head).
  if command -v b3sum >/dev/null; then
    sync
    t=$(now); b3sum "$ROOT/m0/data-$run" >/dev/null; t_b3sum=$(elapsed "$t"); T_B3SUM+=("$t_b3sum")
  fi
  if [ "$RSYNC" = ok ]; then
    sync
    t=$(now); rsync "$f" "rsync://127.0.0.1:$RPORT/bench/" && sync; t_rsync=$(elapsed "$t")
    T_RSYNC+=("$t_rsync"); rm -f "$ROOT/rsync-dst/"*
  fi
  sync
  t=$(now); "$VT" --agent "$A0" commit --json > "$ROOT/commit.json"; T_COMMIT+=("$(elapsed "$t")")
  # B2: reload of the new 1 GiB on the other agent vs curl and sendme of the same file.
  sync
  t=$(now); "$VT" --agent "$A1" reload --json > "$ROOT/reload.json"; T_RELOAD+=("$(elapsed "$t")")
  cmp -s "$f" "$ROOT/m1/data-$run" || { echo "reloaded bytes differ" >&2; exit 1; }
  if [ -n "$NGINX_PID" ]; then
    sync
    # Like a reload, the download counts once it is durable.
    t=$(now); got=$(curl -s -o "$ROOT/curl.out" -w '%{http_code} %{size_download}' "http://127.0.0.1:$PORT/data-$run"); sync
    t_curl=$(elapsed "$t"); T_CURL+=("$t_curl")
    [ "$got" = "200 $((SIZE_MIB << 20))" ] || { echo "curl got: $got" >&2; exit 1; }
    rm -f "$ROOT/curl.out"
  fi
  if command -v sendme >/dev/null; then
    (cd "$ROOT/www" && exec sendme send --relay disabled --ticket-type addresses --no-progress \
      --magic-ipv4-addr 127.0.0.1:0 "data-$run" > "$ROOT/sendme.out" 2>&1) & SENDME_PID=$!
    ticket=""
    for _ in $(seq 1200); do
      ticket=$(grep -o 'blob[a-z0-9]\{20,\}' "$ROOT/sendme.out" | head -1 || true)
      [ -n "$ticket" ] && break; sleep 0.05
    done
    mkdir -p "$ROOT/recv" && rm -rf "$ROOT/recv/"*
    sync
    if [ -z "$ticket" ]; then
      echo "sendme send gave no ticket (sendme_s null): $(tail -3 "$ROOT/sendme.out")" >&2
    elif t=$(now); (cd "$ROOT/recv" && timeout 300 sendme receive --relay disabled --no-progress \
      --magic-ipv4-addr 127.0.0.1:0 "$ticket" >/dev/null 2>&1); then
      t_sendme=$(elapsed "$t"); T_SENDME+=("$t_sendme")
      cmp -s "$f" "$ROOT/recv/data-$run" || { echo "sendme received other bytes" >&2; exit 1; }
    else
      echo "sendme receive failed (sendme_s null)" >&2
    fi
    kill "$SENDME_PID" 2>/dev/null || true; wait "$SENDME_PID" 2>/dev/null || true; SENDME_PID=""
    rm -rf "$ROOT/recv" "$ROOT/www/.sendme"*
  fi
  rm -f "$ROOT/m0/data-$run.tmp"
  field() { grep -o "\"$2\":[0-9.]*" "$1" | head -1 | cut -d: -f2; }
  printf '{"run":%d,"bytes":%d,"commit_s":%s,"commit_scan_s":%s,"commit_upload_s":%s,"rsync_s":%s,"b3sum_s":%s,"reload_s":%s,"reload_download_s":%s,"reload_build_s":%s,"curl_s":%s,"sendme_s":%s,"loadavg":"%s"}\n' \
    "$run" $((SIZE_MIB << 20)) "${T_COMMIT[-1]}" "$(field "$ROOT/commit.json" scan_seconds)" \
    "$(field "$ROOT/commit.json" upload_seconds)" "$t_rsync" "$t_b3sum" "${T_RELOAD[-1]}" \
    "$(field "$ROOT/reload.json" download_seconds)" "$(field "$ROOT/reload.json" build_seconds)" \
    "$t_curl" "$t_sendme" "$(cut -d' ' -f1-3 /proc/loadavg)"
  rm -f "$f"
done

rss() { awk '/VmHWM/ {print $2}' "/proc/$(cat "$1/pid")/status" 2>/dev/null || echo 0; }
m() { if [ "$#" -gt 0 ]; then printf '%s\n' "$@" | median; else echo null; fi; }
# ${A[@]+"${A[@]}"}: an empty array expands to nothing (and m prints null), on any bash.
mc=$(m "${T_COMMIT[@]}"); mb=$(m ${T_B3SUM[@]+"${T_B3SUM[@]}"}); mr=$(m "${T_RELOAD[@]}")
mrs=$(m ${T_RSYNC[@]+"${T_RSYNC[@]}"})
mcu=$(m ${T_CURL[@]+"${T_CURL[@]}"}); ms=$(m ${T_SENDME[@]+"${T_SENDME[@]}"})
missing=$(for x in ${MISSING[@]+"${MISSING[@]}"}; do printf '"%s",' "$x"; done)
ratio() { if [ "$2" = null ]; then echo null; else awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; fi; }
mib_s() { awk -v a="$SIZE_MIB" -v b="$1" 'BEGIN { printf "%.1f", a / b }'; }
printf '{"summary":true,"runs":%d,"mib":%d,"commit_s":%s,"rsync_s":%s,"commit_over_rsync":%s,"b3sum_s":%s,"commit_over_b3sum":%s,"reload_s":%s,"reload_mib_s":%s,"curl_s":%s,"reload_over_curl":%s,"sendme_s":%s,"reload_over_sendme":%s,"agent_reload_peak_rss_kib":%s,"agent_commit_peak_rss_kib":%s,"coordinator_peak_rss_kib":%s,"missing":[%s],"loadavg":"%s"}\n' \
  "$RUNS" "$SIZE_MIB" "$mc" "$mrs" "$(ratio "$mc" "$mrs")" "$mb" "$(ratio "$mc" "$mb")" "$mr" "$(mib_s "$mr")" "$mcu" "$(ratio "$mr" "$mcu")" \
  "$ms" "$(ratio "$mr" "$ms")" "$(rss "$A1")" "$(rss "$A0")" "$(rss "$ROOT/fleet/coordinator")" "${missing%,}" "$(cut -d' ' -f1-3 /proc/loadavg)"
