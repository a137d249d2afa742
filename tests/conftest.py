"""Shared fixtures: RNG seeding and real ``steer serve`` servers (one per session per flag set).

``start_server(extra_args)`` is a context manager that runs ``python -m server.cli serve`` on a
free port and yields a :class:`RunningServer` once ``/health`` answers 200. The session-scoped
``server`` fixture uses :data:`DEFAULT_SERVER_ARGS`; other suites can start servers with other
flags (e.g. ``--no-steering``) the same way.

Set ``STEER_TEST_SERVER_URL`` to run the tests against an already running server instead (it
must have been started with ``--api-key`` :data:`API_KEY` and the default test flags).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from clients.launch import RunningServer, free_port, local_server  # noqa: F401  (re-exported)

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


def start_server(extra_args: Sequence[str] = DEFAULT_SERVER_ARGS, api_key: str | None = API_KEY,
                 timeout: float = STARTUP_TIMEOUT_S):
    """Run ``steer serve`` with ``extra_args`` (default: the test flags) until the block exits."""
    return local_server(extra_args, api_key=api_key, timeout=timeout)


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
