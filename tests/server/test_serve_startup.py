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

import psutil
import pytest

from server.cli import startup_watchdog
from clients.launch import REPO_ROOT, free_port


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


def _group_left(pgid: int, within_s: float) -> list[str]:
    """Command lines of the processes still in ``pgid`` after ``within_s`` (none: [])."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        if time.monotonic() > deadline:
            left = [" ".join(p.cmdline()) or p.name() for p in psutil.process_iter()
                    if _pgid(p.pid) == pgid]
            os.killpg(pgid, signal.SIGKILL)
            return left or ["(exited while listed)"]
        time.sleep(0.2)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _run_in_own_group(argv: list[str], tmp_path, timeout_s: float) -> tuple[int, str, list[str]]:
    """Run ``argv`` as a new session; (exit code, stderr, processes of its group left behind).

    stderr goes to a file, not a pipe: a leftover process holding the pipe would otherwise make
    the wait hang instead of being reported."""
    err_path = tmp_path / "stderr"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running after {timeout_s} s; stderr:\n{err_path.read_text()[-3000:]}")
    return rc, err_path.read_text(), _group_left(proc.pid, 15)


def test_serve_exits_1_and_leaves_no_process_behind(tmp_path) -> None:
    """A 2 s deadline is too short for any real engine start: the process group must be empty after."""
    rc, err, left = _run_in_own_group(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()), "--enforce-eager",
         "--startup-timeout", "2"], tmp_path, 120)
    assert rc == 1, err[-3000:]
    assert "steer serve: error: the engine did not start within 2 s (--startup-timeout)" in err
    assert left == []  # every engine process was killed (they share the server's process group)


SPAWNS_WHILE_ABORTING = """
import subprocess, sys, threading, time
from server.cli import _abort_startup
threading.Timer(0.3, _abort_startup, ("test deadline",)).start()
for _ in range(100):  # spawning goes on while the watchdog kills: each child must still be caught
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.005)
time.sleep(60)
"""


def test_abort_catches_processes_spawned_while_it_kills(tmp_path) -> None:
    rc, err, left = _run_in_own_group([sys.executable, "-c", SPAWNS_WHILE_ABORTING], tmp_path, 60)
    assert rc == 1 and "steer serve: error: test deadline" in err, err[-3000:]
    assert left == []


ENGINE_CORE_DIES = """
import subprocess, sys, time
from server import state
from server.cli import main
# a stand-in engine core that starts a worker and dies, as vLLM's does when it is killed mid-start
CORE = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); sys.exit(9)"

async def start(self):
    core = subprocess.Popen([sys.executable, "-c", CORE])
    core.wait()
    raise RuntimeError(f"Engine core initialization failed (exit {core.returncode})")

state.AppState.start = start
sys.exit(main(["serve", "--port", sys.argv[1], "--startup-timeout", "0"]))
"""


def test_failed_start_exits_1_with_the_cause_and_stops_orphaned_workers(tmp_path) -> None:
    """The engine core's death orphans its worker; the server must adopt and stop it, not leave a
    1 GB process running, and exit at once (not at --startup-timeout) naming the cause."""
    started = time.monotonic()
    rc, err, left = _run_in_own_group([sys.executable, "-c", ENGINE_CORE_DIES, str(free_port())], tmp_path, 60)
    assert rc == 1, err[-3000:]
    assert "steer serve: error: the engine failed to start: RuntimeError: Engine core initialization " \
           "failed (exit 9)" in err
    assert left == []
    assert time.monotonic() - started < 30
