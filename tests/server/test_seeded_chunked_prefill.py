"""Seeded sampling while long prompts are prefilled in chunks (found by a calibration run).

Several concurrent requests with long prompts overflow one step's token budget (2,048 on CPU),
so some prompts are prefilled over two steps; the sample drawn after a chunk that is not the
last is discarded. vLLM then rewinds the request's seeded generator with a CUDA-only offset call
that raises on CPU and killed the engine (every later request got 503). The worker shim restores
the generator's state instead, so the seeded output is the one the request gets alone.

Runs on ``eager_server`` (no prefix cache: the solo runs must not warm the concurrent ones).
"""

from __future__ import annotations

import asyncio

import httpx

from live import MODEL, still_serving

REQUESTS = 4
PROMPT_WORDS = 1100  # ~1,100 tokens each: two fit one 2,048-token step only in part
WORDS = ("apple river stone table garden window paper music green light house water bread chair "
         "cloud road field horse glass story").split()  # one token each


def body(i: int, steered: bool) -> dict:
    words = " ".join(WORDS[(i * 7 + k * k) % len(WORDS)] for k in range(PROMPT_WORDS))
    b = {"model": MODEL, "prompt": f"Inventory {i}: {words}. Summary:", "max_tokens": 6, "temperature": 1.0,
         "seed": 1000 + i, "logprobs": 0, "return_token_ids": True}
    if steered:
        b["steering"] = {"features": {"formality": 0.5}}
    return b


async def run(srv, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=300) as c:
        rs = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
    for r in rs:
        assert r.status_code == 200, r.text[:500]
    return [r.json()["choices"][0] for r in rs]


def test_seeded_requests_split_across_steps_keep_their_samples(eager_server):
    bodies = [body(i, steered=i % 2 == 1) for i in range(REQUESTS)]
    solo = [asyncio.run(run(eager_server, [b]))[0] for b in bodies]
    together = asyncio.run(run(eager_server, bodies))
    assert len(solo[0]["logprobs"]["tokens"]) == 6
    for alone, batched in zip(solo, together):
        assert batched["token_ids"] == alone["token_ids"]  # the discarded draws left no trace
    still_serving(eager_server)
