"""Conditional steering and monitors inside the real vLLM engine, over HTTP (float32, greedy), on
the session's ``server`` (tests/conftest.py).

Features and thresholds come from activations measured with /v1/features/inspect on SmolLM2
(greedy chat answers): ``golden_gate`` (a direction at layer 10) reads 54–91 on "San Francisco"
and "Golden Gate" in an answer about the city's bridges, at most ≈ 18 in an answer about baking
bread, and below 20 on most tokens of either.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
BRIDGES = "Tell me about famous bridges in San Francisco."
BREAD = "How do I bake a simple loaf of bread?"
NEVER, ALWAYS = {"feature": "golden_gate", "above": 1.0e4}, {"feature": "golden_gate", "below": 1.0e4}


def auth(srv) -> dict:
    return {"authorization": f"Bearer {srv.api_key}"} if srv.api_key else {}


def body(prompt, steering=None, max_tokens=16, **extra) -> dict:
    b = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
         "temperature": 0.0, "return_token_ids": True, **extra}
    if steering is not None:
        b["steering"] = steering
    return b


def chat(srv, prompt, steering=None, **extra) -> dict:
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body(prompt, steering, **extra),
                   headers=auth(srv), timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def ids(resp) -> list[int]:
    return resp["choices"][0]["token_ids"]


def test_never_and_always_conditions(server):
    """A condition that never holds steers nothing; one that always holds steers as the
    unconditional entries do (an add and a clamp, the add compiled to a gated entry)."""
    steer = {"formality": 2.0, "code": {"strength": 1.5, "mode": "clamp"}}
    plain = ids(chat(server, BREAD))
    steered = ids(chat(server, BREAD, {"features": steer}))
    assert steered != plain  # the steering does change the output
    gated = lambda cond: {"features": {n: {**({"strength": s} if not isinstance(s, dict) else s), "when": cond}
                                       for n, s in steer.items()}}  # noqa: E731
    assert ids(chat(server, BREAD, gated(NEVER))) == plain
    assert ids(chat(server, BREAD, gated(ALWAYS))) == steered


def test_a_condition_on_the_clamped_feature_reads_its_pre_clamp_activation(server):
    """"Ablate golden_gate where golden_gate > 20": the condition reads the activation before the
    ablation, so exactly the tokens above 20 are pinned to 0 and the others keep theirs."""
    def acts(steering):
        r = httpx.post(f"{server.url}/v1/completions", json={
            "model": MODEL, "prompt": BRIDGES + " The Golden Gate Bridge", "max_tokens": 1,
            "temperature": 0.0, "steering": {**steering, "return_activations": True}},
            headers=auth(server), timeout=600)
        assert r.status_code == 200, r.text
        return [a["features"]["smollm2-tone/golden_gate"] for a in r.json()["steering"]["activations"]]

    ablate_all = acts({"features": {"golden_gate": {"mode": "ablate"}}})
    assert max(abs(a) for a in ablate_all) < 1e-3
    gated = acts({"features": {"golden_gate": {"mode": "ablate", "when": {"feature": "golden_gate", "above": 20.0}}}})
    assert len(gated) == len(ablate_all)
    pinned = [a for a in gated if abs(a) < 1e-3]
    kept = [a for a in gated if abs(a) >= 1e-3]
    assert pinned and kept  # "Golden Gate" is pinned; the rest of the prompt is not
    assert max(kept) <= 20.0 + 1e-4 and min(kept) < -1.0


def test_unconditioned_requests_beside_conditioned_ones_equal_their_solo_runs(server):
    prompts = [BRIDGES, BREAD]
    solo = [ids(chat(server, p)) for p in prompts] + [ids(chat(server, BREAD, {"features": {"formality": 2.0}}))]

    async def batch():
        async with httpx.AsyncClient(headers=auth(server), timeout=600) as http:
            bodies = [body(BRIDGES), body(BREAD), body(BREAD, {"features": {"formality": 2.0}}),
                      body(BRIDGES, {"features": {"formality": {"strength": 2.0, "when": {
                          "feature": "golden_gate", "above": 20.0}}}}),
                      body(BREAD, {"features": {"code": {"strength": 1.0, "mode": "clamp", "when": ALWAYS}},
                                   "monitors": [{"feature": "golden_gate", "above": 20.0}]})]
            rs = await asyncio.gather(*(http.post(f"{server.url}/v1/chat/completions", json=b) for b in bodies))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [ids(r.json()) for r in rs]

    together = asyncio.run(batch())
    assert together[:3] == solo


def test_a_stop_monitor_ends_the_generation_at_the_trigger_with_content_filter(server):
    before = httpx.get(f"{server.url}/metrics", headers=auth(server)).text
    plain = ids(chat(server, BRIDGES))
    r = chat(server, BRIDGES, {"monitors": [{"feature": "golden_gate", "above": 60.0, "action": "stop"}]})
    (m,) = r["steering"]["monitors"]
    assert r["choices"][0]["finish_reason"] == "content_filter"
    assert m["fired"] and m["first_token"] <= 3 and m["peak"] > 60.0
    j = m["first_token"]
    out = ids(r)
    assert out[: j + 1] == plain[: j + 1] and len(out) == j + 2  # the trigger, then the forced EOS
    assert r["usage"]["completion_tokens"] == len(out)
    after = httpx.get(f"{server.url}/metrics", headers=auth(server)).text
    line = 'steer_monitor_triggers_total{action="stop",feature="smollm2-tone/golden_gate"}'

    def count(text):
        return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)
    assert count(after) == count(before) + 1


def test_a_monitor_on_an_inactive_feature_never_fires_and_changes_nothing(server):
    plain = ids(chat(server, BREAD))
    r = chat(server, BREAD, {"monitors": [{"feature": "golden_gate", "above": 40.0, "action": "stop"}]})
    (m,) = r["steering"]["monitors"]
    assert not m["fired"] and m["first_token"] is None and m["peak"] < 40.0
    assert ids(r) == plain and r["choices"][0]["finish_reason"] == "length"


def test_streamed_and_non_streamed_monitors_agree(server):
    steering = {"monitors": [{"feature": "golden_gate", "above": 40.0},
                             {"feature": "golden_gate", "above": 1.0e4}]}
    plain = chat(server, BRIDGES, steering)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body(BRIDGES, steering, stream=True),
                      headers=auth(server), timeout=600) as r:
        assert r.status_code == 200
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    fired = [e["steering"]["monitor_event"] for e in events if "monitor_event" in e.get("steering", {})]
    final = [e["steering"]["monitors"] for e in events if "monitors" in e.get("steering", {})]
    streamed = [t for e in events for c in e["choices"] for t in c.get("token_ids") or []]
    assert final == [plain["steering"]["monitors"]] and streamed == ids(plain)
    assert [f["monitor"] for f in fired] == [0] and plain["steering"]["monitors"][0]["fired"]
    assert not plain["steering"]["monitors"][1]["fired"]
    assert plain["choices"][0]["finish_reason"] == "length"  # flag monitors end nothing
