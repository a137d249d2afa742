"""vLLM's request features through ``steer serve`` (real engine, openai SDK): structured outputs,
tools, ``logit_bias`` and ``echo``, each alone and combined with steering in the same request."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import pytest
from live import MODEL, error_of

STEER = {"features": {"formality": 1.0}}
"""(At 2.0 the 135M model fills the whitespace JSON allows between tokens with newlines until
max_tokens: valid JSON so far, never finished.)"""
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _chat(client, **kw: Any):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 64, "temperature": 0.0}
    extra = {key: kw.pop(key) for key in ("steering", "structured_outputs", "repetition_penalty")
             if key in kw}
    return client.chat.completions.create(**{**body, **kw}, extra_body=extra or None)


@pytest.mark.parametrize("steering", [None, STEER])
def test_json_schema_output_validates(client, steering) -> None:
    resp = _chat(client, response_format={"type": "json_schema", "json_schema": {
        "name": "trip", "schema": CITY_SCHEMA, "strict": True}},
        **({"steering": steering} if steering else {}))
    choice = resp.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), CITY_SCHEMA)
    assert (resp.model_extra.get("steering") is not None) == (steering is not None)


def test_json_object_and_vllm_constraints(client) -> None:
    obj = _chat(client, response_format={"type": "json_object"}, max_tokens=48, steering=STEER)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = _chat(client, structured_outputs={"choice": ["yes", "no"]}, steering=STEER)
    assert choice.choices[0].message.content in ("yes", "no")
    regex = _chat(client, structured_outputs={"regex": "[0-9]{3}-[a-z]{2}"})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex.choices[0].message.content)
    grammar = _chat(client, structured_outputs={"grammar": 'root ::= "ab" | "cd"'})
    assert grammar.choices[0].message.content in ("ab", "cd")


def test_bad_constraints_are_400(server) -> None:
    url, h = f"{server.url}/v1/chat/completions", server.headers
    base = {"model": MODEL, "messages": ASK, "max_tokens": 4}
    for extra, param in [
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"logit_bias": {"999999999": 5}}, "logit_bias.999999999"),
        ({"tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
         "tools.[0].function.name"),
    ]:
        r = httpx.post(url, json={**base, **extra}, headers=h, timeout=60)
        err = error_of(r, 400, param)
        assert err["message"], err
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("steering", [None, STEER])
def test_tool_choice_required_and_named(client, steering) -> None:
    extra = {"steering": steering} if steering else {}
    req = _chat(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
                max_tokens=96, **extra)
    choice = req.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)

    named = _chat(client, tools=[WEATHER, TIME],
                  tool_choice={"type": "function", "function": {"name": "get_time"}}, **extra)
    choice = named.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_equal_whole_ones(client, choice) -> None:
    whole = _chat(client, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=96)
    stream = _chat(client, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=96, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": "", "id": ""})
                if d.id:
                    entry["id"] = d.id
                if d.function and d.function.name:
                    entry["name"] = d.function.name
                if d.function and d.function.arguments:
                    entry["arguments"] += d.function.arguments
            finish = c.finish_reason or finish
    expected = whole.choices[0].message.tool_calls
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in expected]
    assert all(v["id"].startswith("call_") for v in calls.values())
    assert finish == whole.choices[0].finish_reason


def test_tool_result_round_trips(client) -> None:
    first = _chat(client, tools=[WEATHER], tool_choice="required", max_tokens=96)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                          tool_choice="none", max_tokens=12, temperature=0.0,
                                          extra_body={"return_token_ids": True})
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].message.content
    # The result reached the prompt: the same conversation without it renders fewer tokens.
    shorter = client.chat.completions.create(model=MODEL, messages=messages[:2], tools=[WEATHER],
                                             tool_choice="none", max_tokens=1, temperature=0.0)
    assert resp.usage.prompt_tokens > shorter.usage.prompt_tokens


def test_auto_tool_choice_reads_hermes_calls(client) -> None:
    # The 135M model rarely calls a tool by itself; constrain its text to the Hermes format so
    # the hermes parser has a call to find (a steered request, too).
    pattern = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}\n</tool_call>'
    resp = _chat(client, tools=[WEATHER], tool_choice="auto", structured_outputs={"regex": pattern},
                 steering=STEER)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    plain = _chat(client, tools=[WEATHER], tool_choice="auto", max_tokens=8)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_logit_bias_removes_a_token(client, tokenizer) -> None:
    base = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                     temperature=0.0, extra_body={"return_token_ids": True})
    ids = base.choices[0].model_extra["token_ids"]
    banned = ids[0]
    for steering in (None, STEER):
        extra: dict[str, Any] = {"return_token_ids": True}
        if steering:
            extra["steering"] = steering
        biased = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                           temperature=0.0, logit_bias={str(banned): -100},
                                           extra_body=extra)
        assert banned not in biased.choices[0].model_extra["token_ids"]


def test_echo_returns_the_prompt(client, tokenizer) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0,
                                       echo=True, logprobs=2)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    lp = echoed.choices[0].logprobs
    n_prompt = len(tokenizer.encode(prompt))
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == echoed.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[n_prompt] == len(prompt)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0,
                                       echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == echoed.choices[0].text
