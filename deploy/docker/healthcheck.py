"""Docker HEALTHCHECK of the steer-server images: exit 0 when ``GET /health`` answers 200.

The port (and host) are read from the running ``steer serve`` command line, so ``docker run IMAGE
--port 9000`` needs no other setting; ``STEER_HEALTH_URL`` overrides the URL. /health is 503 until
the engine is up (or after it died) and needs no key. Standard library only: the images have no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def serve_args() -> list[str]:
    """Arguments after ``serve`` of the lowest-numbered ``steer serve`` process (PID 1 after the
    entrypoint's exec, or the init's child under ``docker run --init``; forked engine processes
    share its command line but have higher PIDs)."""
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if "serve" in argv and any(os.path.basename(a) == "steer" for a in argv[:3]):
            return argv[argv.index("serve") + 1:]
    return []


def flag(args: list[str], name: str, default: str) -> str:
    """The last value of ``name`` in ``args`` (``--name V`` or ``--name=V``), as argparse takes it."""
    value = default
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def health_url() -> str:
    if os.environ.get("STEER_HEALTH_URL"):
        return os.environ["STEER_HEALTH_URL"]
    args = serve_args()
    host = flag(args, "--host", "0.0.0.0")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{flag(args, '--port', '8000')}/health"


def main() -> int:
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
