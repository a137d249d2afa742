"""Fixtures of the browser playground tests: Debian's chromium driven by Playwright, against the
session's real server (``server`` below: tests/conftest.py's flags plus the keys of ``auth.yaml``).

They run only with ``STEER_UI_TESTS=1`` (``make test-ui`` sets it after installing chromium);
``make test`` skips them. Playwright's own browser download is not used: the browser is
``STEER_CHROMIUM`` (default ``/usr/bin/chromium``). ``STEER_UI_SCREENSHOTS=DIR`` writes the
README's screenshots (``ui-main.png``, ``ui-experiments.png``) to DIR (``docs`` to refresh the
committed ones); without it they go to a temporary folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.launch import RunningServer
from tests.conftest import API_KEY, DEFAULT_SERVER_ARGS, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # tests/server/live.py

CHROMIUM = os.environ.get("STEER_CHROMIUM", "/usr/bin/chromium")
AUTH_FILE = Path(__file__).resolve().with_name("auth.yaml")
"""The ``role: user`` keys of test_ui_refusals.py (their sha256), next to the admin key."""
UI_SERVER_ARGS: tuple[str, ...] = (*DEFAULT_SERVER_ARGS, "--auth", str(AUTH_FILE))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("STEER_UI_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="browser tests run with STEER_UI_TESTS=1 (make test-ui)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(item.fspath).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """The one real server of the playground tests: the session's default test flags (the admin
    key :data:`API_KEY`) plus the ``role: user`` keys of ``auth.yaml``. It replaces
    tests/conftest.py's ``server`` under tests/ui (``make test-ui`` runs tests/ui alone: still one
    engine). ``STEER_TEST_SERVER_URL`` must name a server started with :data:`UI_SERVER_ARGS`."""
    external = os.environ.get("STEER_TEST_SERVER_URL")
    if external:
        yield RunningServer(url=external.rstrip("/"), api_key=API_KEY)
        return
    with start_server(UI_SERVER_ARGS) as running:
        yield running


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no chromium at {CHROMIUM}: run `make test-ui` (it installs Debian's chromium)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, server: Any) -> Iterator[Any]:
    """A fresh desktop-sized page of the playground with the server's key typed in; the test fails
    if the page's scripts threw."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server.url)
    pg = context.new_page()
    script_errors: list[str] = []
    pg.on("pageerror", lambda exc: script_errors.append(str(exc)))
    pg.set_default_timeout(120_000)  # generations on a loaded 2-core CPU
    pg.goto("/")
    pg.get_by_label("API key").fill(server.api_key)
    pg.get_by_label("API key").press("Enter")
    pg.locator("#model option").first.wait_for(state="attached")
    yield pg
    context.close()
    assert script_errors == [], f"uncaught errors in the page: {script_errors}"


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("STEER_UI_SCREENSHOTS")
    out = Path(target) if target else tmp_path_factory.mktemp("ui-screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out
