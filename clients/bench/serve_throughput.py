"""Throughput and latency of a running ``steer serve``: N concurrent fixed-length streamed requests.

    python clients/bench/serve_throughput.py --url http://127.0.0.1:8000 --concurrency 16 --max-tokens 128
    python clients/bench/serve_throughput.py ... --steering-json @steer.json --out steered.json

Every request streams ``max_tokens`` tokens (``ignore_eos``) from /v1/completions and reports each
chunk's token ids, so token counts and timings are exact. Prints tokens/s and TTFT / inter-token
latency / end-to-end percentiles; ``--out`` writes them as JSON. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


async def one_request(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Stream one completion; return its TTFT, inter-token gaps, token count and duration."""
    start = time.perf_counter()
    first: float | None = None
    last = start
    gaps: list[float] = []
    tokens = 0
    async with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            now = time.perf_counter()
            for choice in chunk.get("choices", []):
                k = len(choice.get("token_ids") or [])
                if not k:
                    continue
                if first is None:
                    first = now
                else:
                    gaps.extend([(now - last) / k] * k)
                tokens += k
                last = now
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "gaps": gaps, "tokens": tokens, "e2e": end - start}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        body: dict[str, Any] = {
            "model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "ignore_eos": True,
            "temperature": args.temperature, "stream": True, "return_token_ids": True,
        }
        if args.steering_json:
            text = args.steering_json
            body["steering"] = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
        if args.warmup:
            await one_request(http, "/v1/completions", {**body, "max_tokens": 4})
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.requests or args.concurrency):
            queue.put_nowait(i)
        results: list[dict[str, Any]] = []

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                results.append(await one_request(http, "/v1/completions", body))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    return {
        "url": args.url, "model": model, "concurrency": args.concurrency, "requests": len(results),
        "max_tokens": args.max_tokens, "steered": bool(args.steering_json),
        "wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall if wall else None,
        "ttft_s": percentiles([r["ttft"] for r in results]),
        "itl_s": percentiles([g for r in results for g in r["gaps"]]),
        "e2e_s": percentiles([r["e2e"] for r in results]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=None, help="total requests (default: --concurrency)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt", default="Write a long story about a lighthouse keeper.")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--steering-json", default=None, help="steering object as JSON, or @file")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    report = asyncio.run(run(args))

    def ms(stats: dict[str, float | None]) -> str:
        return " ".join(f"{k}={v * 1000:.1f}ms" for k, v in stats.items() if v is not None)

    print(f"{report['requests']} requests x {args.max_tokens} tokens, concurrency {args.concurrency}, "
          f"steered={report['steered']}")
    print(f"throughput: {report['tokens_per_s']:.1f} tok/s ({report['output_tokens']} tokens in {report['wall_s']:.2f}s)")
    print(f"TTFT: {ms(report['ttft_s'])}")
    print(f"ITL:  {ms(report['itl_s'])}")
    print(f"E2E:  {ms(report['e2e_s'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
