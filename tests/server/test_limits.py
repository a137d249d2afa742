"""Engine-free HTTP tests of the request limits: body size (413), JSON depth and encoding (400),
field bounds (400 naming the field), the response budget, vLLM parameter errors as 400s, and
500s that never echo an exception's text."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fakes import AUTH, MODEL, FakeEngine, load_parts, serve
from fastapi.testclient import TestClient

from server import limits
from server.app import create_app
from server.errors import INTERNAL_ERROR_MESSAGE, InvalidRequest
from server.sampling import sampling_params
from server.protocol import INT32_MAX, INT64_MAX, INT64_MIN, MAX_TEXT_CHARS, ChatCompletionRequest
from vllm.exceptions import MaxQueuedTokensError, QueueOverflowError, VLLMValidationError
from vllm.v1.engine.exceptions import EngineGenerateError

SECRET = "secret-detail-/etc/shadow"
LIMIT = 4096


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return load_parts()


def _client(parts, tmp_path, **config: Any) -> Iterator[tuple[TestClient, Any]]:
    yield from serve(parts, tmp_path, **config)


@pytest.fixture
def api(parts, tmp_path) -> Iterator[tuple[TestClient, Any]]:
    yield from _client(parts, tmp_path)


@pytest.fixture
def small(parts, tmp_path) -> Iterator[tuple[TestClient, Any]]:
    """A server whose bodies may be at most LIMIT bytes."""
    yield from _client(parts, tmp_path, max_request_bytes=LIMIT)


def chat(client: TestClient, **extra: Any) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    return client.post("/v1/chat/completions", json=body, headers=AUTH)


def completion(client: TestClient, **extra: Any) -> Any:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, **extra}
    return client.post("/v1/completions", json=body, headers=AUTH)


def post_raw(client: TestClient, content: Any, path: str = "/v1/chat/completions") -> Any:
    return client.post(path, content=content, headers={**AUTH, "content-type": "application/json"})


def error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# -- body size: 413 --------------------------------------------------------------------------

def test_body_over_limit_by_content_length(small) -> None:
    client, state = small
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * LIMIT}]})
    r = post_raw(client, body.encode())
    assert r.request.headers["content-length"] == str(len(body))
    err = error(r, 413)
    assert (err["code"], err["param"], err["type"]) == ("request_too_large", None, "invalid_request_error")
    assert str(LIMIT) in err["message"] and "x-request-id" in r.headers
    assert state.engine.params == []  # the route never ran
    # At the limit is fine.
    fits = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
    r = post_raw(client, fits.encode().ljust(LIMIT))
    assert r.status_code == 200, r.text


def test_body_over_limit_chunked(small) -> None:
    client, state = small

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(8):
            yield b"x" * 1024
        yield b'"}]}'

    r = post_raw(client, chunks())
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert error(r, 413)["code"] == "request_too_large"
    assert state.engine.params == []


def test_body_limit_stops_reading_a_streamed_body(small) -> None:
    """The raw ASGI app, body in 1 KiB messages: 413 once past the limit, the rest never read."""
    _, state = small
    app = create_app(state)
    pieces = [{"type": "http.request", "body": b"x" * 1024, "more_body": True} for _ in range(64)]
    read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return pieces[read - 1] if read <= len(pieces) else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "server": ("test", 80), "client": ("c", 1),
             "headers": [(b"authorization", AUTH["authorization"].encode()),
                         (b"content-type", b"application/json")]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert read == LIMIT // 1024 + 1  # stopped at the first message past the limit


def test_limit_flags() -> None:
    from server.cli import build_parser, config_from_args

    default = config_from_args(build_parser().parse_args(["serve"]))
    assert (default.max_request_bytes, default.max_response_budget) == (8 * 2**20, 2**20)
    given = config_from_args(build_parser().parse_args(
        ["serve", "--max-request-bytes", "1000", "--max-response-budget", "5000"]))
    assert (given.max_request_bytes, given.max_response_budget) == (1000, 5000)


# -- JSON: depth and encoding ----------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/features/inspect",
                                  "/v1/presets"])
def test_deep_json_is_400(api, path: str) -> None:
    client, _ = api
    for deep in (b"[" * 10_000 + b"]" * 10_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000):
        err = error(post_raw(client, deep, path), 400)
        assert (err["code"], err["param"]) == ("json_too_deep", None)
        assert str(limits.MAX_JSON_DEPTH) in err["message"]


def test_depth_at_the_limit_parses(api) -> None:
    client, _ = api
    at = b"[" * limits.MAX_JSON_DEPTH + b"]" * limits.MAX_JSON_DEPTH
    assert limits.parse_json(at) is not None
    err = error(post_raw(client, at), 400)  # parsed, then refused as a body that is no object
    assert err["code"] != "json_too_deep"
    over = b"[" + at + b"]"
    assert error(post_raw(client, over), 400)["code"] == "json_too_deep"


def test_non_utf8_body_is_400(api) -> None:
    client, _ = api
    err = error(post_raw(client, b'{"model": "\xff\xfe"}'), 400)
    assert (err["code"], err["param"]) == ("invalid_encoding", None)
    err = error(post_raw(client, '{"model": "m"}'.encode("utf-16")), 400)
    assert err["code"] == "invalid_encoding"


def test_malformed_json_is_400(api) -> None:
    client, _ = api
    for path in ("/v1/chat/completions", "/v1/features/inspect"):
        err = error(post_raw(client, b'{"messages": [', path), 400)
        assert "could not parse" in err["message"]


@pytest.mark.parametrize("body, depth", [
    (b"1", 0), (b"[]", 1), (b"[[], [[]], {}]", 3), (b'{"a": [{"b": [1, 2]}]}', 4),
    (b'["[[[[[[", "]]]", {"x": "{{{{"}]', 2),  # brackets inside strings do not nest
    (b'["\\"[[[", [1]]', 2),  # nor after an escaped quote
    (b'["\\\\", [1], "\\\\\\"["]', 2),  # an escaped backslash does not escape the quote
])
def test_json_depth(body: bytes, depth: int) -> None:
    assert limits.json_shape(body)[0] == depth
    assert limits.json_shape(b'{"a": [' * 500 + b"1" + b"]}" * 500)[0] == 1000


def test_depth_prefilter_skips_the_scan_for_flat_bodies(api, monkeypatch) -> None:
    """A body with few brackets (a steering vector of thousands of floats) is never scanned."""
    client, _ = api
    calls: list[int] = []
    scan = limits.json_shape

    def counting(body: bytes, *args: Any) -> Any:
        calls.append(len(body))
        return scan(body, *args)

    monkeypatch.setattr(limits, "json_shape", counting)
    big = json.dumps({"x": [0.123456789] * 100_000, "s": "[" * 10}).encode()  # ~1.3 MB, 11 '['
    assert len(limits.parse_json(big)["x"]) == 100_000 and calls == []
    r = chat(client, steering={"vectors": [{"layer": 10, "values": [0.001] * 576}]})
    assert r.status_code == 200, r.text
    assert calls == []
    # Many brackets (not necessarily deep): the precise scan runs and lets it through.
    many = json.dumps({"rows": [[i] for i in range(500)]}).encode()
    assert len(limits.parse_json(many)["rows"]) == 500 and calls == [len(many)]


# -- field bounds: 400 naming the field ------------------------------------------------------

@pytest.mark.parametrize("seed", [2**64, INT64_MAX + 1, INT64_MIN - 1, -(2**64)])
def test_seed_outside_int64_is_400(api, seed: int) -> None:
    client, state = api
    for r in (chat(client, seed=seed), completion(client, seed=seed)):
        assert error(r, 400)["param"] == "seed"
    assert state.engine.params == []


@pytest.mark.parametrize("seed", [INT64_MAX, INT64_MIN, 0])
def test_seed_within_int64_reaches_the_engine(api, seed: int) -> None:
    client, state = api
    r = chat(client, seed=seed)
    assert r.status_code == 200, r.text
    assert state.engine.params[-1].seed == seed


@pytest.mark.parametrize("extra, param", [
    ({"top_k": INT32_MAX + 1}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"n": 65, "temperature": 1.0}, "n"),
    ({"max_tokens": INT32_MAX + 1}, "max_tokens"),
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"max_completion_tokens": INT32_MAX + 1}, "max_completion_tokens"),
    ({"min_tokens": INT32_MAX + 1}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 1025}, "stop"),
    ({"stop": ["ok", "x" * 1025]}, "stop.[1]"),
    ({"stop": [""]}, "stop.[0]"),
    ({"user": "u" * 513}, "user"),
    ({"messages": [{"role": "user", "content": "a"}] * 4097}, "messages"),
    ({"messages": [{"role": "user", "content": "a" * (MAX_TEXT_CHARS + 1)}]}, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a" * (MAX_TEXT_CHARS + 1)}]}]},
     "messages.[0].content.[0].text"),
])
def test_chat_bounds(api, extra: dict[str, Any], param: str) -> None:
    client, state = api
    err = error(chat(client, **extra), 400)
    assert err["param"] == param, err
    assert state.engine.params == []


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": INT32_MAX + 1}, "max_tokens"),
    ({"prompt": [1, 2, INT32_MAX + 1]}, "prompt.[2]"),
    ({"prompt": [1, -1]}, "prompt.[1]"),
    ({"prompt": [1, 2**64]}, "prompt.[1]"),
    ({"prompt": "a" * (MAX_TEXT_CHARS + 1)}, "prompt"),
    ({"seed": 2**64}, "seed"),
])
def test_completion_bounds(api, extra: dict[str, Any], param: str) -> None:
    client, state = api
    err = error(completion(client, **extra), 400)
    assert err["param"] == param, err
    assert state.engine.params == []


def test_bounds_at_their_edge_pass(api) -> None:
    client, _ = api
    r = chat(client, top_k=INT32_MAX, logprobs=True, top_logprobs=20, prompt_logprobs=20,
             stop=["a", "b", "c", "x" * 1024], user="u" * 512, min_tokens=4)
    assert r.status_code == 200, r.text


def test_min_tokens_beyond_the_context_left_is_400(api) -> None:
    client, _ = api
    r = chat(client, max_tokens=None, min_tokens=5000)  # the fake's context is 2048 tokens
    assert error(r, 400)["param"] == "min_tokens"


# -- response budget -------------------------------------------------------------------------

def test_response_budget(api) -> None:
    client, _ = api
    # 64 × 1000 × (1 + 20) = 1,344,000 > 2**20
    r = chat(client, n=64, temperature=1.0, max_tokens=1000, logprobs=True, top_logprobs=20)
    err = error(r, 400)
    assert (err["param"], err["code"]) == ("max_tokens", "response_budget_exceeded")
    assert "1344000" in err["message"]
    r = chat(client, n=64, temperature=1.0, max_completion_tokens=1000, logprobs=True, top_logprobs=20)
    assert error(r, 400)["param"] == "max_completion_tokens"
    r = completion(client, n=64, temperature=1.0, max_tokens=1000, logprobs=20)
    assert error(r, 400)["param"] == "max_tokens"
    # 64 × 700 × 21 = 940,800: within the budget.
    r = chat(client, n=64, temperature=1.0, max_tokens=700, logprobs=True, top_logprobs=20)
    assert r.status_code == 200, r.text


def test_response_budget_counts_the_context_left_when_max_tokens_is_unset(parts, tmp_path) -> None:
    for client, _ in _client(parts, tmp_path, max_response_budget=10_000):
        r = chat(client, max_tokens=None, n=8, temperature=1.0)  # 8 × ~2030 tokens left
        assert error(r, 400)["param"] == "max_tokens"
        assert chat(client, max_tokens=1000, n=8, temperature=1.0).status_code == 200
        r = completion(client, prompt="hello " * 600, prompt_logprobs=20, max_tokens=1)
        assert error(r, 400)["param"] == "prompt_logprobs"


# -- vLLM's parameter errors are 400s; no 500 echoes an exception ----------------------------

def test_sampling_params_errors_name_the_field() -> None:
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    req.top_k = -5  # past our bounds (assignment is not validated): vLLM's own checks answer
    with pytest.raises(InvalidRequest) as info:
        sampling_params(req, None)
    assert info.value.param == "top_k" and "top_k" in info.value.message
    req.top_k, req.presence_penalty = None, 3.0
    with pytest.raises(InvalidRequest) as info:
        sampling_params(req, None)
    assert info.value.param == "presence_penalty"


def test_engine_validation_error_is_400_with_param(parts, tmp_path) -> None:
    bad = VLLMValidationError("Requested sample logprobs of 30 > 20", parameter="top_p", value=30)
    for client, _ in _client(parts, tmp_path, engine=FakeEngine(fail=bad)):
        err = error(chat(client), 400)
        assert err["param"] == "top_p"


@pytest.mark.parametrize("exc, code", [
    (QueueOverflowError(), "engine_queue_full"),
    (MaxQueuedTokensError(), "engine_prefill_backlog"),
])
def test_vllm_admission_refusals_are_503_with_retry_after(parts, tmp_path, exc: Exception, code: str) -> None:
    """vLLM's own queue limits (``max_num_queued_reqs`` / ``_tokens``) in the error table: its
    message (written for clients), a 503 and Retry-After — not a generic 500."""
    for client, _ in _client(parts, tmp_path, engine=FakeEngine(fail=exc)):
        r = chat(client)
        err = error(r, 503)
        assert (err["code"], err["type"], err["message"]) == (code, "service_unavailable", str(exc))
        assert r.headers["retry-after"] == "1"


@pytest.mark.parametrize("exc, code", [
    (RuntimeError(SECRET), None),
    (KeyError(SECRET), None),
    (EngineGenerateError(SECRET), "generation_failed"),
])
def test_unexpected_error_is_a_generic_500(parts, tmp_path, exc: Exception, code: str | None) -> None:
    for client, _ in _client(parts, tmp_path, engine=FakeEngine(fail=exc)):
        r = chat(client)
        err = error(r, 500)
        assert (err["message"], err["code"], err["param"]) == (INTERNAL_ERROR_MESSAGE, code, None)
        assert SECRET not in r.text and type(exc).__name__ not in r.text
        # A stream has sent its headers: the same error arrives in-band.
        r = chat(client, stream=True)
        assert r.status_code == 200
        assert SECRET not in r.text and INTERNAL_ERROR_MESSAGE in r.text


def test_describe_keeps_our_own_messages_and_hides_the_rest() -> None:
    from server.errors import CapacityExceeded, EngineUnavailable, PayloadTooLarge, describe, error_response

    assert describe(RuntimeError(SECRET)) == (500, {"error": {
        "message": INTERNAL_ERROR_MESSAGE, "type": "internal_error", "param": None, "code": None}})
    assert describe(EngineUnavailable("the engine is starting"))[1]["error"]["message"] == \
        "the engine is starting"
    assert describe(PayloadTooLarge("big"))[0] == 413
    busy = CapacityExceeded("no slot", None, headers={"Retry-After": "3"})
    r = error_response(busy, headers={"x-extra": "1"})
    assert r.status_code == 429 and r.headers["retry-after"] == "3" and r.headers["x-extra"] == "1"
    assert json.loads(r.body)["error"]["code"] == "steering_capacity_exceeded"


# -- bounded echo: a client's long value never comes back whole ---------------------------------

LONG = "x" * 100_000
_BASE = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
ECHO_CASES = {
    "feature name": ("/v1/chat/completions", {**_BASE, "steering": {"features": {LONG: 1}}}),
    "model": ("/v1/chat/completions", {**_BASE, "model": LONG}),
    "unknown field": ("/v1/chat/completions", {**_BASE, LONG: 1}),
    "unknown steering field": ("/v1/chat/completions", {**_BASE, "steering": {LONG: 1}}),
    "role": ("/v1/chat/completions", {**_BASE, "messages": [{"role": LONG, "content": "hi"}]}),
    "readout feature": ("/v1/features/inspect", {"text": "hi", "features": [LONG]}),
    "preset name": ("/v1/presets", {"name": LONG, "steering": {"features": {"formality": 1}}}),
    "workshop name": ("/v1/features", {"name": LONG, "description": "the sea"}),
    "feature path": ("/v1/features/" + LONG[:50_000], None),
}


@pytest.mark.parametrize("case", ECHO_CASES)
def test_a_long_value_is_not_echoed_whole(api, case) -> None:
    client, _ = api
    url, body = ECHO_CASES[case]
    r = client.get(url, headers=AUTH) if body is None else client.post(url, json=body, headers=AUTH)
    assert 400 <= r.status_code < 500, r.text[:300]
    err = r.json()["error"]
    assert err["message"] and err["param"]
    assert len(r.content) < 1024, (len(r.content), r.text[:300])


def test_a_request_id_is_echoed_only_when_short_and_plain(api) -> None:
    client, _ = api
    assert client.get("/v1/models", headers={**AUTH, "x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    for bad in ("x" * 129, "a b", "<script>"):
        got = client.get("/v1/models", headers={**AUTH, "x-request-id": bad}).headers["x-request-id"]
        assert got != bad and len(got) == 32
