#!/usr/bin/env bash
# Installs etcd (the server and etcdctl) from Debian's packages where it is missing: the
# tests of coordinators in failover start a three-member etcd cluster of their own on
# 127.0.0.1 (with TLS, their certificates made by openssl). Does nothing when all three are
# on PATH already. The package's own service is not
# used (the tests start their members by hand, each in a temp directory).
set -euo pipefail
if command -v etcd >/dev/null && command -v etcdctl >/dev/null && command -v openssl >/dev/null; then
    exit 0
fi
echo "installing etcd (Debian's etcd-server and etcd-client) ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq etcd-server etcd-client openssl >/dev/null
# Where systemd runs, the package also starts a member on the default ports (2379-2380):
# the tests do not use it; their members listen on free ports of their own.
etcd --version | head -1 >&2
