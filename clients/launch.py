"""Run ``steer serve`` as a child process: for tools (eval, demo, bench) and the test suite.

``local_server(args)`` starts ``python -m server.cli serve`` (or another ``command``, e.g. an
installed ``steer serve``) on a free port in its own process group, waits until ``/health``
answers 200 and yields a :class:`RunningServer`; leaving the block stops the server, its engine
core and its workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

# The folder holding the clients/server/steering packages: a checkout's root, or site-packages
# when installed. Only the working directory of ``python -m server.cli`` (so the child imports the
# code this process runs); the bundled data is found by steering.packs.bundled_packs_dir().
REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = float(os.environ.get("STEER_STARTUP_TIMEOUT", "300"))


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's base_url."""
        return f"{self.url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (engine core and workers too), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def local_server(extra_args: Sequence[str] = (), api_key: str | None = None,
                 timeout: float = STARTUP_TIMEOUT_S, command: Sequence[str] | None = None,
                 cwd: str | Path | None = None,
                 env: Mapping[str, str] | None = None) -> Iterator[RunningServer]:
    """Run ``steer serve`` with ``extra_args`` on a free port until the block exits.

    Pass ``api_key`` matching any ``--api-key`` in ``extra_args`` (it is only recorded here).
    ``command`` replaces ``python -m server.cli serve`` (e.g. ``[VENV/bin/steer, "serve"]``),
    run in ``cwd`` (default :data:`REPO_ROOT`) with ``env`` (default: this process's).
    The server's output goes to a log file (``RunningServer.log_path``).
    """
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="steer-server-"))
    log_path = log_dir / "server.log"
    base = list(command) if command is not None else [sys.executable, "-m", "server.cli", "serve"]
    cmd = [*base, "--host", "127.0.0.1", "--port", str(port), *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT if cwd is None else cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = RunningServer(url=f"http://127.0.0.1:{port}", api_key=api_key, log_path=log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(base)} exited with {proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(base)} not healthy after {timeout:.0f}s:\n{server.log_tail()}")
            time.sleep(1)
        yield server
    finally:
        stop_process_group(proc)
