"""The OpenAI surface through the official SDK against a real engine (greedy where exactness matters)."""

from __future__ import annotations

import httpx
import openai
import pytest

from steering.model_store import (
    DEFAULT_MODEL_NAME as MODEL,
    REFERENCE_GREEDY_IDS,
    REFERENCE_PROMPT,
    REFERENCE_PROMPT_IDS,
)

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
# Greedy float32 continuation of MESSAGES, recorded with transformers (see test_model_store.py).
CHAT_GREEDY_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]
CHAT_GREEDY_TEXT = "The capital of France is Paris."


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert models.data[0].id == MODEL
    assert models.data[0].object == "model"
    # The rest are the presets, "<model>:<preset>" with the model as parent.
    assert all(m.id.startswith(f"{MODEL}:") and m.model_extra["parent"] == MODEL for m in models.data[1:])


def test_chat_greedy_exact_and_usage(client: openai.OpenAI, tokenizer) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=32,
        extra_body={"return_token_ids": True})
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == CHAT_GREEDY_TEXT
    assert choice.finish_reason == "stop"
    extra = resp.model_extra or {}
    prompt_ids = chat_prompt_ids(tokenizer, MESSAGES)
    assert extra["prompt_token_ids"] == prompt_ids
    assert choice.model_extra["token_ids"] == CHAT_GREEDY_IDS
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(CHAT_GREEDY_IDS)
    assert resp.usage.total_tokens == len(prompt_ids) + len(CHAT_GREEDY_IDS)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == MODEL


def test_completion_reference_greedy_ids(client: openai.OpenAI, tokenizer) -> None:
    """vLLM's greedy continuation equals the transformers reference recorded by model_store."""
    assert REFERENCE_GREEDY_IDS, "steering.model_store.REFERENCE_GREEDY_IDS is empty"
    resp = client.completions.create(
        model=MODEL, prompt=REFERENCE_PROMPT, temperature=0, max_tokens=len(REFERENCE_GREEDY_IDS),
        extra_body={"return_token_ids": True})
    choice = resp.choices[0]
    assert resp.model_extra["prompt_token_ids"] == list(REFERENCE_PROMPT_IDS)
    assert choice.model_extra["token_ids"] == list(REFERENCE_GREEDY_IDS)
    assert choice.text == tokenizer.decode(list(REFERENCE_GREEDY_IDS))
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(tokenizer(REFERENCE_PROMPT)["input_ids"])
    assert resp.usage.completion_tokens == len(REFERENCE_GREEDY_IDS)


def test_completion_token_id_prompt(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt=list(REFERENCE_PROMPT_IDS), temperature=0,
                                     max_tokens=4, extra_body={"return_token_ids": True})
    assert resp.choices[0].model_extra["token_ids"] == list(REFERENCE_GREEDY_IDS[:4])


def test_chat_stream_concatenates_to_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write two sentences about the sea."}]
    kwargs = dict(model=MODEL, messages=messages, temperature=0, max_tokens=48)
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    parts, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert roles == ["assistant"]
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.model_dump() == full.usage.model_dump()


def test_completion_stream(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt=REFERENCE_PROMPT, temperature=0, max_tokens=12)
    full = client.completions.create(**kwargs)
    text = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert text == full.choices[0].text


def test_same_greedy_request_twice_is_identical(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name three colors."}],
                  temperature=0, max_tokens=40, extra_body={"return_token_ids": True})
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].model_extra["token_ids"] == b.choices[0].model_extra["token_ids"]


def test_n2_sampling(client: openai.OpenAI, tokenizer) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], n=2,
        temperature=1.0, max_tokens=16, seed=1, extra_body={"return_token_ids": True})
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.message.content for c in resp.choices)
    assert resp.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in resp.choices)


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="Once upon a time", temperature=1.0, max_tokens=16, seed=1234)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_stop_string(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt=REFERENCE_PROMPT, temperature=0, max_tokens=16,
                                     stop=["."])
    assert resp.choices[0].text == " Paris"
    assert resp.choices[0].finish_reason == "stop"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        lps = [t.logprob for t in item.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert item.token == item.top_logprobs[0].token  # greedy picks the top token
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert item.logprob <= 0
        assert bytes(item.bytes).decode() == item.token
    assert "".join(i.token for i in content).startswith("The capital of France is Paris")


def test_completion_logprobs(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt=REFERENCE_PROMPT, temperature=0, max_tokens=5,
                                     logprobs=2)
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == resp.choices[0].text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_extensions_min_tokens_and_ignore_eos(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=20,
                                          extra_body={"ignore_eos": True, "repetition_penalty": 1.1})
    assert resp.usage.completion_tokens == 20 and resp.choices[0].finish_reason == "length"
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=20,
                                          extra_body={"min_tokens": 12})
    assert resp.usage.completion_tokens >= 12


def test_text_parts_and_system_message(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                     {"type": "text", "text": "of France?"}]},
    ])
    assert resp.choices[0].message.content


def test_request_id_header(server) -> None:
    headers = {"authorization": f"Bearer {server.api_key}"}
    r = httpx.get(f"{server.url}/v1/models", headers={**headers, "x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.get(f"{server.url}/v1/models", headers=headers)
    assert len(r.headers["x-request-id"]) >= 16


def test_health_version_metrics(server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    version = httpx.get(f"{server.url}/version").json()
    assert version["vllm"] and version["version"]
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("steer_http_requests_total", "steer_time_to_first_token_seconds",
                 "steer_inter_token_latency_seconds", "steer_e2e_request_latency_seconds",
                 "steer_prompt_tokens_total", "steer_generation_tokens_total",
                 "steer_requests_running", "steer_requests_waiting"):
        assert name in text, name
