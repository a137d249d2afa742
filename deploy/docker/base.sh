#!/usr/bin/env bash
# Build the local base image the CPU image's tests use (Docker Hub may be out of reach): a minimal
# Debian bookworm with python3 + venv, made by debootstrap from a Debian mirror and imported with
# `docker import`. Idempotent: does nothing when the image already exists (--force rebuilds it).
#   deploy/docker/base.sh [--force]      env: STEER_BASE_IMAGE (steer-base:bookworm), DEBIAN_MIRROR
set -euo pipefail

IMAGE="${STEER_BASE_IMAGE:-steer-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm

if [[ "${1:-}" != --force ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base.sh: $IMAGE exists"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    if [[ "$(id -u)" = 0 ]] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap
    else
        echo "base.sh: debootstrap is missing (apt-get install debootstrap, as root)" >&2
        exit 1
    fi
fi

root="$(mktemp -d /tmp/steer-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$root" "$MIRROR"
# Keep the image small: no apt lists, caches, docs or man pages.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
tar -C "$root" --numeric-owner -c . | docker import \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$IMAGE"
echo "base.sh: built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
