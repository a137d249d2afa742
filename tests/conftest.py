"""Shared fixtures: RNG seeding and real ``steer serve`` servers (one per session per flag set).

``start_server(extra_args)`` is a context manager that runs ``python -m server.cli serve`` on a
free port and yields a :class:`RunningServer` once ``/health`` answers 200. The session-scoped
``server`` fixture uses :data:`DEFAULT_SERVER_ARGS`; other suites can start servers with other
flags (e.g. ``--no-steering``) the same way.

Set ``STEER_TEST_SERVER_URL`` to run the tests against an already running server instead (it
must have been started with ``--api-key`` :data:`API_KEY` and the default test flags).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
API_KEY = os.environ.get("STEER_TEST_API_KEY", "sk-steer-test")
# float32: greedy outputs must match the transformers reference token for token.
DEFAULT_SERVER_ARGS: tuple[str, ...] = ("--dtype", "float32", "--max-model-len", "2048", "--api-key", API_KEY)
STARTUP_TIMEOUT_S = float(os.environ.get("STEER_TEST_STARTUP_TIMEOUT", "300"))
# Test servers keep presets and experiments in a throwaway store, not ~/.cache/steer/data.
os.environ.setdefault("STEER_DATA_DIR", tempfile.mkdtemp(prefix="steer-test-data-"))


@pytest.fixture(autouse=True)
def _seed_rngs() -> None:
    random.seed(0)
    np.random.seed(0)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's base_url."""
        return f"{self.url}/v1"

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
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
def start_server(extra_args: Sequence[str] = DEFAULT_SERVER_ARGS, api_key: str | None = API_KEY,
                 timeout: float = STARTUP_TIMEOUT_S) -> Iterator[RunningServer]:
    """Run ``steer serve`` with ``extra_args`` on a free port until the block exits.

    Pass ``api_key`` matching any ``--api-key`` in ``extra_args`` (it is only recorded here).
    """
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="steer-server-"))
    log_path = log_dir / "server.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = RunningServer(url=f"http://127.0.0.1:{port}", api_key=api_key, log_path=log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"steer serve exited with {proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"steer serve not healthy after {timeout:.0f}s:\n{server.log_tail()}")
            time.sleep(1)
        yield server
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """One real server (real engine) for the whole session, with the default test flags."""
    external = os.environ.get("STEER_TEST_SERVER_URL")
    if external:
        yield RunningServer(url=external.rstrip("/"), api_key=API_KEY)
        return
    with start_server() as running:
        yield running


#: The second engine of the session: eager (no torch.compile), prefix caching off, only 2 slots.
EAGER_SERVER_ARGS: tuple[str, ...] = (*DEFAULT_SERVER_ARGS, "--enforce-eager", "--no-enable-prefix-caching",
                                      "--max-steering-slots", "2")


@pytest.fixture(scope="session")
def eager_server() -> Iterator[RunningServer]:
    """Eager, no prefix cache, S=2: the reference for compiled-vs-eager, prefix-cache and slot tests."""
    with start_server(EAGER_SERVER_ARGS) as running:
        yield running
