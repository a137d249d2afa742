"""README's OpenAI compatibility table is true: every request field of the chat and completions
models, every refused field, every message field and every route appears in it with the status
the server really gives it (engine-free: the real app over a fake engine)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fakes import AUTH, MODEL, load_parts, make_state
from fastapi.testclient import TestClient

from server.app import create_app
from server.protocol import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    UNSUPPORTED_MESSAGE,
    ChatCompletionRequest,
    MESSAGE_TYPES,
    CompletionRequest,
)

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `([^`]+)` \| (?:(\w+) \| )?(supported|extension|refused) \|")


def _rows(marker: str) -> list[tuple[str, str | None, str]]:
    text = README.read_text()
    block = text[text.index(f"<!-- compat:{marker} -->"):text.index(f"<!-- /compat:{marker} -->")]
    rows = []
    for line in block.splitlines():
        m = ROW.match(line)
        if m:
            rows.append((m.group(1), m.group(2), m.group(3)))
    assert rows, f"no rows under compat:{marker}"
    return rows


def _by(endpoint: str, statuses: tuple[str, ...]) -> set[str]:
    out = set()
    for field, where, status in _rows("fields"):
        if status in statuses and (where == endpoint or (where == "both" and endpoint != "message")):
            out.add(field)
    return out


def test_fields_match_the_request_models() -> None:
    assert _by("chat", ("supported", "extension")) == set(ChatCompletionRequest.model_fields)
    assert _by("completions", ("supported", "extension")) == set(CompletionRequest.model_fields)
    assert _by("message", ("supported",)) == {f for m in MESSAGE_TYPES for f in m.model_fields}
    assert _by("chat", ("refused",)) == set(UNSUPPORTED_CHAT)
    assert _by("completions", ("refused",)) == set(UNSUPPORTED_COMPLETION)
    assert _by("message", ("refused",)) == set(UNSUPPORTED_MESSAGE)


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    state = make_state(load_parts(), tmp_path_factory.mktemp("data"))
    return TestClient(create_app(state))


def test_refused_fields_are_400_naming_them(client) -> None:
    for field in _by("chat", ("refused",)):
        r = client.post("/v1/chat/completions", headers=AUTH, json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], field: ["x"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    for field in _by("completions", ("refused",)):
        r = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "x", field: 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    for field in _by("message", ("refused",)):
        r = client.post("/v1/chat/completions", headers=AUTH, json={
            "model": MODEL, "messages": [{"role": "user", "content": "x", field: "y"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"messages.[0].{field}", (field, r.text)


def test_routes_match_the_app(client) -> None:
    served = {(method, route.path) for route in client.app.routes
              for method in getattr(route, "methods", ()) or () if method not in ("HEAD", "OPTIONS")}
    served = {(m, p.replace("{name:path}", "{name}")) for m, p in served
              if not p.startswith(("/docs", "/redoc", "/openapi"))}
    listed = {tuple(route.split(" ", 1)) for route, _, status in _rows("routes") if status != "refused"}
    assert listed == served
    for route, _, status in _rows("routes"):
        if status == "refused":
            method, path = route.split(" ", 1)
            r = client.request(method, path, headers=AUTH, json={})
            assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
