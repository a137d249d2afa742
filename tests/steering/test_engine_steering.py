"""Steering inside the real vLLM engine, end to end over HTTP (float32, greedy).

Two servers per session (see tests/conftest.py): ``server`` (compiled, prefix caching on,
S=16) and ``eager_server`` (eager, prefix caching off, S=2).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors import safe_open

from steering.model_store import resolve_model
from steering.config import SteeringConfig
from steering.request import SteeringCompiler

D, N_LAYERS = 576, 30
PROMPTS = [
    "The capital of France is",
    "My favourite food is",
    "Once upon a time, in a small village,",
    "The best way to learn programming is",
    "Yesterday the weather was",
    "A good friend is someone who",
    "The ocean is",
    "In the year 2050, cars will",
]


def rand_vec(seed: int, norm: float = 30.0) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(D)
    return (v / np.linalg.norm(v) * norm).tolist()


def vec_steer(seed: int, layer: int = 10, norm: float = 30.0, **kw) -> dict:
    return {"vectors": [{"layer": layer, "values": rand_vec(seed, norm), **kw}]}


def auth(srv) -> dict:
    return {"authorization": f"Bearer {srv.api_key}"} if srv.api_key else {}


def complete(srv, prompt, steering=None, max_tokens=24, **extra) -> dict:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "return_token_ids": True, **extra}
    if steering is not None:
        body["steering"] = steering
    r = httpx.post(f"{srv.url}/v1/completions", json=body, headers=auth(srv), timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def ids(resp: dict) -> list[int]:
    return resp["choices"][0]["token_ids"]


async def complete_many(srv, jobs: list[tuple[str, dict | None]], max_tokens=24) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=300, headers=auth(srv)) as client:
        async def one(prompt, steering):
            body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0.0, "return_token_ids": True}
            if steering is not None:
                body["steering"] = steering
            r = await client.post(f"{srv.url}/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]
        return await asyncio.gather(*(one(p, s) for p, s in jobs))


def steering_stats(srv) -> dict:
    r = httpx.get(f"{srv.url}/v1/steering", headers=auth(srv), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


# -- 1. algebra ---------------------------------------------------------------------------------
def test_strength_zero_is_baseline_and_scale_algebra(server):
    p = PROMPTS[0]
    base = ids(complete(server, p))
    assert ids(complete(server, p, vec_steer(1, scale=0.0))) == base
    v = np.asarray(rand_vec(1))
    a = ids(complete(server, p, {"vectors": [{"layer": 10, "values": v.tolist(), "scale": 2.0}]}))
    b = ids(complete(server, p, {"vectors": [{"layer": 10, "values": (2 * v).tolist()}]}))
    halves = ids(complete(server, p, {"vectors": [{"layer": 10, "values": v.tolist(), "scale": 1.0}] * 2}))
    assert a == b == halves
    assert a != base  # the steering does something


def test_base64_vector_equals_values(server):
    v = np.asarray(rand_vec(4), dtype="<f4")
    a = complete(server, PROMPTS[1], {"vectors": [{"layer": 5, "values": v.tolist()}]})
    b = complete(server, PROMPTS[1], {"vectors": [{"layer": 5, "base64": base64.b64encode(v.tobytes()).decode()}]})
    assert ids(a) == ids(b)
    assert a["steering"]["hash"] == b["steering"]["hash"]


# -- 2. isolation -------------------------------------------------------------------------------
def test_isolation_in_one_batch(server):
    generated_only = vec_steer(15, layer=10, norm=50.0)
    generated_only["apply_to"] = "generated"
    configs = [None, vec_steer(11), vec_steer(12, layer=3), None, vec_steer(13, layer=20),
               {"vectors": [{"layer": 7, "values": rand_vec(14), "mode": "clamp", "target": 4.0}]},
               vec_steer(11), None, generated_only, vec_steer(16, layer=25), None,
               vec_steer(12, layer=3), vec_steer(17, layer=0),
               {"vectors": [{"layer": 14, "values": rand_vec(18), "mode": "ablate"}]}]
    jobs = [(PROMPTS[i % len(PROMPTS)], c) for i, c in enumerate(configs)]
    solo = [ids(complete(server, p, c)) for p, c in jobs]
    together = asyncio.run(complete_many(server, jobs))
    for i, (s, t) in enumerate(zip(solo, together)):
        assert s == t, f"request {i} ({'steered' if jobs[i][1] else 'unsteered'}) changed in a batch"
    # the steering is real: most steered requests differ from their prompt's unsteered output
    plain = {p: ids(complete(server, p)) for p in set(p for p, _ in jobs)}
    changed = sum(s != plain[p] for (p, c), s in zip(jobs, solo) if c is not None)
    assert changed >= 7, changed


# -- 3. reference parity with transformers ----------------------------------------------------
@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32)
    return model.eval()


def test_reference_parity_with_transformers_hook(server, hf_model):
    from steering.hf import hf_steering

    steer = {"vectors": [{"layer": 10, "values": rand_vec(21, 40.0), "scale": 1.0},
                         {"layer": 18, "values": rand_vec(22, 20.0), "mode": "clamp", "target": 3.0}]}
    n = 24
    resp = complete(server, "Tell me about the sea.", steer, max_tokens=n, logprobs=1)
    prompt_ids, got = resp["prompt_token_ids"], ids(resp)
    program = SteeringCompiler(SteeringConfig(), D, N_LAYERS).compile(steer).program
    with torch.no_grad(), hf_steering(hf_model, program):
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                min_new_tokens=n, pad_token_id=2)
        want = out[0, len(prompt_ids):].tolist()
        logits = hf_model(out).logits[0, len(prompt_ids) - 1 : -1]
        ref_lp = torch.log_softmax(logits, -1)[torch.arange(n), out[0, len(prompt_ids):]]
    assert got == want
    # unsteered differs, so the hook and the op both did something
    with torch.no_grad():
        plain = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                  min_new_tokens=n, pad_token_id=2)[0, len(prompt_ids):].tolist()
    assert plain != want
    vllm_lp = np.asarray(resp["choices"][0]["logprobs"]["token_logprobs"])
    assert np.max(np.abs(vllm_lp - ref_lp.numpy())) < 2e-3  # stated tolerance (float32)


# -- 4. every decode step is steered ----------------------------------------------------------
@pytest.fixture(scope="module")
def unembedding_push():
    """A vector at the last layer that makes token ' ocean' the argmax after the final norm."""
    path = Path(resolve_model(None)) / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight").float()
        g = f.get_tensor("model.norm.weight").float()
    from transformers import AutoTokenizer

    tok_id = AutoTokenizer.from_pretrained(str(resolve_model(None))).encode(" ocean")[0]
    u = emb[tok_id] / g
    u = u / u.norm() * 5000.0
    return tok_id, u.tolist()


def test_every_generated_token_is_steered(server, unembedding_push):
    tok, u = unembedding_push
    p = PROMPTS[4]
    base = ids(complete(server, p, max_tokens=12))
    every = ids(complete(server, p, {"vectors": [{"layer": 29, "values": u}]}, max_tokens=12))
    assert every == [tok] * 12
    gen = complete(server, p, {"vectors": [{"layer": 29, "values": u}], "apply_to": "generated"},
                   max_tokens=12, prompt_logprobs=0)
    # the first token comes from the last prompt position (unsteered); every later one is steered
    assert ids(gen) == [base[0]] + [tok] * 11
    prm = complete(server, p, {"vectors": [{"layer": 29, "values": u}], "apply_to": "prompt"},
                   max_tokens=12)
    assert ids(prm)[0] == tok
    plain = complete(server, p, max_tokens=12, prompt_logprobs=0)
    assert gen["prompt_logprobs"] == plain["prompt_logprobs"]
    steered_all = complete(server, p, {"vectors": [{"layer": 29, "values": u}]}, max_tokens=2,
                           prompt_logprobs=0)
    assert steered_all["prompt_logprobs"] != plain["prompt_logprobs"]


# -- 5. clamp holds ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode,target", [("clamp", 7.0), ("clamp", -3.0), ("ablate", 0.0)])
def test_clamp_readout_equals_target(server, mode, target):
    vec = {"layer": 12, "values": rand_vec(31, 1.0), "mode": mode}
    if mode == "clamp":
        vec["target"] = target
    resp = complete(server, PROMPTS[2], {"vectors": [vec], "return_activations": True}, max_tokens=10)
    acts = resp["steering"]["activations"]
    n_prompt = len(resp["prompt_token_ids"])
    positions = sorted(a["position"] for a in acts)
    # every prompt position and every generated token that was fed back (all but the last)
    assert positions == list(range(n_prompt + 10 - 1))
    for a in acts:
        assert a["layer"] == 12
        assert a["features"]["vectors[0]"] == pytest.approx(target, abs=2e-3), a


# -- 6. prefix cache never shares KV across steering ------------------------------------------
def test_prefix_cache_isolation(server, eager_server):
    long_prompt = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(30))
    # prompt-only steering: its effect reaches the continuation only through the prompt's KV
    # blocks (and the last prompt position), so reusing unsteered blocks would show
    steer = {**vec_steer(41, layer=6, norm=100.0), "apply_to": "prompt"}
    plain = ids(complete(server, long_prompt, max_tokens=16))  # fills the prefix cache, unsteered
    cached = ids(complete(server, long_prompt, steer, max_tokens=16))
    uncached = ids(complete(eager_server, long_prompt, steer, max_tokens=16))
    assert cached == uncached
    assert cached != plain


# -- 7. slots ----------------------------------------------------------------------------------
def test_aborted_streams_free_every_slot(server):
    configs = [vec_steer(100 + i, layer=i % N_LAYERS) for i in range(20)]  # more than S=16

    async def run():
        async with httpx.AsyncClient(timeout=120, headers=auth(server)) as client:
            sem = asyncio.Semaphore(25)

            async def one(i):
                body = {"model": "SmolLM2-135M-Instruct", "prompt": PROMPTS[i % 8], "max_tokens": 64,
                        "temperature": 0.0, "stream": True, "steering": configs[i % 20]}
                async with sem:
                    async with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                break  # hang up after the first chunk
            await asyncio.gather(*(one(i) for i in range(200)))

    asyncio.run(run())
    complete(server, PROMPTS[0], max_tokens=2)  # a later step reports the aborted ids
    deadline = time.time() + 30
    while True:
        st = steering_stats(server)
        if st["worker"]["busy_slots"] == 0 and st["worker"]["requests"] == 0 and st["resident"] == 0:
            break
        assert time.time() < deadline, st
        time.sleep(0.5)
    assert st["waiting"] == 0


def test_more_configs_than_slots_all_complete(eager_server):
    assert steering_stats(eager_server)["slots"] == 2
    jobs = [(PROMPTS[i], vec_steer(200 + i, layer=3 * i)) for i in range(6)]
    solo = [ids(complete(eager_server, p, c)) for p, c in jobs]
    together = asyncio.run(complete_many(eager_server, jobs))
    assert together == solo
    assert len({tuple(s) for s in solo}) > 1


# -- 8. eager vs compiled ----------------------------------------------------------------------
def test_eager_and_compiled_give_identical_tokens(server, eager_server):
    jobs = [(PROMPTS[0], vec_steer(301)), (PROMPTS[1], None), (PROMPTS[2], vec_steer(301)),
            (PROMPTS[3], {"vectors": [{"layer": 9, "values": rand_vec(302), "mode": "clamp", "target": 2.0}]})]
    assert asyncio.run(complete_many(server, jobs)) == asyncio.run(complete_many(eager_server, jobs))


# -- bad input over HTTP ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "steering,param",
    [
        ({"vectors": [{"layer": 3, "values": [0.0] * (D - 1)}]}, "steering.vectors[0].values"),
        ({"vectors": [{"layer": 30, "values": [0.0] * D}]}, "steering.vectors[0].layer"),
        ({"vectors": [{"layer": 3, "values": [0.0] * D, "scale": 1e6}]}, "steering.vectors[0].scale"),
        ({"vectors": [{"layer": 3, "base64": "AAAA"}]}, "steering.vectors[0].base64"),
        ({"vectors": [{"layer": 3, "values": [0.0] * D, "mode": "nudge"}]}, "steering.vectors[0].mode"),
        ({"features": {"no_such_feature": 1.0}}, "steering.features.no_such_feature"),
        ({"vectors": [{"layer": 3, "path": "/etc/passwd"}]}, "steering.vectors[0].path"),
    ],
)
def test_bad_steering_is_a_400_with_param(server, steering, param):
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, "steering": steering}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth(server), timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_nan_in_json_vector_is_rejected(server):
    # JSON has no NaN literal; Python's json writes one anyway, so a server must still refuse it.
    body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": 2,
                       "steering": {"vectors": [{"layer": 3, "values": [float("nan")] + [0.0] * (D - 1)}]}})
    r = httpx.post(f"{server.url}/v1/completions", content=body, timeout=60,
                   headers={"content-type": "application/json", **auth(server)})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("steering.vectors[0].values", "steering")


def test_response_echoes_applied_steering(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, headers=auth(server), json={
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4, "temperature": 0, "steering": vec_steer(7, layer=4, scale=1.5)})
    assert r.status_code == 200
    body = r.json()
    assert r.headers["x-steering-hash"] == body["steering"]["hash"]
    assert body["steering"]["applied"] == [{"vector": 0, "layer": 4, "mode": "add", "scale": 1.5}]


# -- tensor parallel ------------------------------------------------------------------------------
def test_tensor_parallel_ranks_steer_identically(eager_server):
    """SmolLM2 has 9 heads, so TP=3 is the smallest split (TP=2 is refused by vLLM for it)."""
    from tests.conftest import EAGER_SERVER_ARGS, start_server

    jobs = [(PROMPTS[0], vec_steer(401)), (PROMPTS[1], None),
            (PROMPTS[2], {"vectors": [{"layer": 9, "values": rand_vec(402), "mode": "clamp", "target": 2.0}]})]
    want = [ids(complete(eager_server, p, c)) for p, c in jobs]
    with start_server((*EAGER_SERVER_ARGS, "--tensor-parallel-size", "3")) as tp3:
        got = [ids(complete(tp3, p, c)) for p, c in jobs]
    assert got == want


# -- the plugin idle is the plain engine ----------------------------------------------------------
def test_idle_plugin_equals_plain_vllm(eager_server):
    """Unsteered requests on a steering server ≡ the same engine without the plugin, and a
    server started with --no-steering refuses steering instead of ignoring it."""
    from tests.conftest import EAGER_SERVER_ARGS, start_server

    jobs = [(p, None) for p in PROMPTS[:4]]
    want = asyncio.run(complete_many(eager_server, jobs))
    with start_server((*EAGER_SERVER_ARGS, "--no-steering")) as plain:
        assert asyncio.run(complete_many(plain, jobs)) == want
        r = httpx.post(f"{plain.url}/v1/completions", headers=auth(plain), timeout=60, json={
            "model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": 2,
            "steering": vec_steer(1)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "steering"
        assert httpx.get(f"{plain.url}/v1/steering", headers=auth(plain)).json() == {"enabled": False}
