#!/usr/bin/env bash
# Starts a local single-member etcd (data in .var/etcd) if nothing answers at ETCD_ADDRESS's
# default, http://127.0.0.1:2379, and waits until it is healthy.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .var
endpoint=http://127.0.0.1:2379
if ETCDCTL_API=3 etcdctl --endpoints="$endpoint" --dial-timeout=1s endpoint health >/dev/null 2>&1; then
  exit 0
fi
echo "setup: starting etcd on $endpoint (data: .var/etcd, log: .var/etcd.log)"
setsid nohup etcd --name flux-local --data-dir .var/etcd \
  --listen-client-urls "$endpoint" --advertise-client-urls "$endpoint" \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster flux-local=http://127.0.0.1:2380 \
  >.var/etcd.log 2>&1 </dev/null &
for _ in $(seq 1 60); do
  if ETCDCTL_API=3 etcdctl --endpoints="$endpoint" --dial-timeout=1s endpoint health >/dev/null 2>&1; then
    exit 0
  fi
  sleep 0.5
done
echo "setup: etcd did not become healthy within 30 s; see .var/etcd.log" >&2
tail -n 20 .var/etcd.log >&2 || true
exit 1
