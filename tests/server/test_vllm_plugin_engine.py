"""Stock vLLM's OpenAI server with our plugin, on the bundled model in float32, through the
openai SDK: unsteered equals plain vLLM; named features and raw vectors equal the same steering
through ``steer serve`` token for token; a mixed batch keeps each request's own output; invalid
steering is a 400 and the server keeps serving; distinct configurations beyond the slots wait,
and beyond the waiters get a 429.

Three servers, started once each: plain vLLM (alone, first; its outputs are recorded and it is
stopped), then the plugin-enabled vLLM server and an eager ``steer serve`` side by side."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from clients.launch import local_server
from server import vllm_env
from steering.model_store import DEFAULT_MODEL_NAME, resolve_model

MODEL = DEFAULT_MODEL_NAME
D = 576
STARTUP_TIMEOUT_S = float(os.environ.get("STEER_TEST_STARTUP_TIMEOUT", "600"))
PROMPTS = ["The weather today is", "My favourite food is", "Once upon a time"]
MAX_TOKENS = 8
VLLM_ARGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--seed", "0",
             "--generation-config", "vllm", "--served-model-name", MODEL)
PLUGIN_CONFIG = {"steering": {"packs": ["bundled"], "max_slots": 1},
                 "steering_api": {"max_waiters": 1, "queue_timeout": 300}}


def _env() -> dict[str, str]:
    vllm_env.apply_defaults()  # VLLM_CPU_KVCACHE_SPACE etc. unless set (no-op with a GPU)
    return dict(os.environ)


@contextlib.contextmanager
def _serve(cmd: Sequence[str]) -> Iterator[str]:
    """Run ``cmd`` (+ host/port) until the block exits; yields the base URL once /health is 200."""
    with local_server(command=cmd, env=_env(), timeout=STARTUP_TIMEOUT_S) as srv:
        yield srv.url


def vllm_cmd(plugin: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(resolve_model(None)), *VLLM_ARGS]
    if plugin:
        cmd += ["--worker-cls", "steering.vllm_shim.SteeringCPUWorker",
                "--additional-config", json.dumps(PLUGIN_CONFIG),
                "--middleware", "server.vllm_plugin.SteeringMiddleware"]
    return cmd


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def asdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def _ids(resp: Any) -> tuple[list[int], list[int], str]:
    choice = resp.choices[0]
    return (list(resp.model_extra.get("prompt_token_ids") or choice.model_extra["prompt_token_ids"]),
            list(choice.model_extra["token_ids"]), choice.text)


def xargs(spec: dict[str, Any] | str | None) -> dict[str, Any]:
    """extra_body for the plugin server: the steering object as a JSON string in vllm_xargs."""
    body: dict[str, Any] = {"return_token_ids": True}
    if spec is not None:
        body["vllm_xargs"] = {"steering": spec if isinstance(spec, str) else json.dumps(spec)}
    return body


def greedy(client: openai.OpenAI, prompt: str, extra_body: dict[str, Any],
           max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[int], str]:
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0.0, extra_body=extra_body)
    return _ids(resp)


async def agreedy(client: openai.AsyncOpenAI, prompt: str, extra_body: dict[str, Any],
                  max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[int], str]:
    resp = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0.0, extra_body=extra_body)
    return _ids(resp)


def unit(seed: int, norm: float) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(D)
    return (v / np.linalg.norm(v) * norm).astype(np.float32)


FEATURE = {"features": {"pirate": 1.5}}
FEATURE_CLAMP = {"features": {"smollm2-tone/formality": {"strength": 2.0, "mode": "clamp"}},
                 "apply_to": "generated"}
VECTOR = {"vectors": [{"layer": 10, "values": unit(7, 30.0).tolist(), "scale": 1.0}]}
VECTOR_B64 = {"vectors": [
    {"layer": 12, "base64": base64.b64encode(unit(8, 1.0).astype("<f4").tobytes()).decode(),
     "mode": "clamp", "target": 200.0},
    {"layer": 6, "base64": base64.b64encode(unit(9, 1.0).astype("<f4").tobytes()).decode(),
     "mode": "ablate"}]}
SPECS = {"feature": FEATURE, "feature_clamp": FEATURE_CLAMP, "vector": VECTOR,
         "vector_b64": VECTOR_B64}


# -- servers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain() -> dict[str, tuple[list[int], list[int], str]]:
    """Plain vLLM's greedy outputs for PROMPTS (the server is stopped before the others start)."""
    with _serve(vllm_cmd(plugin=False)) as url:
        client = sdk(url)
        return {p: greedy(client, p, {"return_token_ids": True}) for p in PROMPTS}


@pytest.fixture(scope="module")
def servers(plain) -> Iterator[tuple[str, str]]:
    """(plugin-enabled vLLM server, eager steer serve), started side by side."""
    steer_cmd = [sys.executable, "-m", "server.cli", "serve", "--dtype", "float32",
                 "--enforce-eager", "--max-model-len", "1024", "--seed", "0",
                 "--no-enable-prefix-caching"]
    with contextlib.ExitStack() as stack:
        # Start both, then wait for both (each start is minutes on a small CPU machine).
        import threading

        urls: dict[str, str] = {}
        errors: list[BaseException] = []

        def start(name: str, cmd: list[str]) -> None:
            try:
                urls[name] = stack.enter_context(_serve(cmd))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=start, args=("plugin-vllm", vllm_cmd(True))),
                   threading.Thread(target=start, args=("steer-serve", steer_cmd))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        yield urls["plugin-vllm"], urls["steer-serve"]


@pytest.fixture(scope="module")
def reference(servers):
    """steer serve's greedy output for (prompt, spec name), memoised."""
    client = sdk(servers[1])
    memo: dict[tuple[str, str, int, str], tuple[list[int], list[int], str]] = {}

    def ref(prompt: str, name: str, max_tokens: int = MAX_TOKENS, **extra: Any):
        key = (prompt, name, max_tokens, json.dumps(extra, sort_keys=True))
        if key not in memo:
            memo[key] = greedy(client, prompt, {"return_token_ids": True,
                                                "steering": SPECS[name], **extra}, max_tokens)
        return memo[key]
    return ref


# -- tests -----------------------------------------------------------------------------------
def test_unsteered_equals_plain_vllm(plain, servers):
    client = sdk(servers[0])
    for prompt in PROMPTS:
        assert greedy(client, prompt, xargs(None)) == plain[prompt], prompt
    # an empty steering is unsteered too
    assert greedy(client, PROMPTS[0], xargs({"features": {}})) == plain[PROMPTS[0]]


@pytest.mark.parametrize("name", list(SPECS))
def test_steering_equals_steer_serve(plain, servers, reference, name):
    """Named features (add; clamp on generated tokens) and raw vectors (values add; base64
    clamp + ablate) give steer serve's tokens. The unsteered run of the same
    prompt just before warms the prefix cache: the steered request must not reuse its blocks."""
    client = sdk(servers[0])
    prompt = PROMPTS[0]
    assert greedy(client, prompt, xargs(None)) == plain[prompt]
    got = greedy(client, prompt, xargs(SPECS[name]))
    want = reference(prompt, name)
    assert got == want, name
    if name != "feature_clamp":  # (a clamp on generated tokens may leave 8 tokens unchanged)
        assert got[1] != plain[prompt][1], f"{name} changed nothing"


def test_a_steered_stream_equals_the_steered_response(servers, reference):
    """The middleware leaves vLLM's server-sent events intact (and audits before [DONE])."""
    client = sdk(servers[0])
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                       temperature=0.0, stream=True, extra_body=xargs(FEATURE))
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == reference(PROMPTS[0], "feature")[2]


def test_mixed_batch_keeps_each_requests_output(plain, servers, reference):
    """Unsteered and steered requests in flight together (one configuration: max_slots is 1)
    each give their solo output."""
    jobs = [(p, None) for p in PROMPTS] + [(p, "feature") for p in PROMPTS[:2]]

    async def go():
        client = asdk(servers[0])
        return await asyncio.gather(*(
            agreedy(client, p, xargs(SPECS[n] if n else None)) for p, n in jobs))

    outs = asyncio.run(go())
    for (p, n), out in zip(jobs, outs):
        assert out == (plain[p] if n is None else reference(p, n)), (p, n)


@pytest.mark.parametrize("text,param", [
    ("{not json", "vllm_xargs.steering"),
    (json.dumps({"features": {"no_such_feature": 1.0}}),
     "vllm_xargs.steering.features.no_such_feature"),
    (json.dumps({"vectors": [{"layer": 10, "values": [0.1] * (D - 1)}]}),
     "vllm_xargs.steering.vectors[0].values"),
    (json.dumps({"features": {"pirate": {"strength": 1.0, "mode": "twist"}}}),
     "vllm_xargs.steering.features.pirate.mode"),
    (json.dumps({"vectors": [{"layer": 10, "values": unit(1, 1e6).tolist()}]}),
     "vllm_xargs.steering.vectors[0].values"),
    (json.dumps({"experiment": "ab"}), "vllm_xargs.steering.experiment"),
])
def test_bad_steering_is_a_400_and_the_server_keeps_serving(plain, servers, text, param):
    client = sdk(servers[0])
    with pytest.raises(openai.BadRequestError) as err:
        greedy(client, PROMPTS[1], xargs(text))
    assert err.value.status_code == 400
    body = err.value.body
    assert body["param"] == param and body["type"] == "BadRequestError", body
    assert httpx.get(f"{servers[0]}/health", timeout=10).status_code == 200
    assert greedy(client, PROMPTS[1], xargs(None)) == plain[PROMPTS[1]]


def test_configurations_beyond_the_slots_wait_then_429(servers, reference):
    """max_slots 1, max_waiters 1: while a long stream holds the slot, a second configuration
    waits (and ends correct once the first is done), and a third is a 429 with Retry-After at
    once."""
    url = servers[0]
    prompt, long = PROMPTS[1], 128

    async def go():
        client = asdk(url)
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=long, temperature=0.0, stream=True,
            extra_body={**xargs(FEATURE), "ignore_eos": True})
        chunks = aiter(stream)
        texts = [(await anext(chunks)).choices[0].text]  # admitted and generating
        second = asyncio.create_task(agreedy(client, prompt, xargs(VECTOR)))
        await asyncio.sleep(1.0)  # the second now waits for the slot
        async with httpx.AsyncClient(timeout=60) as h:
            r = await h.post(f"{url}/v1/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0.0,
                "vllm_xargs": {"steering": json.dumps(VECTOR_B64)}})
        first_running = not second.done()
        async for chunk in chunks:
            texts.extend(c.text for c in chunk.choices)
        return "".join(texts), await second, r, first_running

    a_text, b, r, first_running = asyncio.run(go())
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == 429 and "waiting" in err["message"], err  # the second one waited
    assert int(r.headers["retry-after"]) >= 1
    assert first_running
    assert a_text == reference(prompt, "feature", long, ignore_eos=True)[2]
    assert b == reference(prompt, "vector")
    # the slot is free again: a third configuration runs now
    assert greedy(sdk(url), prompt, xargs(VECTOR_B64), 2)[1]
