"""Engine-free HTTP tests of the steering limits (issue 16): the slot queue answers 429 before any
stream starts, slots and readouts are freed however a request ends, a request a worker could not
seat fails instead of passing for steered, and readouts are bounded in bytes. The real app and
compiler over a scripted engine, driven through ASGI directly so a client can hang up mid-stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fakes import AUTH, MODEL, load_parts, make_state

from server.app import create_app
from server.config import ServeConfig
from server.steering_limits import SteeringLimits
from steering.worker.readouts import READOUT_DROPPED
from steering.worker.slots import SlotGate

VECTOR = {"vectors": [{"layer": 3, "values": [0.01] * 576}]}
READOUT = {"features": {"pirate": 1.0}, "return_activations": True}  # one clamp entry at layer 10


class ScriptedEngine:
    """Streams ``chunks`` one-token deltas (``delay`` apart; None: forever) and answers the
    steering RPCs; records aborts and RPC calls."""

    errored = False

    def __init__(self, chunks: int | None = 3, delay: float = 0.0) -> None:
        self.chunks, self.delay = chunks, delay
        self.aborted: list[str] = []
        self.rpcs: list[tuple[str, tuple]] = []
        self.readout: Any = []
        self.started = asyncio.Event()

    async def generate(self, prompt, params, request_id):
        self.started.set()
        i = 0
        while self.chunks is None or i < self.chunks:
            await asyncio.sleep(self.delay)
            i += 1
            last = self.chunks is not None and i == self.chunks
            out = SimpleNamespace(index=0, text=f"t{i} ", token_ids=[i], logprobs=None,
                                  finish_reason="length" if last else None)
            yield SimpleNamespace(outputs=[out], finished=last, prompt_logprobs=None)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    async def collective_rpc(self, method, args=()):
        self.rpcs.append((method, args))
        if method == "steering_take_unseated":
            return [[]]  # every request was seated
        if method == "steering_readout":
            return [self.readout]
        return [0]

    def get_num_unfinished_requests(self) -> int:
        return 0


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return load_parts()


@pytest.fixture
def make(parts, tmp_path) -> Iterator[Any]:
    states = []

    def build(engine=None, slots=1, timeout=30.0, waiters=None, readout=64 * 2**20,
              readout_total=512 * 2**20):
        engine = engine or ScriptedEngine()
        state = make_state(parts, tmp_path, ServeConfig(api_key="sk-test"), engine=engine)
        state.gate = SlotGate(slots, queue_timeout=timeout, max_waiters=waiters)
        state.limits = SteeringLimits(state.gate, state.metrics, lambda: engine.collective_rpc,
                                      max_readout_bytes=readout, max_readout_bytes_total=readout_total)
        app = create_app(state)
        state.experiments.ready()
        states.append(state)
        return app, state, engine

    yield build
    for state in states:
        state.experiments.close()


async def call(app, path: str, body: dict, hang_up_after: int | None = None,
               hang_up: asyncio.Event | None = None) -> tuple[int, dict[str, str], list[bytes]]:
    """One HTTP request through ASGI; the client hangs up after ``hang_up_after`` body chunks
    or when ``hang_up`` is set."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode()),
                         *((k.encode(), v.encode()) for k, v in AUTH.items())]}
    status, headers, chunks = 0, {}, []
    body_sent = False
    gone = hang_up or asyncio.Event()

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update((k.decode(), v.decode()) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if hang_up_after is not None and len(chunks) >= hang_up_after:
                gone.set()

    await asyncio.wait_for(app(scope, receive, send), 10)
    return status, headers, chunks


def chat(steering=None, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    if steering is not None:
        body["steering"] = steering
    return body


def events(chunks: list[bytes]) -> list[Any]:
    text = b"".join(chunks).decode()
    return [json.loads(x[6:]) if x[6:] != "[DONE]" else "[DONE]"
            for x in text.split("\n\n") if x.startswith("data: ")]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def rejected(state, reason: str) -> float:
    return state.metrics.steering_rejected.labels(reason)._value.get()


async def test_full_queue_is_a_429_before_any_stream_starts(make):
    app, state, engine = make(waiters=0)
    other = await state.gate.acquire("another configuration")
    status, headers, chunks = await call(app, "/v1/chat/completions", chat(VECTOR, stream=True))
    assert status == 429 and headers["content-type"] == "application/json"
    assert int(headers["retry-after"]) >= 1
    err = json.loads(b"".join(chunks))["error"]
    assert err["code"] == "steering_capacity_exceeded" and err["type"] == "rate_limit_exceeded"
    assert not engine.started.is_set()  # nothing reached the engine
    assert rejected(state, "queue_full") == 1
    # unsteered requests and requests sharing a resident configuration never queue
    status, _, _ = await call(app, "/v1/chat/completions", chat(stream=True))
    assert status == 200
    other.release()
    assert state.gate.resident == 0


async def test_a_wait_that_times_out_is_a_429_and_counted(make):
    app, state, _ = make(timeout=0.05)
    other = await state.gate.acquire("another configuration")
    status, headers, chunks = await call(app, "/v1/completions",
                                         {"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                          "steering": VECTOR})
    assert status == 429 and "retry-after" in headers
    assert "within 0.05 s" in json.loads(b"".join(chunks))["error"]["message"]
    assert rejected(state, "timeout") == 1 and state.gate.waiting == 0
    scrape = (await call_metrics(app)).decode()
    assert 'steer_steering_rejected_total{reason="timeout"} 1.0' in scrape
    other.release()


async def call_metrics(app) -> bytes:
    out: list[bytes] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body":
            out.append(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/metrics", "raw_path": b"/metrics", "query_string": b"",
             "root_path": "", "server": ("test", 80), "client": ("test", 1),
             "headers": [(k.encode(), v.encode()) for k, v in AUTH.items()]}
    await app(scope, receive, send)
    return b"".join(out)


async def test_a_waiting_request_runs_once_a_slot_frees(make):
    app, state, _ = make()
    other = await state.gate.acquire("another configuration")
    task = asyncio.create_task(call(app, "/v1/chat/completions", chat(VECTOR)))
    await asyncio.sleep(0.05)
    assert state.gate.waiting == 1 and not task.done()
    other.release()
    status, _, chunks = await task
    assert status == 200, chunks
    assert json.loads(b"".join(chunks))["choices"][0]["message"]["content"] == "t1 t2 t3 "
    assert state.gate.resident == 0 and state.gate.waiting == 0


async def test_client_leaving_mid_stream_frees_slot_and_readout(make):
    engine = ScriptedEngine(chunks=None, delay=0.01)
    app, state, _ = make(engine=engine)
    status, _, chunks = await call(app, "/v1/chat/completions", chat(READOUT, stream=True),
                                   hang_up_after=2)
    assert status == 200 and chunks
    await settle()
    assert state.gate.resident == 0 and len(engine.aborted) == 1
    assert ("steering_drop_readout", (engine.aborted[0],)) in engine.rpcs
    assert state.limits.readout_in_flight == 0


async def test_a_raw_vector_readout_is_dropped_when_its_client_leaves(make):
    """Raw vectors alone budget 0 readout bytes, yet the workers open a readout for them: found
    by the soak, every such stream hung up on left an empty readout until the 120 s TTL."""
    engine = ScriptedEngine(chunks=None, delay=0.01)
    app, state, _ = make(engine=engine)
    steering = {"vectors": [{"layer": 10, "values": [0.01] * 576}], "return_activations": True}
    status, _, chunks = await call(app, "/v1/chat/completions", chat(steering, stream=True),
                                   hang_up_after=2)
    assert status == 200 and chunks
    await settle()
    assert len(engine.aborted) == 1
    assert ("steering_drop_readout", (engine.aborted[0],)) in engine.rpcs
    assert state.limits.readout_in_flight == 0


async def test_client_leaving_while_waiting_for_a_slot_leaves_no_waiter(make):
    app, state, engine = make()
    other = await state.gate.acquire("another configuration")
    gone = asyncio.Event()
    task = asyncio.create_task(call(app, "/v1/chat/completions", chat(READOUT), hang_up=gone))
    await asyncio.sleep(0.05)
    assert state.gate.waiting == 1 and state.limits.readout_in_flight > 0
    gone.set()
    status, _, _ = await task
    assert status == 499 and not engine.started.is_set()
    assert state.gate.waiting == 0 and state.limits.readout_in_flight == 0
    other.release()
    assert state.gate.resident == 0


async def test_streams_that_finish_or_fail_free_their_slot(make):
    app, state, engine = make()
    status, _, chunks = await call(app, "/v1/chat/completions", chat(VECTOR, stream=True))
    assert status == 200 and events(chunks)[-1] == "[DONE]"
    assert state.gate.resident == 0 and not engine.aborted

    class Broken(ScriptedEngine):
        async def generate(self, prompt, params, request_id):
            raise RuntimeError("worker exploded")
            yield  # pragma: no cover

    app, state, _ = make(engine=Broken())
    status, _, chunks = await call(app, "/v1/chat/completions", chat(VECTOR, stream=True))
    evs = events(chunks)
    assert status == 200 and "error" in evs[-2] and evs[-1] == "[DONE]"
    assert "exploded" not in json.dumps(evs)  # no exception text leaks
    assert state.gate.resident == 0


async def test_an_unseated_request_fails_instead_of_passing_for_steered(make):
    class Unseating(ScriptedEngine):
        async def collective_rpc(self, method, args=()):
            self.rpcs.append((method, args))
            if method == "steering_take_unseated":
                return [list(args[0])]  # every steered request ran unsteered
            return [[]]

    app, state, engine = make(engine=Unseating())
    status, _, chunks = await call(app, "/v1/chat/completions", chat(VECTOR))
    err = json.loads(b"".join(chunks))["error"]
    assert status == 503 and err["code"] == "steering_unavailable"
    assert state.gate.resident == 0
    status, _, chunks = await call(app, "/v1/chat/completions", chat(VECTOR, stream=True))
    evs = events(chunks)
    assert status == 200 and evs[-2]["error"]["code"] == "steering_unavailable"
    assert evs[-1] == "[DONE]"
    # unsteered requests are never audited; steered ones that ended together share one RPC
    audits = lambda: sum(m == "steering_take_unseated" for m, _ in engine.rpcs)  # noqa: E731
    n = audits()
    assert (await call(app, "/v1/chat/completions", chat()))[0] == 200
    assert audits() == n
    results = await asyncio.gather(*(call(app, "/v1/chat/completions", chat(VECTOR)) for _ in range(3)))
    assert [r[0] for r in results] == [503] * 3
    assert audits() - n < 3


async def test_a_readout_over_the_per_request_bound_is_a_400(make):
    app, state, engine = make(readout=1000)
    status, _, chunks = await call(app, "/v1/chat/completions", chat(READOUT))
    err = json.loads(b"".join(chunks))["error"]
    assert status == 400 and err["param"] == "steering.return_activations"
    assert err["code"] == "readout_too_large" and "--max-readout-bytes" in err["message"]
    status, _, chunks = await call(app, "/v1/features/inspect",
                                   {"text": "The bridge at dusk.", "features": ["pirate"]})
    err = json.loads(b"".join(chunks))["error"]
    assert status == 400 and err["param"] == "text", err
    assert not engine.started.is_set() and state.limits.readout_in_flight == 0
    # without return_activations the bound does not apply
    assert (await call(app, "/v1/chat/completions", chat({"features": {"pirate": 1.0}})))[0] == 200


async def test_readouts_in_flight_are_bounded_and_freed_when_popped(make):
    app, state, engine = make(readout_total=100_000)
    state.limits.readout_in_flight = 99_000  # others' readouts
    status, headers, chunks = await call(app, "/v1/chat/completions", chat(READOUT))
    assert status == 429 and "retry-after" in headers
    assert rejected(state, "readout_budget") == 1
    state.limits.readout_in_flight = 0
    status, _, chunks = await call(app, "/v1/chat/completions", chat(READOUT))
    assert status == 200 and json.loads(b"".join(chunks))["steering"]["activations"] == []
    assert state.limits.readout_in_flight == 0
    assert not any(m == "steering_drop_readout" for m, _ in engine.rpcs)  # popped, not dropped
    engine.readout = READOUT_DROPPED  # the workers had to drop it: never a short readout
    status, _, chunks = await call(app, "/v1/chat/completions", chat(READOUT))
    assert status == 429 and json.loads(b"".join(chunks))["error"]["param"] == "steering.return_activations"
    assert state.limits.readout_in_flight == 0 and state.gate.resident == 0
