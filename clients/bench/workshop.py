"""What a running feature-workshop job costs the server's throughput (issue #31).

    python -m clients.bench.workshop [--url URL --api-key KEY] [--window 40] [--repeats 3]

Against one server (started here with the bundled model unless ``--url``): windows of
``--window`` seconds of chat traffic at ``--concurrency`` (greedy, ``--tokens`` each), alternately
with no job and with a workshop job training (``method: vector`` on docs/examples/workshop-ocean.json,
cancelled at the window's end), order flipped every repeat. Prints the generated tok/s of each
window and the ratio of medians (with a job ÷ without), and writes them as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

OCEAN = Path(__file__).resolve().parents[2] / "docs/examples/workshop-ocean.json"
PROMPTS = ["Tell me about your weekend.", "What is a good way to learn a language?",
           "Describe your favourite city.", "How do I make pancakes?",
           "Why do people like music?", "Give me advice for a job interview.",
           "What should I read next?", "How does a bicycle work?"]


async def window(client: httpx.AsyncClient, model: str, seconds: float, concurrency: int,
                 tokens: int) -> float:
    """Generated tok/s of chat traffic to ``model`` at ``concurrency`` for ``seconds``."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        k = i
        while time.monotonic() < stop:
            r = await client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": tokens, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}]})
            r.raise_for_status()
            done += r.json()["usage"]["completion_tokens"]
            k += concurrency

    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / (time.monotonic() - t0)


async def with_job(client: httpx.AsyncClient, model: str, seconds: float, concurrency: int,
                   tokens: int) -> float:
    body = {**json.loads(OCEAN.read_text()), "name": f"cost{uuid.uuid4().hex[:8]}", "method": "vector",
            "calibrate": False}
    r = await client.post("/v1/features", json=body)
    r.raise_for_status()
    job = r.json()["id"]
    while (await client.get(f"/v1/features/jobs/{job}")).json().get("stage") != "train":
        await asyncio.sleep(0.5)  # the job's process has started training
    try:
        return await window(client, model, seconds, concurrency, tokens)
    finally:
        await client.delete(f"/v1/features/jobs/{job}")
        with contextlib.suppress(httpx.HTTPError):
            await client.delete(f"/v1/features/custom/{body['name']}")


async def measure(url: str, api_key: str | None, seconds: float, repeats: int, concurrency: int,
                  tokens: int) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        models = await client.get("/v1/models")
        models.raise_for_status()
        model = models.json()["data"][0]["id"]
        await window(client, model, 5, concurrency, tokens)  # warm-up
        idle, busy = [], []
        for rep in range(repeats):
            for kind in (("idle", "job") if rep % 2 == 0 else ("job", "idle")):
                if kind == "idle":
                    idle.append(await window(client, model, seconds, concurrency, tokens))
                else:
                    busy.append(await with_job(client, model, seconds, concurrency, tokens))
                print(f"repeat {rep} {kind:4s}: {(idle if kind == 'idle' else busy)[-1]:7.1f} tok/s", flush=True)
    ratio = statistics.median(busy) / statistics.median(idle)
    print(f"generated tok/s with a workshop job ÷ without: {ratio:.3f} "
          f"(medians {statistics.median(busy):.1f} / {statistics.median(idle):.1f})")
    return {"idle_tok_s": idle, "job_tok_s": busy, "ratio": ratio, "window_s": seconds,
            "concurrency": concurrency, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--window", type=float, default=40.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default=None, help="write the numbers here as JSON")
    a = p.parse_args(argv)
    if a.url:
        res = asyncio.run(measure(a.url, a.api_key, a.window, a.repeats, a.concurrency, a.tokens))
    else:
        from clients.launch import local_server

        key = "sk-bench-workshop"
        with local_server(["--api-key", key], api_key=key) as srv:
            res = asyncio.run(measure(srv.url, key, a.window, a.repeats, a.concurrency, a.tokens))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
