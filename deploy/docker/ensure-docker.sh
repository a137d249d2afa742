#!/usr/bin/env bash
# Make a Docker daemon answer (used by `make test-images`, never by `make test`): install
# Debian's docker.io when no docker CLI or no dockerd is found (root with apt-get only), and start dockerd in the
# background when none answers (root only; its log: /tmp/steer-dockerd.log). It keeps running.
set -euo pipefail

# Some machines carry only the docker CLI (no dockerd): then the daemon is installed too.
if ! command -v docker >/dev/null 2>&1 || { ! docker info >/dev/null 2>&1 && ! command -v dockerd >/dev/null 2>&1; }; then
    if [[ "$(id -u)" = 0 ]] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io
    else
        echo "ensure-docker.sh: docker (CLI and daemon) is not installed (and we are not root with apt-get)" >&2
        exit 1
    fi
fi
if docker info >/dev/null 2>&1; then
    exit 0
fi
if [[ "$(id -u)" != 0 ]] || ! command -v dockerd >/dev/null 2>&1; then
    echo "ensure-docker.sh: no Docker daemon answers; start one (or run as root)" >&2
    exit 1
fi
echo "ensure-docker.sh: starting dockerd (log: /tmp/steer-dockerd.log)"
nohup dockerd >/tmp/steer-dockerd.log 2>&1 &
for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 1
done
echo "ensure-docker.sh: dockerd did not answer within 60s; tail of its log:" >&2
tail -20 /tmp/steer-dockerd.log >&2
exit 1
