"""M1: what monitors cost. A batch of ``batch`` streamed completions in which half the requests
carry ``flag`` monitors, against the very same requests with the monitors left out, on the same
server in the same run: the two arms alternate (unmonitored, monitored, unmonitored, …) for
``rounds`` rounds, and the report is the ratio of the medians (tok/s of the whole batch, and
inter-token latency p50 of the monitored half against the same half unmonitored), and the median
of the per-round ratios (each monitored run against the unmonitored run just before it: robust
to a machine whose load changes during the run).

A flag monitor never ends a generation (``ignore_eos`` keeps every request at ``tokens``), so both
arms generate the same number of tokens; its threshold is unreachable (1e4) so only the cost of
reading it is measured, not the cost of reporting triggers. Monitored steps pay one host copy per
monitored layer, and a streamed monitored request reads its results from the workers at most
every ``server.runner.MONITOR_POLL_S`` (a collective RPC).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx

from clients.bench.serve_throughput import one_request, percentiles

PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe a walk through a forest in autumn.", "Tell me about the history of tea."]
MONITORS = [{"feature": "golden_gate", "above": 1.0e4}, {"feature": "refusal", "above": 1.0e4}]
"""Two flag monitors (two layers' worth of reads on the bundled packs) that never fire."""


async def _batch(url: str, headers: dict, model: str, batch: int, tokens: int,
                 monitored: bool) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=batch + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        async def one(i: int) -> dict[str, Any]:
            body: dict[str, Any] = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)],
                                    "max_tokens": tokens, "ignore_eos": True, "temperature": 0.0,
                                    "stream": True, "return_token_ids": True}
            if monitored and i % 2 == 0:
                body["steering"] = {"monitors": MONITORS}
            return await one_request(http, "/v1/completions", body)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(i) for i in range(batch)))
        wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in res)
    if toks != batch * tokens:
        raise RuntimeError(f"streamed {toks} tokens, expected {batch * tokens}")
    half = [g for i, r in enumerate(res) if i % 2 == 0 for g in r["gaps"]]
    return {"tok_s": toks / wall, "itl_half_p50_s": percentiles(half)["p50"]}


def run_monitor_scenario(url: str, headers: dict, batch: int = 8, tokens: int = 64, rounds: int = 5,
                         log=print) -> dict[str, Any]:
    """M1 on a running steering server (with the bundled packs): medians per arm and ratios."""
    model = httpx.get(f"{url}/v1/models", headers=headers, timeout=60).json()["data"][0]["id"]
    asyncio.run(_batch(url, headers, model, 2, 4, True))  # warm-up (and a check the packs are there)
    arms: dict[str, list[dict]] = {"unmonitored": [], "monitored": []}
    for r in range(rounds):
        for arm in ("unmonitored", "monitored"):
            res = asyncio.run(_batch(url, headers, model, batch, tokens, arm == "monitored"))
            arms[arm].append(res)
            log(f"M1 round {r + 1} {arm:11s}: {res['tok_s']:7.1f} tok/s, monitored-half ITL p50 "
                f"{res['itl_half_p50_s'] * 1e3:6.1f} ms")
    med = {arm: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for arm, runs in arms.items()}
    out = {"batch": batch, "tokens": tokens, "rounds": rounds, "monitors": MONITORS, "median": med,
           "tok_s_ratio": med["monitored"]["tok_s"] / med["unmonitored"]["tok_s"],
           "itl_p50_ratio": med["monitored"]["itl_half_p50_s"] / med["unmonitored"]["itl_half_p50_s"],
           "paired_tok_s_ratio": statistics.median(
               m["tok_s"] / u["tok_s"] for u, m in zip(arms["unmonitored"], arms["monitored"])),
           "paired_itl_p50_ratio": statistics.median(
               m["itl_half_p50_s"] / u["itl_half_p50_s"] for u, m in zip(arms["unmonitored"], arms["monitored"])),
           "runs": arms}
    log(f"M1: half the batch monitored ÷ the same requests unmonitored: tok/s × "
        f"{out['tok_s_ratio']:.3f}, monitored requests' ITL p50 × {out['itl_p50_ratio']:.3f} "
        f"(medians of {rounds} alternated rounds, batch {batch}, {tokens} tokens); per-round paired "
        f"medians: tok/s × {out['paired_tok_s_ratio']:.3f}, ITL p50 × {out['paired_itl_p50_ratio']:.3f}")
    return out
