"""What admitting steered requests costs when many arrive at once: bursts of ``c`` streamed
requests, all sent together, timed to the response headers (the API has parsed and compiled the
request and handed it to the engine) and to the first token.

    python -m clients.bench.admission --url http://127.0.0.1:8000 [--url http://127.0.0.1:8001] \\
        --concurrency 16 --bursts 9

``--micro`` times, without a server, the two per-request costs this depends on: compiling a
30-layer inline-vector request (API process) and writing its program into a slot (worker).

Scenarios per burst: ``none`` (unsteered), ``S2`` (one inline base64 vector at every layer, the
same for all requests), ``S3`` (a distinct such vector per request). Every round runs each
scenario once on each server given, in a rotating order, so servers built from two checkouts
(before/after a change) are compared under the same load. Request bodies are encoded before the
clock starts: the load generator's JSON encoding of ~94 KB bodies is not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from typing import Any

import httpx
import numpy as np

from clients.bench.server import PROMPT, _vec_b64, all_layers
from steering.wire import WireRecord

SCENARIOS = ("none", "S2", "S3")


def burst_bodies(scenario: str, c: int, model: str, d: int, layers: int, seed: int) -> list[bytes]:
    """``c`` encoded completion bodies of one scenario (1 token each)."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(d)
    out = []
    for _ in range(c):
        body: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0.0,
                                "stream": True}
        if scenario != "none":
            body["steering"] = all_layers(shared if scenario == "S2" else rng.standard_normal(d), layers)
        out.append(json.dumps(body).encode())
    return out


async def _timed(http: httpx.AsyncClient, body: bytes, t0: float) -> tuple[float, float]:
    """(seconds to headers, seconds to the first data line), both from ``t0``."""
    async with http.stream("POST", "/v1/completions", content=body,
                           headers={"content-type": "application/json"}) as r:
        headers_at = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        first = None
        async for line in r.aiter_lines():  # read to the end: the connection is then reusable
            if first is None and line.startswith("data: "):
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("stream ended without data")
    return headers_at, first


async def burst(url: str, headers: dict, bodies: list[bytes]) -> dict[str, float]:
    """Send all bodies at once; medians and maxima of time to headers / first token."""
    limits = httpx.Limits(max_connections=len(bodies) + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as http:
        await http.get("/health")  # connection set-up is not timed
        t0 = time.perf_counter()
        res = await asyncio.gather(*(_timed(http, b, t0) for b in bodies))
    hdr, first = [r[0] for r in res], [r[1] for r in res]
    return {"headers_p50": statistics.median(hdr), "headers_max": max(hdr),
            "first_p50": statistics.median(first), "first_max": max(first)}


def _shape(url: str, headers: dict) -> tuple[str, int, int]:
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        st = http.get("/v1/steering").json()
    return model, int(st["hidden_size"]), int(st["num_layers"])


def run(urls: list[str], headers: dict, concurrency: int, bursts: int, idle_s: float,
        log=print) -> dict[str, Any]:
    shapes = {u: _shape(u, headers) for u in urls}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {u: {s: [] for s in SCENARIOS} for u in urls}
    jobs = [(u, s) for u in urls for s in SCENARIOS]
    for b in range(bursts):
        k = b % len(jobs)
        for u, s in jobs[k:] + jobs[:k]:  # rotate: no job always runs first or last
            bodies = burst_bodies(s, concurrency, *shapes[u], seed=b)
            time.sleep(idle_s)
            r = asyncio.run(burst(u, headers, bodies))
            runs[u][s].append(r)
            log(f"{u} {s:4s} burst {b + 1}: headers p50 {r['headers_p50'] * 1e3:6.1f} max "
                f"{r['headers_max'] * 1e3:6.1f} ms, first token p50 {r['first_p50'] * 1e3:6.1f} max "
                f"{r['first_max'] * 1e3:6.1f} ms")
    summary = {}
    for u in urls:
        med = {s: {q: statistics.median(r[q] for r in runs[u][s]) for q in runs[u][s][0]} for s in SCENARIOS}
        summary[u] = {"medians_s": med, "overhead_ms": {
            s: {q: (med[s][q] - med["none"][q]) * 1e3 for q in med[s]} for s in SCENARIOS if s != "none"}}
    return {"concurrency": concurrency, "bursts": bursts, "summary": summary, "runs": runs}


def micro(repeats: int = 7, n: int = 50, d: int = 576, layers: int = 30) -> dict[str, float]:
    """Median ms per request over ``repeats`` blocks of ``n``: compile (+ wire encoding) of one
    vector per layer given as base64 or as a JSON number list, and the worker's slot write."""
    import torch

    from steering.config import SteeringConfig
    from steering.request import SteeringCompiler
    from steering.worker.runtime import SteeringRuntime

    cfg = SteeringConfig().for_batch(16)
    comp = SteeringCompiler(cfg, d, layers)
    rt = SteeringRuntime(cfg, num_layers=layers, hidden_size=d, max_tokens=256, dtype=torch.bfloat16,
                         device=torch.device("cpu"), host_gating=True)
    rng = np.random.default_rng(0)
    vecs = [rng.standard_normal((layers, d)) for _ in range(n)]
    payloads = {
        "base64": [{"vectors": [{"layer": L, "base64": _vec_b64(v[L])} for L in range(layers)]} for v in vecs],
        "values": [{"vectors": [{"layer": L, "values": v[L].tolist()} for L in range(layers)]} for v in vecs],
    }

    def per_request(fn, items) -> float:
        blocks = []
        for _ in range(repeats):
            t = time.perf_counter()
            for x in items:
                fn(x)
            blocks.append((time.perf_counter() - t) / len(items) * 1e3)
        return statistics.median(blocks)

    out = {f"compile_{k}_ms": per_request(lambda p: comp.compile(p).extra_args(), v) for k, v in payloads.items()}
    wires = [comp.compile(p).extra_args() for p in payloads["base64"]]
    counter = itertools.count()

    def admit(extra_args: dict) -> None:  # a new program each time: every admission writes its slot
        rid = f"r{next(counter)}"
        rt.admit(rid, WireRecord.from_extra_args(extra_args))  # as the worker shim reads it
        rt.release([rid])

    out["slot_write_ms"] = per_request(admit, wires)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.bench.admission", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", action="append", help="a running steering server (repeatable)")
    p.add_argument("--micro", action="store_true", help="time compile and slot write only (no server)")
    p.add_argument("--api-key")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bursts", type=int, default=9)
    p.add_argument("--idle", type=float, default=2.0, help="seconds of quiet before each burst")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.micro:
        res = micro()
        print(", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    if not a.url:
        p.error("give --url (one or more running servers) or --micro")
    headers = {"authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    res = run(a.url, headers, a.concurrency, a.bursts, a.idle)
    for u, s in res["summary"].items():
        for sc, o in s["overhead_ms"].items():
            print(f"{u} {sc} − none at c={a.concurrency} (medians of {a.bursts} bursts): headers p50 "
                  f"{o['headers_p50']:+.1f} ms, max {o['headers_max']:+.1f} ms; first token p50 "
                  f"{o['first_p50']:+.1f} ms, max {o['first_max']:+.1f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
