#!/usr/bin/env bash
# Starts dockerd in the background if no Docker engine answers, and waits until it does.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .var
if docker version >/dev/null 2>&1; then
  exit 0
fi
echo "setup: starting dockerd (log: .var/dockerd.log)"
setsid nohup dockerd >.var/dockerd.log 2>&1 </dev/null &
for _ in $(seq 1 120); do
  if docker version >/dev/null 2>&1; then
    exit 0
  fi
  sleep 0.5
done
echo "setup: dockerd did not come up within 60 s; see .var/dockerd.log" >&2
tail -n 20 .var/dockerd.log >&2 || true
exit 1
