#!/usr/bin/env bash
# Installs the system packages flux needs, but only those that are missing, so a second run
# does nothing.  Runs as root on Debian (apt-get); elsewhere it names what is missing and stops.
set -euo pipefail

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

have_cmd etcd      || need+=(etcd-server)
have_cmd etcdctl   || need+=(etcd-client)
have_cmd dockerd   || need+=(docker.io)
have_cmd iptables  || need+=(iptables)
have_cmd ip        || need+=(iproute2)
have_pkg busybox-static || need+=(busybox-static)
have_cmd cc        || need+=(gcc)
have_pkg libnghttp2-dev || need+=(libnghttp2-dev)   # the engine's HPACK decoder (HTTP/2)
have_cmd curl      || need+=(curl)
have_cmd debootstrap     || need+=(debootstrap)   # the local base of the image tests
have_cmd systemd-analyze || need+=(systemd)       # checks deploy/fluxd.service
have_cmd promtool && have_cmd prometheus || need+=(prometheus)  # exposition, rules, dashboard queries
have_cmd wrk       || need+=(wrk)                 # HTTP services under load in tests, benchmarks
have_cmd nghttpd   || need+=(nghttp2-server)      # an h2c server behind an http service in tests
have_cmd h2load    || need+=(nghttp2-client)      # HTTP/2 clients (h2load) through it
have_cmd chromium  || need+=(chromium)            # the status page in a real browser (tests)
have_cmd chromedriver || need+=(chromium-driver)  # ... driven by Selenium
if [ "${FLUX_BENCH_TOOLS:-0}" = 1 ]; then
  have_cmd iperf3  || need+=(iperf3)
  have_cmd haproxy || need+=(haproxy)
  have_cmd nginx   || need+=(nginx-light)
  have_pkg libnginx-mod-stream || need+=(libnginx-mod-stream)  # nginx's stream proxy
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if ! have_cmd apt-get || [ "$(id -u)" != 0 ]; then
  echo "setup: missing system packages: ${need[*]} (install them as root with apt-get)" >&2
  exit 1
fi
echo "setup: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
