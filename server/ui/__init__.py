"""The browser playground: a static page served by the same process, no build step, no CDN.

    GET /        redirects to /ui/
    GET /ui/     index.html, app.js (and its ES modules), style.css from this package

The page is a client of the public HTTP API only (/v1/models, /v1/features/search,
/v1/features/inspect, /v1/chat/completions, presets, experiments, feedback): it needs no key to
load, and its API calls send ``Authorization: Bearer <key>`` with the key the user typed, kept in
the browser's storage. See docs/ui.md.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent
"""The page's files (shipped as package data of ``server.ui``)."""
UI_PATH = "/ui"


SERVED_SUFFIXES = frozenset({".html", ".js", ".css"})
"""Only the page's own files are served from the folder (not this module or its bytecode)."""


class _UiFiles(StaticFiles):
    """The page's files, never cached stale: a server upgrade serves the new page at once."""

    async def get_response(self, path: str, scope):  # type: ignore[no-untyped-def]
        if path not in ("", ".") and Path(path).suffix not in SERVED_SUFFIXES:
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = "no-cache"
        return response


def mount_ui(app: FastAPI) -> None:
    """Serve the playground at ``/ui/`` and redirect ``/`` to it (neither is in the OpenAPI
    schema: they are pages, not API)."""

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/", status_code=307)

    app.mount(UI_PATH, _UiFiles(directory=UI_DIR, html=True, check_dir=True), name="ui")
