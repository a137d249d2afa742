"""Keys and roles over HTTP (engine-free: the real app over a fake engine): the ``--auth`` file,
401 / 403, ``--api-key`` as one admin key, the no-key mode's 415, rate limits, ``steer keys new``."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import MODEL, chat, load_parts, make_state
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from server.app import create_app
from server.auth import API_KEY_NAME, KEY_PREFIX, Auth, hash_key, load_auth
from server.config import ServeConfig
from server.metrics import Metrics

ADMIN_KEY, USER_KEY, API_KEY = "sk-steer-admin", "sk-steer-user", "sk-api"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
USER = {"authorization": f"Bearer {USER_KEY}"}


def auth_yaml(policies: str = "{}", user_policy: str | None = None) -> str:
    policy = f", policy: {user_policy}" if user_policy else ""
    return textwrap.dedent(f"""\
        policies: {policies}
        keys:
          - {{name: ops, role: admin, sha256: "{hash_key(ADMIN_KEY)}"}}
          - {{name: alice, role: user{policy}, sha256: "{hash_key(USER_KEY)}"}}
        """)


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return load_parts()


def serve(parts: dict[str, Any], tmp_path: Path, auth: str | None = None,
          api_key: str | None = None) -> tuple[TestClient, Any]:
    path = None
    if auth is not None:
        path = tmp_path / "auth.yaml"
        path.write_text(auth)
    state = make_state(parts, tmp_path, ServeConfig(api_key=api_key, auth=str(path) if path else None))
    client = TestClient(create_app(state))
    state.experiments.ready()
    return client, state


@pytest.fixture
def api(parts, tmp_path) -> Iterator[tuple[TestClient, Any]]:
    client, state = serve(parts, tmp_path, auth_yaml(), api_key=API_KEY)
    yield client, state
    state.experiments.close()


# -- the auth file -----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "error"), [
    (auth_yaml(user_policy="public"), r"keys\[1\] \(alice\): no policy named 'public'"),
    (auth_yaml().replace("name: alice", "name: ops"), r"keys\[1\] \(ops\): a second key named 'ops'"),
    (auth_yaml().replace(hash_key(USER_KEY), hash_key(ADMIN_KEY)),
     r"keys\[1\] \(alice\): the same sha256 as an earlier key"),
    (auth_yaml().replace(hash_key(USER_KEY), USER_KEY), r"keys\[1\]\.sha256: String should match"),
    (auth_yaml().replace("role: user", "role: root"), r"keys\[1\]\.role: Input should be"),
    (auth_yaml("{p: {max_strenght: 1}}"), r"policies\.p\.max_strenght: Extra inputs"),
    (auth_yaml("{p: {features: {allow: [a], deny: [b]}}}"), r"policies\.p\.features: give exactly one"),
    (auth_yaml("{p: {protect: {refusal: {min: 1, max: 0}}}}"), r"policies\.p\.protect\.refusal: min"),
    (auth_yaml("{p: {max_slots: 0}}"), r"policies\.p\.max_slots: Input should be greater than 0"),
    ("keys: [", r"not YAML"),
    ("keys: {}", r"keys: Input should be a valid list"),
])
def test_auth_file_errors_name_the_entry(tmp_path, text, error):
    path = tmp_path / "auth.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"auth file {re.escape(str(path))}: {error}"):
        load_auth(path)


def test_bad_auth_file_stops_serve_before_anything_starts(tmp_path, capsys):
    from server.cli import main

    assert main(["serve", "--auth", str(tmp_path / "missing.yaml")]) == 2
    assert "auth file" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text(auth_yaml(user_policy="nope"))
    assert main(["serve", "--auth", str(tmp_path / "bad.yaml")]) == 2
    assert "no policy named 'nope'" in capsys.readouterr().err


def test_auth_flag_and_env(monkeypatch):
    from server.cli import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["serve"])).auth is None
    assert config_from_args(build_parser().parse_args(["serve", "--auth", "a.yaml"])).auth == "a.yaml"
    monkeypatch.setenv("STEER_AUTH_FILE", "env.yaml")
    assert config_from_args(build_parser().parse_args(["serve"])).auth == "env.yaml"


# -- 401 and roles ------------------------------------------------------------------------------

def test_missing_and_unknown_keys_are_401_and_counted(api):
    client, _ = api
    for headers, code in (({}, "missing_api_key"), ({"authorization": "Basic x"}, "missing_api_key"),
                          ({"authorization": "Bearer sk-nope"}, "invalid_api_key"),
                          ({"authorization": f"Bearer {hash_key(USER_KEY)}"}, "invalid_api_key")):
        r = client.get("/v1/models", headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (401, code), headers
    assert chat(client, {}).status_code == 401
    m = client.get("/metrics").text
    assert 'steer_auth_failures_total{code="missing_api_key"} 3.0' in m
    assert 'steer_auth_failures_total{code="invalid_api_key"} 2.0' in m
    assert '"alice"' not in m and '"ops"' not in m  # key names are never labels


USER_ROUTES = {("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
               ("GET", "/v1/packs"), ("GET", "/v1/features"), ("GET", "/v1/features/search"),
               ("GET", "/v1/features/{name:path}"), ("POST", "/v1/features/inspect"),
               ("GET", "/v1/presets"), ("GET", "/v1/presets/{name}"), ("GET", "/v1/experiments"),
               ("GET", "/v1/experiments/{name}"), ("POST", "/v1/experiments/{name}/feedback")}
ADMIN_ROUTES = {("GET", "/v1/steering"), ("POST", "/v1/presets"), ("DELETE", "/v1/presets/{name}"),
                ("POST", "/v1/experiments"), ("PATCH", "/v1/experiments/{name}"),
                ("DELETE", "/v1/experiments/{name}"), ("GET", "/v1/experiments/{name}/results")}
WORKSHOP_ROUTES = {("POST", "/v1/features"), ("GET", "/v1/features/jobs"), ("GET", "/v1/features/jobs/{job_id}"),
                   ("GET", "/v1/features/jobs/{job_id}/events"),
                   ("DELETE", "/v1/features/jobs/{job_id}"), ("DELETE", "/v1/features/custom/{name}")}
"""Admin keys, and user keys whose policy says ``workshop: true`` (tests/server/test_workshop.py)."""


def test_every_v1_route_has_a_role(api):
    """A new /v1 route must be added to one of the tables above, its role decided."""
    client, _ = api
    found = {(m, r.path) for r in client.app.routes if isinstance(r, APIRoute)
             and r.path.startswith("/v1/") for m in r.methods}
    assert found == USER_ROUTES | ADMIN_ROUTES | WORKSHOP_ROUTES


def test_user_key_without_workshop_policy_is_403_on_every_workshop_route(api):
    client, _ = api
    for method, path in sorted(WORKSHOP_ROUTES):
        path = path.replace("{job_id}", "fjob-x").replace("{name}", "ocean")
        r = client.request(method, path, headers=USER, json={} if method == "POST" else None)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["error"]["code"] == "permission_denied"
        r = client.request(method, path, headers=ADMIN, json={} if method == "POST" else None)
        assert r.status_code in (200, 400, 404), (method, path, r.text)  # past the role check


def _call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    path = path.replace("{name}", "pirate" if "presets" in path else "tone")
    return client.request(method, path, headers=headers,
                          json={} if method in ("POST", "PATCH") else None)


def test_user_key_is_403_on_every_admin_route_admin_key_passes(api):
    client, state = api
    assert client.post("/v1/experiments", headers=ADMIN, json={
        "name": "tone", "variants": [{"name": "c", "control": True}]}).status_code == 200
    for method, path in sorted(ADMIN_ROUTES):
        r = _call(client, method, path, USER)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["error"]["code"] == "permission_denied"
        assert r.json()["error"]["type"] == "permission_error"
    assert "tone" in state.experiments.experiments and "pirate" in state.experiments.presets
    for method, path in sorted(ADMIN_ROUTES):
        if path == "/v1/steering":
            continue  # needs the real engine's collective_rpc
        r = _call(client, method, path, ADMIN)
        assert r.status_code not in (401, 403), (method, path, r.text)
    m = client.get("/metrics").text
    assert f'steer_policy_denials_total{{reason="role"}} {float(len(ADMIN_ROUTES))}' in m


def test_user_key_may_use_the_user_routes(api):
    client, _ = api
    assert client.get("/v1/models", headers=USER).status_code == 200
    assert chat(client, USER).status_code == 200
    assert chat(client, USER, model=f"{MODEL}:pirate").status_code == 200
    for path in ("/v1/packs", "/v1/features", "/v1/features/search?q=pirate",
                 "/v1/features/pirate", "/v1/presets", "/v1/presets/pirate", "/v1/experiments"):
        assert client.get(path, headers=USER).status_code == 200, path
    r = client.post("/v1/experiments/nope/feedback", headers=USER, json={"response_id": "x", "score": 1})
    assert r.status_code == 404  # past the role check: the experiment does not exist


def test_api_key_flag_is_one_admin_key(parts, tmp_path):
    client, state = serve(parts, tmp_path, api_key=API_KEY)  # no --auth file
    headers = {"authorization": f"Bearer {API_KEY}"}
    r = client.post("/v1/presets", headers=headers,
                    json={"name": "calm", "steering": {"features": {"enthusiasm": -1.0}}})
    assert r.status_code == 200
    assert client.get("/v1/models", headers=USER).status_code == 401
    assert Auth(None, API_KEY, Metrics()).keys[0][1].name == API_KEY_NAME
    state.experiments.close()


def test_api_key_and_auth_file_together(api):
    client, _ = api
    headers = {"authorization": f"Bearer {API_KEY}"}
    assert client.get("/v1/experiments/nope/results", headers=headers).status_code == 404
    assert client.get("/v1/experiments/nope/results", headers=USER).status_code == 403


# -- no key: JSON only for state changes -------------------------------------------------------------

def test_no_key_mode_requires_json_to_change_state(parts, tmp_path):
    client, state = serve(parts, tmp_path)
    preset = '{"name": "evil", "steering": {"features": {"refusal": {"mode": "ablate"}}}}'
    cases = [
        ("POST", "/v1/presets", {"content": preset, "headers": {"content-type": "text/plain"}}),
        ("POST", "/v1/presets", {"data": {"name": "evil"}}),  # an HTML form
        ("POST", "/v1/presets", {"files": {"f": ("a.txt", b"x")}}),  # multipart form
        ("POST", "/v1/presets", {"content": preset}),  # no content type at all
        ("POST", "/v1/chat/completions", {"content": "{}", "headers": {"content-type": "text/plain"}}),
        ("PATCH", "/v1/experiments/x", {"content": '{"status": "stopped"}',
                                        "headers": {"content-type": "text/plain"}}),
        ("DELETE", "/v1/presets/pirate", {}),
    ]
    for method, path, kw in cases:
        r = client.request(method, path, **kw)
        assert r.status_code == 415, (method, path, kw, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
    assert "evil" not in state.experiments.presets
    r = client.post("/v1/presets", content=preset,
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and "evil" in state.experiments.presets
    r = client.request("DELETE", "/v1/presets/evil", headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert client.get("/v1/steering").status_code != 403  # every caller is an admin
    assert chat(client, {}).status_code == 200
    state.experiments.close()


# -- rate limits ---------------------------------------------------------------------------------

def test_requests_per_minute(parts, tmp_path):
    client, state = serve(parts, tmp_path, auth_yaml("{p: {rate: {requests_per_minute: 2}}}", "p"))
    assert [client.get("/v1/models", headers=USER).status_code for _ in range(2)] == [200, 200]
    r = chat(client, USER)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 30
    assert state.engine.params == []  # nothing reached the engine
    assert client.get("/v1/models", headers=ADMIN).status_code == 200  # other keys: own buckets
    assert 'steer_rate_limited_total{kind="requests"} 1.0' in client.get("/metrics").text
    state.experiments.close()


def test_tokens_per_minute_charge_prompt_and_max_tokens(parts, tmp_path):
    client, state = serve(parts, tmp_path, auth_yaml("{p: {rate: {tokens_per_minute: 100}}}", "p"))
    assert chat(client, USER, max_tokens=40).status_code == 200  # ~30 prompt + 40
    r = chat(client, USER, max_tokens=40)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    r = chat(client, USER, max_tokens=500)  # more than a whole minute's budget
    assert r.status_code == 429 and r.headers["retry-after"] == "60"
    assert "more than this key may use in a minute" in r.json()["error"]["message"]
    assert len(state.engine.params) == 1
    assert 'steer_rate_limited_total{kind="tokens"} 2.0' in client.get("/metrics").text
    state.experiments.close()


def test_token_bucket_refills():
    from server.ratelimit import RateLimiter

    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limiter.take("k", "requests", 60)
    for _ in range(59):
        limiter.take("k", "requests", 60)
    with pytest.raises(Exception) as exc:
        limiter.take("k", "requests", 60)
    assert exc.value.headers == {"Retry-After": "1"}
    now[0] += 1.0  # one request per second comes back
    limiter.take("k", "requests", 60)


# -- steer keys new ------------------------------------------------------------------------------

def test_keys_new_prints_a_key_once_and_its_entry(tmp_path, capsys):
    from clients.cli import main

    assert main(["keys", "new", "alice", "--role", "user", "--policy", "public"]) == 0
    out = capsys.readouterr().out
    keys = re.findall(rf"{KEY_PREFIX}[A-Za-z0-9_-]+", out)
    assert len(keys) == 1 and len(keys[0]) > len(KEY_PREFIX) + 40
    entry = out[out.index("  - {"):]
    assert hash_key(keys[0]) in entry and keys[0] not in entry
    path = tmp_path / "auth.yaml"
    path.write_text(f"policies: {{public: {{}}}}\nkeys:\n{entry}")
    auth = load_auth(path)
    assert (auth.keys[0].name, auth.keys[0].role, auth.keys[0].policy) == ("alice", "user", "public")
    assert auth.keys[0].sha256 == hash_key(keys[0])
    assert main(["keys", "new", "bob"]) == 0
    assert keys[0] not in capsys.readouterr().out  # a fresh key every time
    assert main(["keys", "new", "no spaces"]) == 2
