"""Server-level numbers over real HTTP: TTFT and inter-token latency with and without steering
(S1–S3 at several concurrencies), and S5, the time to first token of inline raw vectors vs named
features — the cost of parsing and admitting a vector.

Baseline: the same model served with ``--no-steering`` (no plugin); when only a steering server is
given (``--url``), its unsteered requests stand in for the baseline, and the report says so.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from typing import Any

import httpx
import numpy as np

from clients.bench.serve_throughput import one_request, percentiles

PROMPT = "Write a long story about a lighthouse keeper."


def _vec_b64(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


def steering_bodies(scenario: str, n: int, d: int, n_layers: int, seed: int) -> list[dict | None]:
    """The ``steering`` objects of ``n`` requests of scenario S1 / S2 / S3."""
    rng = np.random.default_rng(seed)
    if scenario == "S1":
        return [None] * n
    if scenario == "S2":
        return [all_layers(rng.standard_normal(d), n_layers)] * n
    if scenario == "S3":  # distinct configs, half the requests unsteered
        return [all_layers(rng.standard_normal(d), n_layers) if i % 2 == 0 else None for i in range(n)]
    raise ValueError(scenario)


def all_layers(v: np.ndarray, n_layers: int) -> dict:
    """The ``steering`` object adding ``v`` (inline base64) at every layer, 4 / n_layers each."""
    b = _vec_b64(v)
    return {"vectors": [{"layer": L, "base64": b, "scale": 4.0 / n_layers} for L in range(n_layers)]}


async def load_run(url: str, headers: dict, model: str, bodies: list[dict | None], concurrency: int,
                   tokens: int) -> dict[str, Any]:
    """Stream len(bodies) completions, ``concurrency`` at a time; TTFT / ITL percentiles."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        await one_request(http, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2,
                                                    "stream": True, "return_token_ids": True})
        queue = list(enumerate(bodies))
        results: list[dict] = []

        async def worker() -> None:
            while queue:
                i, steering = queue.pop(0)
                body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True,
                        "temperature": 0.0, "stream": True, "return_token_ids": True}
                if steering is not None:
                    body["steering"] = steering
                results.append(await one_request(http, "/v1/completions", body))

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = loop.time() - t0
    toks = sum(r["tokens"] for r in results)
    if toks != len(bodies) * tokens:
        raise RuntimeError(f"streamed {toks} tokens, expected {len(bodies) * tokens}")
    return {"requests": len(bodies), "tok_s": toks / wall, "ttft_s": percentiles([r["ttft"] for r in results]),
            "itl_s": percentiles([g for r in results for g in r["gaps"]])}


async def _model_info(url: str, headers: dict) -> tuple[str, int, int]:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        st = (await http.get("/v1/steering")).json()
    return model, int(st["hidden_size"]), int(st["num_layers"])


def run_latency(servers: dict[str, tuple[str, dict]], concurrencies: list[int], tokens: int,
                requests_per_level: int | None, rounds: int = 1, idle_s: float = 0.0,
                log=print) -> list[dict]:
    """Rows of {scenario, concurrency, tok_s, ttft_s, itl_s} for each scenario and concurrency.

    ``servers`` maps each scenario to the (url, headers) it runs on: "base" sends unsteered
    requests (on a ``--no-steering`` server for the baseline), S1–S3 need a steering server. At each
    concurrency the scenarios run one after another, ``rounds`` times, each run after ``idle_s``
    of quiet (the other server's workers stop polling); a row holds the medians over rounds of
    tok/s and of each percentile, and every round's numbers under ``rounds``."""
    models: dict[str, str] = {}  # url → served model
    shapes: dict[str, tuple[int, int]] = {}  # url → (hidden size, layers), steering servers only
    for sc, (url, headers) in servers.items():
        if url not in models:
            models[url] = asyncio.run(_model_name(url, headers))
        if sc != "base" and url not in shapes:
            shapes[url] = asyncio.run(_model_info(url, headers))[1:]
    runs: dict[tuple[str, int], list[dict]] = {}
    for c in concurrencies:
        n = requests_per_level or 2 * c
        for r in range(rounds):
            for sc, (url, headers) in servers.items():
                bodies = [None] * n if sc == "base" else steering_bodies(sc, n, *shapes[url], seed=c)
                time.sleep(idle_s)
                res = asyncio.run(load_run(url, headers, models[url], bodies, c, tokens))
                runs.setdefault((sc, c), []).append(res)
                log(f"{sc:4s} c={c:2d} round {r + 1}: {res['tok_s']:7.1f} tok/s, TTFT p50 "
                    f"{res['ttft_s']['p50'] * 1e3:7.1f} ms p99 {res['ttft_s']['p99'] * 1e3:7.1f} ms, ITL p50 "
                    f"{res['itl_s']['p50'] * 1e3:6.1f} ms p99 {res['itl_s']['p99'] * 1e3:6.1f} ms")
    rows = []
    for (sc, c), rs in runs.items():
        med = lambda key, q: statistics.median(x[key][q] for x in rs)  # noqa: E731
        rows.append({"scenario": sc, "concurrency": c, "requests": rs[0]["requests"],
                     "tok_s": statistics.median(x["tok_s"] for x in rs),
                     "ttft_s": {q: med("ttft_s", q) for q in rs[0]["ttft_s"]},
                     "itl_s": {q: med("itl_s", q) for q in rs[0]["itl_s"]},
                     "rounds": rs})
    return rows


async def _model_name(url: str, headers: dict) -> str:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        return (await http.get("/v1/models")).json()["data"][0]["id"]


async def _ttft(http: httpx.AsyncClient, model: str, steering: dict | None) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0.0, "stream": True,
            "return_token_ids": True}
    if steering is not None:
        body["steering"] = steering
    return (await one_request(http, "/v1/completions", body))["ttft"]


def run_s5(url: str, headers: dict, requests: int, feature: str, vectors: int = 1, log=print) -> dict:
    """S5: median TTFT of inline base64 vectors vs a named feature, one request at a time.

    Every request carries a fresh vector / a fresh strength, so each one is parsed, compiled and
    written into a slot (no slot reuse); the three kinds alternate to share the machine's drift."""
    model, d, n_layers = asyncio.run(_model_info(url, headers))
    rng = np.random.default_rng(5)
    mid = n_layers // 2

    async def go() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"unsteered": [], "named": [], "inline": []}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
            await _ttft(http, model, None)
            for i in range(requests):
                out["unsteered"].append(await _ttft(http, model, None))
                out["named"].append(await _ttft(http, model, {"features": {feature: 0.5 + 0.001 * i}}))
                vecs = [{"layer": mid, "base64": _vec_b64(rng.standard_normal(d)), "scale": 1.0}
                        for _ in range(vectors)]
                out["inline"].append(await _ttft(http, model, {"vectors": vecs}))
        return out

    s = asyncio.run(go())
    med = {k: statistics.median(v) for k, v in s.items()}
    res = {"requests": requests, "feature": feature, "vectors_per_request": vectors,
           "ttft_median_s": med, "samples_s": s,
           "inline_minus_named_ms": (med["inline"] - med["named"]) * 1e3,
           "named_minus_unsteered_ms": (med["named"] - med["unsteered"]) * 1e3,
           "inline_minus_unsteered_ms": (med["inline"] - med["unsteered"]) * 1e3}
    log(f"S5 TTFT median: unsteered {med['unsteered'] * 1e3:.1f} ms, named {med['named'] * 1e3:.1f} ms, "
        f"inline {med['inline'] * 1e3:.1f} ms → inline − named {res['inline_minus_named_ms']:+.1f} ms")
    return res
