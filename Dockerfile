# fluxd's production image.
#
#   docker build -t fluxd .                                   # on python:3.11-slim-bookworm
#   make base-image && make image BASE_IMAGE=flux-base:bookworm   # with no registry in reach
#
# Two stages on the same base (the compiled engine must match the runtime's Python and libc):
# "build" compiles the wheel (Cython extension included) and installs it with its dependencies
# into a virtualenv at /opt/flux; the runtime stage is the base plus iptables and that
# virtualenv, with no compiler, no pip and no package lists.
#
# Run it as the seed does (host network for the iptables rules and listeners, NET_ADMIN to
# change them, the Docker socket to watch containers):
#
#   docker run -d --name fluxd --net=host --cap-add=NET_ADMIN -e HOST_IP -e ETCD_ADDRESS \
#       -v /var/run/docker.sock:/var/run/docker.sock fluxd -listen-prometheus :9000
#
# or use bin/run-flux, which wraps exactly that.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Marks this stage's images, which Docker keeps as cache: scripts/build-image.sh removes the
# ones a newer build superseded.
LABEL org.flux.stage=build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A C compiler and libnghttp2's headers (the engine's HTTP/2 observer decodes header blocks
# with its HPACK decoder), and, when Python is Debian's own (the local base image), its headers
# and venv support; the official Python images carry both already.
RUN set -eu; \
    packages="gcc libc6-dev libnghttp2-dev"; \
    if dpkg -S "$(readlink -f "$(command -v python3)")" >/dev/null 2>&1; then \
        packages="$packages python3-dev python3-venv"; \
    fi; \
    apt-get update -q; \
    apt-get install -y -q --no-install-recommends $packages >/dev/null; \
    rm -rf /var/lib/apt/lists/*

# Dependencies first, from pyproject.toml alone, so editing the source does not download them
# again.  `make image` stages the host's own pip settings (index URLs, the CA bundle pip
# trusts) in .var/image-pip/; the brackets make that path a pattern, so a plain `docker build`
# without it works and pip uses its defaults.
WORKDIR /build
COPY pyproject.toml setup.py .var/image-pi[p] /build/
RUN set -eu; \
    if [ -f pip.conf ]; then export PIP_CONFIG_FILE=/build/pip.conf; fi; \
    python3 -m venv /opt/build; \
    python3 -m venv --without-pip /opt/flux; \
    python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
print("\n".join(p["build-system"]["requires"]))' >build-requirements.txt; \
    python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
print("\n".join(p["project"]["dependencies"]))' >requirements.txt; \
    /opt/build/bin/pip install -q --upgrade pip; \
    /opt/build/bin/pip install -q -r build-requirements.txt; \
    /opt/build/bin/pip --python /opt/flux/bin/python install -q -r requirements.txt

# The project: its wheel, with the compiled engine, built against this Python.
COPY README.md /build/
COPY src /build/src
RUN set -eu; \
    if [ -f pip.conf ]; then export PIP_CONFIG_FILE=/build/pip.conf; fi; \
    /opt/build/bin/pip wheel -q --no-deps --no-build-isolation -w /build/dist .; \
    /opt/build/bin/pip --python /opt/flux/bin/python install -q --no-deps /build/dist/flux-*.whl; \
    /opt/flux/bin/python -c 'import flux._splice, flux._histogram'; \
    # Extension modules ship with symbols nobody reads at run time: a third of the venv.
    find /opt/flux -name '*.so' -exec strip --strip-unneeded {} +; \
    /opt/flux/bin/python -c 'import flux._splice, flux._histogram, uvloop, aiohttp, pydantic_core'

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# iptables (nf_tables, like Debian's hosts) is what fluxd drives; the local base has it already.
# libnghttp2 is the engine's HPACK decoder (the official Python images lack it).
RUN set -eu; \
    packages=""; \
    command -v iptables-restore >/dev/null 2>&1 || packages="iptables ca-certificates"; \
    ldconfig -p | grep -q 'libnghttp2\.so\.14' || packages="$packages libnghttp2-14"; \
    if [ -n "$packages" ]; then \
        apt-get update -q; \
        apt-get install -y -q --no-install-recommends $packages >/dev/null; \
        rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/flux /opt/flux
# Its "#!/usr/bin/env python3" finds the virtualenv's Python first on PATH.
COPY deploy/fluxd-healthcheck /opt/flux/bin/fluxd-healthcheck
ENV PATH=/opt/flux/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
LABEL org.opencontainers.image.title="fluxd" \
      org.opencontainers.image.description="flux service router daemon for Docker hosts" \
      org.opencontainers.image.licenses="Apache-2.0"
# fluxd answers /healthz on its metrics listener when that is on; without the listener the
# check only confirms that fluxd runs.  fluxd's shutdown (rules out, lease revoked, then up to
# -shutdown-grace for proxied connections) needs more than Docker's default 10 s before
# SIGKILL: stop it with `docker stop -t 30` (bin/run-flux sets --stop-timeout).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["fluxd-healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["fluxd"]
