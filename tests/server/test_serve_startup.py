"""`steer serve --startup-timeout`: a start-up that neither succeeds nor fails in time ends the
server with exit 1, a message, and none of its processes left behind (vLLM's engine core can hang
after a failed start, which used to leave /health answering 503 forever)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from server.cli import startup_watchdog
from server.launch import REPO_ROOT, free_port


def _watch(state, timeout_s: float) -> threading.Event:
    fired = threading.Event()
    messages: list[str] = []
    startup_watchdog(state, timeout_s, lambda m: (messages.append(m), fired.set()))
    fired.messages = messages  # type: ignore[attr-defined]
    return fired


def test_fires_when_the_engine_is_still_starting() -> None:
    fired = _watch(SimpleNamespace(engine=None, startup_error=None), 0.05)
    assert fired.wait(5)
    assert fired.messages == ["the engine did not start within 0.05 s (--startup-timeout)"]


@pytest.mark.parametrize("state", [SimpleNamespace(engine=object(), startup_error=None),
                                   SimpleNamespace(engine=None, startup_error=RuntimeError("bad pack"))])
def test_quiet_when_the_engine_is_up_or_already_failed(state) -> None:
    assert not _watch(state, 0.05).wait(0.5)


def test_zero_disables_it() -> None:
    assert startup_watchdog(SimpleNamespace(engine=None, startup_error=None), 0, lambda m: None) is None


def test_serve_exits_1_and_leaves_no_process_behind() -> None:
    """A 2 s deadline is too short for any real engine start: the process group must be empty after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()), "--enforce-eager",
         "--startup-timeout", "2"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 1
    assert b"steer serve: error: the engine did not start within 2 s (--startup-timeout)" in err
    deadline = time.monotonic() + 15
    while True:  # every engine process was killed (they share the server's process group)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("processes of the timed-out server are still running")
        time.sleep(0.2)
