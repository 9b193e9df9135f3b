#!/usr/bin/env bash
# Builds a local Debian bookworm base image (default tag flux-base:bookworm) for machines that
# cannot pull python:3.11-slim-bookworm from a registry: debootstrap a minimal system with
# Python 3.11, iptables and CA certificates from the Debian mirror this machine's apt already
# uses, then `docker import` it.  Skipped when an image with this tag was built by this very
# recipe (the script's hash is the import's commit message), so a second run costs nothing.
#
#   scripts/build-base-image.sh [TAG]        FORCE=1 rebuilds; DEBIAN_MIRROR overrides the mirror
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-flux-base:bookworm}
suite=bookworm
# Everything Dockerfile's stages rely on being in the base; build tools are added by the
# build stage itself, so the runtime stays small.
packages=python3,iptables,ca-certificates
recipe="flux-base recipe $(sha256sum "$0" | cut -c1-16)"

if [ "${FORCE:-0}" != 1 ] &&
  [ "$(docker image inspect --format '{{.Comment}}' "$tag" 2>/dev/null)" = "$recipe" ]; then
  exit 0
fi

# The Debian mirror apt is configured with here (one-line .list or deb822 .sources files):
# the first URI that serves "$suite" itself, and the one serving "$suite-security".
apt_uri_for() {
  local want=$1 file
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$file" ] || continue
    awk -v want="$want" '
      $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == want) { print $i; exit } }' "$file"
  done
  for file in /etc/apt/sources.list.d/*.sources; do
    [ -r "$file" ] || continue
    # One stanza per paragraph; a stanza counts when it is enabled, of type deb and lists
    # the suite.
    awk -v want="$want" '
      function done_stanza() {
        if (types ~ /(^| )deb( |$)/ && enabled != "no" && (" " suites " ") ~ (" " want " ") \
            && uri != "") { print uri; found = 1 }
        types = ""; suites = ""; uri = ""; enabled = ""
      }
      /^[ \t]*$/ { done_stanza(); if (found) exit; next }
      /^#/ { next }
      tolower($1) == "types:"   { $1 = ""; types = $0; sub(/^ +/, "", types) }
      tolower($1) == "suites:"  { $1 = ""; suites = $0; sub(/^ +/, "", suites) }
      tolower($1) == "uris:"    { uri = $2 }
      tolower($1) == "enabled:" { enabled = tolower($2) }
      END { if (!found) done_stanza() }' "$file"
  done
}
mirror=${DEBIAN_MIRROR:-$(apt_uri_for "$suite" | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}
security=$(apt_uri_for "$suite-security" | head -n 1)
security=${security:-${mirror%/debian}/debian-security}

if ! command -v debootstrap >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "base-image: debootstrap is not installed (install it as root with apt-get)" >&2
    exit 1
  fi
  echo "base-image: installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
  echo "base-image: debootstrap needs root" >&2
  exit 1
fi

work=$(mktemp -d /var/tmp/flux-base.XXXXXX)
root=$work/rootfs
# debootstrap mounts proc and sys inside the target; a failure can leave them mounted, and
# removing the tree must never reach through a mount into the host's files.
cleanup() {
  local mount
  awk -v root="$root" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r mount; do umount -l "$mount" || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

echo "base-image: debootstrap $suite (minbase + $packages) from $mirror (log: .var/base-image.log)"
mkdir -p .var
started=$SECONDS
if ! debootstrap --variant=minbase --include="$packages" --components=main \
  "$suite" "$root" "$mirror" >.var/base-image.log 2>&1; then
  echo "base-image: debootstrap failed; last lines of .var/base-image.log:" >&2
  tail -n 20 .var/base-image.log >&2
  exit 1
fi

# apt inside images built on this base uses the same mirror, with updates and security.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# Like Debian's official images: no documentation, no recommends, no package caches.
cat >"$root/etc/dpkg/dpkg.cfg.d/01-flux-base-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
cat >"$root/etc/apt/apt.conf.d/01-flux-base" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
chroot "$root" apt-get clean
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
  "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
  "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
# Docker provides these at run time; the build machine's values must not leak into the image.
: >"$root/etc/resolv.conf"
: >"$root/etc/hostname"

tar --numeric-owner -C "$root" -c . |
  docker import --message "$recipe" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$tag" >/dev/null
echo "base-image: $tag built in $((SECONDS - started)) s" \
  "($(docker image inspect --format '{{.Size}}' "$tag" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
