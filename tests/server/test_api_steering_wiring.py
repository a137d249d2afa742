"""The server side of steering: the request field reaches the compiler, the response reports it.

What steering does to the model is tested by the steering suite; here only the wiring.
"""

from __future__ import annotations

import json

import httpx
import openai

from steering.model_store import DEFAULT_MODEL_NAME as MODEL

HIDDEN = 576  # SmolLM2-135M
MESSAGES = [{"role": "user", "content": "Tell me about cats."}]


def steer(scale: float) -> dict:
    return {"vectors": [{"layer": 10, "values": [1.0] * HIDDEN, "scale": scale}]}


def test_steered_response_has_summary_and_hash_header(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12, extra_body={"steering": steer(4.0)})
    resp = raw.parse()
    summary = resp.model_extra["steering"]
    assert raw.headers["x-steering-hash"] == summary["hash"]
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12)
    assert "steering" not in (plain.model_extra or {})
    assert plain.choices[0].message.content != resp.choices[0].message.content


def test_steered_stream_reports_summary_in_first_chunk(server) -> None:
    headers = {"authorization": f"Bearer {server.api_key}"}
    body = {"model": MODEL, "prompt": "Cats are", "max_tokens": 4, "stream": True, "steering": steer(2.0)}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[0]["steering"]["hash"] == r.headers["x-steering-hash"]
    assert all("steering" not in c for c in chunks[1:])


def test_invalid_steering_400_with_param(server) -> None:
    headers = {"authorization": f"Bearer {server.api_key}"}
    body = {"model": MODEL, "messages": MESSAGES, "steering": {"vectors": [{"layer": 10, "values": [1.0]}]}}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith("steering.vectors")
