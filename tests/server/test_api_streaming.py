"""Concurrency and cancellation: parallel streams complete; a client that leaves frees the engine."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from steering.model_store import DEFAULT_MODEL_NAME as MODEL


def gauges(server) -> dict[str, float]:
    """Our in-flight gauges from /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = {}
    for name in ("steer_requests_running", "steer_requests_waiting", "steer_engine_unfinished_requests"):
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, name
        found[name] = float(match.group(1))
    return found


def wait_idle(server, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(server)
        if g["steer_requests_running"] == 0 and g["steer_engine_unfinished_requests"] == 0:
            return g
        if time.monotonic() > deadline:
            return g
        time.sleep(0.2)


async def test_eight_concurrent_streams_complete(aclient: openai.AsyncOpenAI, server) -> None:
    async def one(i: int) -> tuple[str, str | None, int]:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=32, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        text, finish, tokens = [], None, 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for c in chunk.choices:
                text.append(c.delta.content or "")
                finish = c.finish_reason or finish
        return "".join(text), finish, tokens

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), timeout=240)
    assert len(results) == 8
    for text, finish, tokens in results:
        assert text and finish == "length" and tokens == 32
    assert wait_idle(server)["steer_requests_running"] == 0


def _long_request(stream: bool) -> dict:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True,
            "temperature": 0.8, "stream": stream}


def test_stream_disconnect_aborts_engine_request(server) -> None:
    assert wait_idle(server)["steer_engine_unfinished_requests"] == 0
    headers = {"authorization": f"Bearer {server.api_key}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=_long_request(True),
                         headers=headers) as r:
            assert r.status_code == 200
            # Keep a reference to the iterator: a dropped one closes the connection right away.
            lines = r.iter_lines()
            seen = 0
            while seen < 3:
                line = next(lines)
                if line.startswith("data: "):
                    assert "choices" in json.loads(line[6:])
                    seen += 1
            busy = gauges(server)
            assert busy["steer_requests_running"] >= 1
            assert busy["steer_engine_unfinished_requests"] >= 1
        # Leaving the `with` closes the connection mid-stream.
    idle = wait_idle(server)
    assert idle["steer_requests_running"] == 0, idle
    assert idle["steer_engine_unfinished_requests"] == 0, idle


def test_non_stream_disconnect_aborts_engine_request(server) -> None:
    assert wait_idle(server)["steer_engine_unfinished_requests"] == 0
    headers = {"authorization": f"Bearer {server.api_key}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=_long_request(False), headers=headers, timeout=2.0)
    idle = wait_idle(server)
    assert idle["steer_requests_running"] == 0, idle
    assert idle["steer_engine_unfinished_requests"] == 0, idle


def test_stream_format(server) -> None:
    """Raw SSE: data lines of chat.completion.chunk objects, usage chunk last, then [DONE]."""
    headers = {"authorization": f"Bearer {server.api_key}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "prompt_token_ids" in chunks[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == sum(
        len(c["choices"][0]["token_ids"]) for c in chunks[:-1])
