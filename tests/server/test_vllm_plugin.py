"""Engine-free tests of the stock-vLLM steering middleware (server/vllm_plugin.py): body
handling, error shapes, cache salts, the slot gate and the seating audit, around a tiny ASGI app
that stands in for vLLM's server."""

from __future__ import annotations

import asyncio
import base64
import json
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette

from server.vllm_plugin import (
    PluginOptions,
    SteeringMiddleware,
    SteeringPlugin,
    combined_salt,
    find_steering,
)
from steering.config import SteeringConfig
from steering.features import Feature, StaticFeatureSource
from steering.request import SteeringCompiler

D, L = 16, 4
MODEL = "tiny"


class Inner:
    """Stands in for vLLM's app: echoes what reached it; ``hold`` makes it wait (a long
    generation); ``stream`` bodies answer with server-sent events."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Queue()

    async def __call__(self, scope, receive, send):
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        raw = b"".join(chunks)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.calls.append({"path": scope["path"], "raw": raw, "headers": headers})
        await self.entered.put(scope["path"])
        if self.hold is not None:
            await self.hold.wait()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for part in (b'data: {"choices": []}\n\n', b"data: [DONE]\n\n"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        out = json.dumps({"echo": body, "content_length": headers.get("content-length")}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


class FakeEngine:
    def __init__(self) -> None:
        self.unseated: set[str] = set()
        self.asked: list[str] = []

    async def collective_rpc(self, method, args=(), **_):
        assert method == "steering_take_unseated"
        self.asked.extend(args[0])
        return [[k for k in args[0] if k in self.unseated]]


def make_compiler(cfg: SteeringConfig) -> SteeringCompiler:
    rng = np.random.default_rng(1)
    feats = StaticFeatureSource([
        Feature("tone/formality", 1, "direction", rng.standard_normal(D), scale=3.0),
        Feature("tone/pirate", 2, "direction", rng.standard_normal(D)),
    ])
    return SteeringCompiler(cfg, hidden_size=D, num_layers=L, feature_source=feats)


def build(slots: int = 1, **options) -> tuple[httpx.AsyncClient, Inner, SteeringPlugin, FakeEngine]:
    cfg = SteeringConfig(max_slots=slots)
    engine = FakeEngine()
    plugin = SteeringPlugin(cfg, make_compiler(cfg), PluginOptions(**options), engine_client=engine)
    inner = Inner()
    app = SteeringMiddleware(inner, plugin=plugin)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return client, inner, plugin, engine


def xargs(steering: Any, **fields) -> dict[str, Any]:
    s = steering if isinstance(steering, str) else json.dumps(steering)
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"steering": s}, **fields}


def vector(seed: int = 0, norm: float = 1.0) -> dict[str, Any]:
    v = np.random.default_rng(seed).standard_normal(D)
    return {"vectors": [{"layer": 1, "values": (v / np.linalg.norm(v) * norm).tolist()}]}


def error_of(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status and err["param"] == param, err
    return err


def run(coro):
    return asyncio.run(coro)


# -- pass-through ----------------------------------------------------------------------------
def test_unsteered_and_non_generation_requests_pass_untouched():
    async def go():
        client, inner, plugin, _ = build()
        raw = b'{"model": "tiny",   "prompt": "steering wheels", "vllm_xargs": {"other": 1}}'
        r = await client.post("/v1/completions", content=raw,
                              headers={"content-type": "application/json"})
        assert r.status_code == 200 and inner.calls[-1]["raw"] == raw
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert r.status_code == 200
        assert json.loads(inner.calls[-1]["raw"]) == {"model": MODEL, "messages": []}
        r = await client.get("/health")
        assert r.status_code == 200 and inner.calls[-1]["path"] == "/health"
        # not JSON at all: vLLM answers its own error
        r = await client.post("/v1/completions", content=b"{steering",
                              headers={"content-type": "application/json"})
        assert r.status_code == 200 and inner.calls[-1]["raw"] == b"{steering"
        # an empty steering asks for nothing: untouched (the worker runs it unsteered too)
        body = xargs({"features": {}})
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200 and json.loads(inner.calls[-1]["raw"]) == body
        assert plugin.gate.resident == 0
    run(go())


def test_steered_body_gets_the_salt_and_a_request_id():
    async def go():
        client, inner, plugin, _ = build()
        spec = {"features": {"formality": 0.5}, "apply_to": "generated"}
        r = await client.post("/v1/completions", json=xargs(spec))
        assert r.status_code == 200, r.text
        echo = r.json()
        sent = echo["echo"]
        compiled = plugin.compiler.compile(spec)
        assert sent["cache_salt"] == compiled.cache_salt == f"steer-{compiled.hash}"
        assert sent["vllm_xargs"]["steering"] == json.dumps(spec)  # the string is not rewritten
        assert sent["request_id"].startswith("steer-")
        assert int(echo["content_length"]) == len(inner.calls[-1]["raw"])
        # a client salt is combined deterministically; a client id is kept
        r1 = await client.post("/v1/completions", json=xargs(spec, cache_salt="mine",
                                                             request_id="abc"))
        r2 = await client.post("/v1/completions", json=xargs(spec, cache_salt="mine"))
        s1, s2 = r1.json()["echo"], r2.json()["echo"]
        assert s1["cache_salt"] == s2["cache_salt"] == combined_salt(compiled, "mine")
        assert s1["cache_salt"] not in ("mine", compiled.cache_salt)
        assert s1["request_id"] == "abc"
        other = combined_salt(plugin.compiler.compile({"features": {"formality": 0.6}}), "mine")
        assert other != s1["cache_salt"] and len(other) <= 128 and "/" not in other
        # chat and responses too; salts differ per configuration
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}],
            "vllm_xargs": {"steering": json.dumps(vector(1))}})
        assert r.json()["echo"]["cache_salt"] == plugin.compiler.compile(vector(1)).cache_salt
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                     "vllm_xargs": {"steering": json.dumps(vector(2))}})
        assert r.json()["echo"]["cache_salt"] == plugin.compiler.compile(vector(2)).cache_salt
        assert "request_id" not in r.json()["echo"]
        assert plugin.gate.resident == 0  # every lease released once its response was sent
    run(go())


def test_base64_vectors_and_every_mode_compile():
    async def go():
        client, inner, plugin, _ = build()
        v = np.random.default_rng(5).standard_normal(D).astype("<f4")
        b64 = base64.b64encode(v.tobytes()).decode()
        for spec in [{"vectors": [{"layer": 2, "base64": b64, "scale": 0.5}]},
                     {"vectors": [{"layer": 2, "base64": b64, "mode": "clamp", "target": 1.0}]},
                     {"vectors": [{"layer": 2, "base64": b64, "mode": "scale", "scale": 2.0}]},
                     {"vectors": [{"layer": 2, "base64": b64, "mode": "ablate"}]},
                     {"features": {"pirate": {"mode": "ablate"}}, "apply_to": "prompt"}]:
            r = await client.post("/v1/completions", json=xargs(spec))
            assert r.status_code == 200, (spec, r.text)
            assert r.json()["echo"]["cache_salt"] == plugin.compiler.compile(spec).cache_salt
    run(go())


# -- errors ----------------------------------------------------------------------------------
BAD = [
    ("{not json", "vllm_xargs.steering"),
    ('"just a string"', "vllm_xargs.steering"),
    (json.dumps({"features": {"nope": 1.0}}), "vllm_xargs.steering.features.nope"),
    (json.dumps({"vectors": [{"layer": 1, "values": [1.0, 2.0]}]}),
     "vllm_xargs.steering.vectors[0].values"),
    (json.dumps({"vectors": [{"layer": 1, "base64": "AAAA"}]}),
     "vllm_xargs.steering.vectors[0].base64"),
    (json.dumps({"features": {"pirate": {"strength": 1, "mode": "twist"}}}),
     "vllm_xargs.steering.features.pirate.mode"),
    (json.dumps({"features": {"pirate": 99.0}}), "vllm_xargs.steering.features.pirate"),
    (json.dumps({"vectors": [{"layer": 9, "values": [0.1] * D}]}),
     "vllm_xargs.steering.vectors[0].layer"),
    (json.dumps({"apply_to": "sometimes", "features": {"pirate": 1}}),
     "vllm_xargs.steering.apply_to"),
    (json.dumps({"experiment": "ab-test"}), "vllm_xargs.steering.experiment"),
    (json.dumps({"features": {"pirate": 1}, "return_activations": True}),
     "vllm_xargs.steering.return_activations"),
    (json.dumps({"monitors": [{"feature": "pirate", "above": 1.0, "action": "stop"}]}),
     "vllm_xargs.steering.monitors"),
    (json.dumps({"features": {"pirate": 1}, "colour": "red"}), "vllm_xargs.steering.colour"),
]


@pytest.mark.parametrize("text,param", BAD)
def test_invalid_steering_is_a_400_in_vllms_shape(text, param):
    async def go():
        client, inner, plugin, _ = build()
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [], "vllm_xargs": {"steering": text}})
        err = error_of(r, 400, param)
        assert err["type"] == "BadRequestError" and err["message"]
        assert inner.calls == [] and plugin.gate.resident == 0
    run(go())


def test_steering_must_be_a_string_and_must_sit_in_vllm_xargs():
    async def go():
        client, inner, _, _ = build()
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                       "vllm_xargs": {"steering": 3}})
        error_of(r, 400, "vllm_xargs.steering")
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "x", "vllm_xargs": {"steering": ["a"]}})
        error_of(r, 400, "vllm_xargs.steering")
        r = await client.post("/v1/responses", json={
            "model": MODEL, "input": "x", "background": True,
            "vllm_xargs": {"steering": json.dumps(vector())}})
        error_of(r, 400, "background")
        assert inner.calls == []
    run(go())


def test_steering_on_other_routes_is_refused():
    async def go():
        client, inner, _, _ = build()
        s = json.dumps(vector())
        for path, body in [
            ("/v1/messages", {"model": MODEL, "messages": [], "vllm_xargs": {"steering": s}}),
            ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {
                "extra_args": {"steering": s}}}),
            ("/invocations", {"model": MODEL, "prompt": "x", "vllm_xargs": {"steering": s}}),
            ("/v1/chat/completions/batch", [{"vllm_xargs": {"steering": s}}]),
        ]:
            r = await client.post(path, json=body)
            error_of(r, 400, "vllm_xargs.steering")
        r = await client.post("/v1/audio/transcriptions", files={"file": b"x"},
                              data={"vllm_xargs": json.dumps({"steering": s})})
        error_of(r, 400, "vllm_xargs.steering")
        # FastAPI reads a body without a content type as JSON: it is looked through too
        r = await client.post("/inference/v1/generate", content=json.dumps(
            {"sampling_params": {"extra_args": {"steering": s}}}).encode())
        error_of(r, 400, "vllm_xargs.steering")
        assert inner.calls == []
        # the word alone is fine
        r = await client.post("/v1/messages", json={"model": MODEL, "messages": [
            {"role": "user", "content": "power steering"}]})
        assert r.status_code == 200 and len(inner.calls) == 1
    run(go())


def test_body_size_is_bounded():
    async def go():
        client, inner, _, _ = build(max_body_bytes=1000)
        r = await client.post("/v1/completions", json=xargs(vector(), prompt="x" * 2000))
        error_of(r, 413, None)
        async def chunks():
            for _ in range(4):
                yield b"x" * 400
        r = await client.post("/v1/completions", content=chunks(),
                              headers={"content-type": "application/json"})
        error_of(r, 413, None)
        assert inner.calls == []
    run(go())


def test_requests_the_api_key_guard_refuses_are_left_to_vllm():
    async def go():
        inner = Inner()
        app = Starlette()
        app.state.args = SimpleNamespace(api_key=["sk-test"])
        cfg = SteeringConfig(max_slots=1)
        mw = SteeringMiddleware(inner, plugin=SteeringPlugin(cfg, make_compiler(cfg)))
        async def wrapped(scope, receive, send):
            scope["app"] = app
            await mw(scope, receive, send)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t")
        bad = {"model": MODEL, "prompt": "x", "vllm_xargs": {"steering": "{oops"}}
        r = await client.post("/v1/completions", json=bad)  # no key: vLLM's 401, not our 400
        assert r.status_code == 200 and len(inner.calls) == 1
        r = await client.post("/v1/completions", json=bad,
                              headers={"Authorization": "Bearer sk-test"})
        error_of(r, 400, "vllm_xargs.steering")
    run(go())


# -- the plugin built from vLLM's config -----------------------------------------------------
def _vllm_app(additional: dict[str, Any] | None) -> Starlette:
    app = Starlette()
    hf = SimpleNamespace(hidden_size=D, num_hidden_layers=L)
    app.state.vllm_config = SimpleNamespace(
        additional_config=additional, scheduler_config=SimpleNamespace(max_num_seqs=8),
        model_config=SimpleNamespace(hf_text_config=hf, model="/nonexistent", tokenizer="x"))
    return app


def _client_for(app: Starlette, inner: Inner) -> httpx.AsyncClient:
    mw = SteeringMiddleware(inner)

    async def wrapped(scope, receive, send):
        scope["app"] = app
        await mw(scope, receive, send)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t")


def test_plugin_is_built_lazily_from_the_vllm_config():
    async def go():
        inner = Inner()
        client = _client_for(_vllm_app({"steering": {"max_slots": 2, "layers": [1, 2]},
                                        "steering_api": {"measure_norms": False}}), inner)
        r = await client.post("/v1/completions", json=xargs(vector()))
        assert r.status_code == 200, r.text
        r = await client.post("/v1/completions", json=xargs({"features": {"pirate": 1}}))
        error_of(r, 400, "vllm_xargs.steering.features.pirate")  # no packs configured
        r = await client.post("/v1/completions", json=xargs(
            {"vectors": [{"layer": 3, "values": [0.1] * D}]}))
        error_of(r, 400, "vllm_xargs.steering.vectors[0].layer")  # not a steerable layer
    run(go())


def test_a_server_without_the_worker_config_says_so():
    async def go():
        inner = Inner()
        client = _client_for(_vllm_app({}), inner)
        r = await client.post("/v1/completions", json=xargs(vector()))
        err = error_of(r, 500, "vllm_xargs.steering")
        assert "--worker-cls" in err["message"]
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 200  # unsteered traffic is unaffected
        bad = _client_for(_vllm_app({"steering": {}, "steering_api": {"nope": 1}}), inner)
        err = error_of(await bad.post("/v1/completions", json=xargs(vector())), 500,
                       "vllm_xargs.steering")
        assert "nope" in err["message"]
    run(go())


def test_options_reject_unknown_keys():
    with pytest.raises(ValueError, match="bogus"):
        PluginOptions.from_dict({"bogus": 1})
    assert PluginOptions.from_dict(None) == PluginOptions()


def test_find_steering():
    assert find_steering({"a": [{"vllm_xargs": {"steering": "x"}}]})
    assert find_steering({"sampling_params": {"extra_args": {"steering": "x"}}})
    assert not find_steering({"messages": [{"content": "steering"}], "vllm_xargs": {"x": 1}})


# -- slots -----------------------------------------------------------------------------------
def test_distinct_configurations_beyond_the_slots_wait_then_429():
    async def go():
        client, inner, plugin, _ = build(slots=1, max_waiters=1, queue_timeout=30)
        inner.hold = asyncio.Event()
        a = asyncio.create_task(client.post("/v1/completions", json=xargs(vector(1))))
        assert await inner.entered.get() == "/v1/completions"
        # the same configuration shares the resident slot: it runs at once
        same = asyncio.create_task(client.post("/v1/completions", json=xargs(vector(1))))
        await inner.entered.get()
        # another configuration waits for the slot ...
        b = asyncio.create_task(client.post("/v1/completions", json=xargs(vector(2))))
        for _ in range(100):
            if plugin.gate.waiting:
                break
            await asyncio.sleep(0.01)
        assert plugin.gate.waiting == 1 and len(inner.calls) == 2
        # ... and one more than max_waiters is a 429 at once, with Retry-After
        r = await client.post("/v1/completions", json=xargs(vector(3)))
        error_of(r, 429, None)
        assert int(r.headers["retry-after"]) >= 1
        # unsteered traffic never waits
        r2 = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}))
        await inner.entered.get()
        inner.hold.set()
        ra, rs, rb, ru = await asyncio.gather(a, same, b, r2)
        assert [x.status_code for x in (ra, rs, rb, ru)] == [200, 200, 200, 200]
        assert rb.json()["echo"]["cache_salt"] == plugin.compiler.compile(vector(2)).cache_salt
        assert plugin.gate.resident == 0 and plugin.gate.waiting == 0
    run(go())


def test_the_slot_wait_times_out_with_a_429():
    async def go():
        client, inner, plugin, _ = build(slots=1, queue_timeout=0.2)
        inner.hold = asyncio.Event()
        a = asyncio.create_task(client.post("/v1/completions", json=xargs(vector(1))))
        await inner.entered.get()
        r = await client.post("/v1/completions", json=xargs(vector(2)))
        err = error_of(r, 429, None)
        assert "0.2" in err["message"] and r.headers["retry-after"]
        inner.hold.set()
        assert (await a).status_code == 200
        assert plugin.gate.resident == 0 and plugin.gate.rejected["timeout"] == 1
    run(go())


def test_the_lease_is_released_when_the_client_leaves():
    async def go():
        cfg = SteeringConfig(max_slots=1)
        plugin = SteeringPlugin(cfg, make_compiler(cfg))
        left, running = asyncio.Event(), asyncio.Event()

        async def inner(scope, receive, send):  # like vLLM: watches for the disconnect
            await receive()
            running.set()
            assert (await receive())["type"] == "http.disconnect"
            left.set()

        mw = SteeringMiddleware(inner, plugin=plugin)
        body = json.dumps(xargs(vector(1))).encode()
        msgs = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if msgs:
                return msgs.pop(0)
            await running.wait()  # the client leaves once its request runs
            return {"type": "http.disconnect"}

        async def send(msg):
            raise AssertionError("nothing is sent to a client that left")

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [
            (b"content-type", b"application/json")]}
        await mw(scope, receive, send)
        assert left.is_set() and plugin.gate.resident == 0
    run(go())


def test_a_client_that_leaves_while_waiting_for_a_slot_stops_waiting():
    """It used to wait its whole queue_timeout (holding a waiter place) and then reach vLLM."""
    async def go():
        client, inner, plugin, _ = build(slots=1, max_waiters=1, queue_timeout=30)
        inner.hold = asyncio.Event()
        a = asyncio.create_task(client.post("/v1/completions", json=xargs(vector(1))))
        await inner.entered.get()
        body = json.dumps(xargs(vector(2))).encode()
        leave = asyncio.Event()
        msgs = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if msgs:
                return msgs.pop(0)
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            raise AssertionError("nothing is sent to a client that left")

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [
            (b"content-type", b"application/json")]}
        waiter = asyncio.create_task(SteeringMiddleware(inner, plugin=plugin)(scope, receive, send))
        for _ in range(100):
            if plugin.gate.waiting:
                break
            await asyncio.sleep(0.01)
        assert plugin.gate.waiting == 1
        leave.set()
        await asyncio.wait_for(waiter, 2)  # at once, not after the 30 s queue timeout
        assert plugin.gate.waiting == 0 and len(inner.calls) == 1  # it never reached vLLM
        inner.hold.set()
        assert (await a).status_code == 200
        assert plugin.gate.resident == 0
    run(go())


# -- seating audit ---------------------------------------------------------------------------
def test_an_unseated_request_fails_instead_of_passing_as_steered():
    async def go():
        client, inner, plugin, engine = build()
        engine.unseated = {"cmpl-r1", "chatcmpl-r2"}
        r = await client.post("/v1/completions", json=xargs(vector(), request_id="r1"))
        err = error_of(r, 503, "vllm_xargs.steering")
        assert err["type"] == "ServiceUnavailableError"
        r = await client.post("/v1/completions", json=xargs(vector(), request_id="r0"))
        assert r.status_code == 200 and r.json()["echo"]["request_id"] == "r0"
        # a stream: an error event before [DONE]
        body = {"model": MODEL, "messages": [], "stream": True,
                "vllm_xargs": {"steering": json.dumps(vector())}}
        r = await client.post("/v1/chat/completions", json=body, headers={"x-request-id": "r2"})
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == 503
        r = await client.post("/v1/chat/completions", json=body, headers={"x-request-id": "r3"})
        assert "error" not in r.text and r.text.endswith("data: [DONE]\n\n")
        assert engine.asked == ["cmpl-r1", "cmpl-r0", "chatcmpl-r2", "chatcmpl-r3"]
        # unsteered requests are never audited
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert len(engine.asked) == 4
    run(go())
