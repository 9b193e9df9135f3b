#!/usr/bin/env bash
# Builds fluxd's production image (Dockerfile) as IMAGE (default fluxd:latest) on BASE_IMAGE
# (default: the Dockerfile's, python:3.11-slim-bookworm; flux-base:bookworm from
# scripts/build-base-image.sh where no registry is reachable).
#
# pip inside the build reaches the package index the way pip on this machine does: the
# effective settings of the host's pip (index URLs, trusted hosts, timeout, proxy, and the CA
# bundle it trusts, e.g. for a TLS-intercepting proxy) are staged in .var/image-pip/, which the
# build stage reads; settings that point at this machine's files (find-links, file:// indexes,
# constraints) mean nothing inside the build and are left out.  The proxy variables of this
# environment are passed on as build arguments.  DOCKER_BUILD_NETWORK=host builds with the
# host's network, for engines whose bridge has no route out.
#
# Docker's layer cache keeps a second build of unchanged inputs to a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

image=${IMAGE:-fluxd:latest}
staging=.var/image-pip
mkdir -p .var
rm -rf "$staging"
mkdir -p "$staging"

host_python=$(command -v python3 || true)
if [ -n "$host_python" ] && "$host_python" -m pip --version >/dev/null 2>&1; then
  "$host_python" -m pip config list 2>/dev/null | "$host_python" -c '
import ast, shutil, sys
from pathlib import Path

staging = Path(sys.argv[1])
# Later lines override earlier ones (pip lists files in load order, the environment last).
settings = {}
for line in sys.stdin:
    scope, sep, rest = line.rstrip("\n").partition(".")
    key, eq, value = rest.partition("=")
    if not (sep and eq) or scope not in ("global", "install", ":env:"):
        continue
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    key = {"default-timeout": "timeout"}.get(key, key)
    settings[key] = str(value)

conf = {}
for key in ("index-url", "extra-index-url"):
    urls = [u for u in settings.get(key, "").split() if u.startswith(("http://", "https://"))]
    if urls:
        conf[key] = " ".join(urls)
for key in ("trusted-host", "timeout", "retries", "proxy"):
    if settings.get(key):
        conf[key] = settings[key]
cert = settings.get("cert")
if cert and Path(cert).is_file():
    shutil.copyfile(cert, staging / "ca.pem")
    conf["cert"] = "/build/ca.pem"
if conf:
    lines = ["# The host pip settings that apply inside the image build (scripts/build-image.sh).",
             "[global]", *(f"{k} = {v}" for k, v in sorted(conf.items()))]
    (staging / "pip.conf").write_text("\n".join(lines) + "\n")
' "$staging"
fi

args=(-t "$image")
if [ -n "${BASE_IMAGE:-}" ]; then
  args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi
if [ -n "${DOCKER_BUILD_NETWORK:-}" ]; then
  args+=(--network "$DOCKER_BUILD_NETWORK")
fi
for name in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  if [ -n "${!name:-}" ]; then
    args+=(--build-arg "$name")
  fi
done

echo "image: building $image on ${BASE_IMAGE:-the default base} (log: .var/image-build.log)"
previous=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
started=$(date +%s.%N)
if ! docker build "${args[@]}" . >.var/image-build.log 2>&1; then
  echo "image: docker build failed; last lines of .var/image-build.log:" >&2
  tail -n 25 .var/image-build.log >&2
  base=${BASE_IMAGE:-python:3.11-slim-bookworm}
  if ! docker image inspect "$base" >/dev/null 2>&1; then
    echo "image: the base image $base is not on this machine; where no registry is" \
      "reachable, build on a local one: make image BASE_IMAGE=flux-base:bookworm" >&2
  fi
  exit 1
fi

# Every source change would otherwise leave the superseded image and its build stage behind
# (about 40 MB each).  The superseded image goes only when no other tag names it; of the build
# stages, the newest stays (the next build's cache).  `docker rmi` removes an image's untagged
# parents only as far as nothing else builds on them, and refuses to remove an image a
# container still uses.
current=$(docker image inspect --format '{{.Id}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$current" ] &&
  [ "$(docker image inspect --format '{{len .RepoTags}}' "$previous" 2>/dev/null)" = 0 ]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
docker image ls --filter dangling=true --filter label=org.flux.stage=build \
  --format '{{.CreatedAt}}\t{{.ID}}' | sort -r | tail -n +2 | cut -f2 |
  while read -r stale; do docker rmi "$stale" >/dev/null 2>&1 || true; done
elapsed=$(echo "$started $(date +%s.%N)" | awk '{ printf "%.1f", $2 - $1 }')
size=$(docker image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }')
echo "image: $image built in $elapsed s ($size)"
