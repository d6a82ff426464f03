# Shared by the bench scripts: an rsync daemon on loopback as the reference writer.
# Source it after ROOT (a temp dir the caller removes) is set; it sets RSYNC ("ok" or why
# not), RPORT and RSYNCD_PID (the caller kills it). The module "bench" writes to
# $ROOT/rsync-dst.

RSYNC=ok
RPORT=""
if command -v rsync >/dev/null; then
  mkdir -p "$ROOT/rsyncd" "$ROOT/rsync-dst"
  RPORT=$((20000 + RANDOM % 20000))
  cat > "$ROOT/rsyncd/rsyncd.conf" <<CONF
use chroot = no
uid = $(id -un)
gid = $(id -gn)
pid file = $ROOT/rsyncd/rsyncd.pid
log file = $ROOT/rsyncd/rsyncd.log
[bench]
  path = $ROOT/rsync-dst
  read only = no
CONF
  rsync --daemon --no-detach --config="$ROOT/rsyncd/rsyncd.conf" --address=127.0.0.1 \
    --port="$RPORT" & RSYNCD_PID=$!
  up=""
  for _ in $(seq 100); do
    rsync "rsync://127.0.0.1:$RPORT/" >/dev/null 2>&1 && { up=1; break; }; sleep 0.05
  done
  if [ -z "$up" ]; then
    RSYNC="failed: the rsync daemon did not start on port $RPORT"
    kill "$RSYNCD_PID" 2>/dev/null || true; RSYNCD_PID=""
  fi
else
  RSYNC="missing: apt-get install -y rsync"
fi
