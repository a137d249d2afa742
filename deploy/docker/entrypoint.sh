#!/bin/sh
# Entrypoint of the steer-server images. With no arguments, or arguments that start with a flag
# (`docker run IMAGE --port 9000 --auth /keys.yaml`), it runs `steer serve --host 0.0.0.0` with
# them (a later --host wins); anything else runs as given (`docker run IMAGE steer ab results x`).
# exec: the server is PID 1 and gets docker stop's SIGTERM itself (uvicorn shuts down on it).
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- steer serve --host 0.0.0.0 "$@"
fi
exec "$@"
