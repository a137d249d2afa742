"""Every error comes back with its status and an OpenAI error body naming the param."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from steering.model_store import DEFAULT_MODEL_NAME as MODEL

USER = [{"role": "user", "content": "Hello"}]


def post(server, path: str, body: Any, key: str | None = "default") -> httpx.Response:
    headers = {}
    key = server.api_key if key == "default" else key
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=60)
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None, code: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param, error
    if code != "any":
        assert error["code"] == code, error
    assert r.headers.get("x-request-id")
    return error


def test_unknown_model_404(server) -> None:
    r = post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": USER})
    assert_error(r, 404, "model", "model_not_found")


def test_unknown_model_404_via_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    assert info.value.body["param"] == "model"


@pytest.mark.parametrize("body, param", [
    ({"messages": USER, "temperature": 5}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": USER, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": USER, "n": 2, "temperature": 0}, "n"),
    ({"messages": USER, "max_tokens": 4, "min_tokens": 8}, "min_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages.[0].content"),
    ({"messages": USER, "stop": 3}, "stop"),
    ({"messages": USER, "frobnicate": 1}, "frobnicate"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": USER, "stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),
    ({}, "messages"),
])
def test_bad_chat_params_400(server, body, param) -> None:
    assert_error(post(server, "/v1/chat/completions", {"model": MODEL, **body}), 400, param)


@pytest.mark.parametrize("body, param", [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages.[0].content.[0].type"),
    ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, "messages.[0].content.[0].type"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages.[0].role"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.[0].name"),
])
def test_unsupported_chat_features_400(server, body, param) -> None:
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": USER, **body})
    assert_error(r, 400, param, "unsupported_parameter")


def test_neutral_values_of_unsupported_features_are_accepted(server) -> None:
    r = post(server, "/v1/chat/completions", {
        "model": MODEL, "messages": USER, "max_tokens": 2, "tools": None, "response_format": {"type": "text"},
        "logit_bias": {}, "tool_choice": "none"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "hi", "logprobs": 99}, "logprobs"),
])
def test_bad_completion_params_400(server, body, param) -> None:
    assert_error(post(server, "/v1/completions", {"model": MODEL, **body}), 400, param)


def test_prompt_too_long_400(server) -> None:
    long_text = "word " * 3000  # > 2048 tokens
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": long_text}]})
    assert_error(r, 400, "messages", "context_length_exceeded")
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": long_text})
    assert_error(r, 400, "prompt", "context_length_exceeded")
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5000})
    assert_error(r, 400, "max_tokens", "context_length_exceeded")


def test_invalid_json_400(server) -> None:
    r = post(server, "/v1/chat/completions", b"{not json")
    assert_error(r, 400, None)
    r = post(server, "/v1/chat/completions", b"[1, 2]")
    assert_error(r, 400, None)


def test_missing_or_wrong_key_401(server) -> None:
    if not server.api_key:
        pytest.skip("server runs without --api-key")
    for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": USER}),
                       ("/v1/completions", {"model": MODEL, "prompt": "hi"})):
        assert_error(post(server, path, body, key=None), 401, None, "missing_api_key")
        assert_error(post(server, path, body, key="sk-wrong"), 401, None, "invalid_api_key")
    r = httpx.get(f"{server.url}/v1/models")
    assert_error(r, 401, None)
    # Health, version and metrics stay open (probes and scrapers carry no key).
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_wrong_key_via_sdk(server) -> None:
    if not server.api_key:
        pytest.skip("server runs without --api-key")
    bad = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_route_404(server) -> None:
    r = httpx.get(f"{server.url}/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"
