#!/usr/bin/env bash
# Build the CPU image (deploy/docker/Dockerfile) from the repository root.
#   deploy/docker/build.sh [docker build args...]   e.g. --build-arg BASE_IMAGE=steer-base:bookworm
# env: STEER_IMAGE (tag, default steer-server:cpu); STEER_WHEELS (space-separated folders of
# wheels offered to the build, default: the local folders in $PIP_FIND_LINKS, as `make install`
# sees them); STEER_WHEELS_PORT (default 18231, on 127.0.0.1, only while building); STEER_CA_BUNDLE
# (default $PIP_CERT: a CA bundle for pip inside the build, e.g. a TLS-intercepting proxy's).
# The Dockerfile needs BuildKit: `docker buildx` when installed, else a docker CLI older than 23
# (whose built-in BuildKit DOCKER_BUILDKIT=1 turns on). Builds use the host network.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

IMAGE="${STEER_IMAGE:-steer-server:cpu}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"

# A docker CLI that builds with BuildKit.
DOCKER=""
for cli in docker /usr/bin/docker /usr/local/bin/docker; do
    command -v "$cli" >/dev/null 2>&1 || continue
    if "$cli" buildx version >/dev/null 2>&1; then DOCKER="$cli"; break; fi
    major="$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)"
    if [[ "$major" =~ ^[0-9]+$ ]] && (( major < 23 )); then DOCKER="$cli"; break; fi
done
if [[ -z "$DOCKER" ]]; then
    echo "build.sh: no docker CLI with BuildKit (install docker-buildx, or use Docker 20.10-22)" >&2
    exit 1
fi

# Local wheels (e.g. torch 2.13.0+cpu where download.pytorch.org is out of reach), served to the
# build as a find-links page for as long as it runs.
wheel_args=()
server_pid=""
links="$(mktemp -d /tmp/steer-wheels.XXXXXX)"
cleanup() { [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null; rm -rf "$links"; }
trap cleanup EXIT
for src in ${STEER_WHEELS-${PIP_FIND_LINKS:-}}; do
    src="${src#file://}"
    [[ -d "$src" ]] || continue
    find "$src" -maxdepth 1 -name '*.whl' -exec ln -sf {} "$links"/ \;
done
if compgen -G "$links/*.whl" >/dev/null; then
    port="${STEER_WHEELS_PORT:-18231}"
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$links" >/dev/null 2>&1 &
    server_pid=$!
    for _ in $(seq 50); do
        python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/', timeout=1)" 2>/dev/null && break
        sleep 0.1
    done
    wheel_args=(--build-arg "WHEELS_URL=http://127.0.0.1:$port/")
    echo "build.sh: offering $(ls "$links" | wc -l) local wheel(s) on 127.0.0.1:$port"
    # Unreachable, the PyTorch index would cost pip a timeout and retries per package looked up.
    if [[ -n "$TORCH_INDEX_URL" ]] && ! python3 -c "import urllib.request as u; u.urlopen('$TORCH_INDEX_URL/torch/', timeout=10)" 2>/dev/null; then
        echo "build.sh: $TORCH_INDEX_URL is out of reach: building from PyPI and the local wheels"
        TORCH_INDEX_URL=""
    fi
fi

ca_args=()
ca="${STEER_CA_BUNDLE-${PIP_CERT:-}}"
if [[ -n "$ca" && -f "$ca" ]]; then
    ca_args=(--secret "id=ca,src=$ca")
fi

start=$(date +%s)
DOCKER_BUILDKIT=1 "$DOCKER" build --network host -f deploy/docker/Dockerfile -t "$IMAGE" \
    --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" "${wheel_args[@]}" "${ca_args[@]}" "$@" .
echo "build.sh: built $IMAGE in $(( $(date +%s) - start ))s, $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE") bytes"
