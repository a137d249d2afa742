"""``steer eval``: dose-response efficacy of steering features, scored without the model's activations.

Against a running server (``--url``) or one it starts itself (float32, the bundled model and
packs). Writes ``eval.json``, ``eval.md``, ``samples.jsonl`` and ``<feature>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from clients.eval import report
from clients.eval.harness import (BASELINES, DEFAULT_PROMPTS, DEFAULT_SERVE_ARGS, Client, EvalConfig, EvalError,
                                  load_prompts, run_samples)
from clients.eval.scorers import SCORERS, scorer_for
from clients.eval.summary import summarize_features

DEFAULT_STRENGTHS = "-1,-0.5,0,0.5,1,2"
DEFAULT_PACK = "smollm2-tone"
#: The sampling defaults are EvalConfig's: the parser reads them instead of repeating them.
DEFAULTS = EvalConfig(features={}, strengths=[], prompts=[])


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    d = DEFAULTS
    p = subparsers.add_parser("eval", help="dose-response evaluation of steering features",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default=None,
                   help="comma list of features, each optionally 'name=scorer' (e.g. 'pirate,L12:1888=french'); "
                        f"default: every feature of --pack that has a scorer")
    p.add_argument("--pack", default=DEFAULT_PACK, help=f"pack whose features to evaluate (default: {DEFAULT_PACK})")
    p.add_argument("--strengths", default=DEFAULT_STRENGTHS, help=f"comma list (default: {DEFAULT_STRENGTHS})")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                   help="JSONL of {id, prompt} or a text file (default: the shipped neutral set, 32 prompts)")
    p.add_argument("--limit-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--samples", type=int, default=d.samples,
                   help=f"samples per prompt and strength (default: {d.samples})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"tokens per output (default: {d.max_tokens})")
    p.add_argument("--long-max-tokens", type=int, default=d.long_max_tokens,
                   help="tokens per output for length scorers (verbosity), so answers can end "
                        f"(default: {d.long_max_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"(default: {d.temperature})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"(default: {d.top_p})")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"(default: {d.repetition_penalty})")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed; prompt i uses the same seed at every strength")
    p.add_argument("--mode", default=d.mode, choices=["add", "clamp", "scale"],
                   help="steering mode for every feature (default: each feature's own)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help=f"requests in flight (default: {d.concurrency})")
    p.add_argument("--baseline", default=d.baseline, choices=list(BASELINES),
                   help="'prompt': also run each feature as an instruction in a system message, and "
                        "instruction + steering, and compare (default: none)")
    p.add_argument("--baseline-strength", type=float, default=d.baseline_strength,
                   help=f"the steering strength compared with prompting (default: {d.baseline_strength:g})")
    p.add_argument("--no-perplexity", dest="perplexity", action="store_false",
                   help="skip scoring perplexity under the unsteered model")
    p.add_argument("--url", default=os.environ.get("STEER_URL"),
                   help="a running server (env STEER_URL); default: start one")
    p.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"), help="(env STEER_API_KEY)")
    p.add_argument("--serve-args", default=DEFAULT_SERVE_ARGS,
                   help=f"flags for the server started without --url (default: '{DEFAULT_SERVE_ARGS}')")
    p.add_argument("--out", default="eval-out", help="output folder (default: eval-out)")
    p.set_defaults(func=eval_cmd)


def parse_strengths(text: str) -> list[float]:
    try:
        vals = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise EvalError(f"--strengths: expected a comma list of numbers, got {text!r}") from None
    if len(vals) < 2:
        raise EvalError("--strengths: give at least two strengths")
    if 0.0 not in vals:
        raise EvalError("--strengths must include 0 (the unsteered baseline)")
    return vals


def parse_features(text: str) -> dict[str, str | None]:
    """'a,b=scorer' → {a: None, b: scorer} (None: the feature's default scorer)."""
    out: dict[str, str | None] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, scorer = part.partition("=")
        if scorer and scorer not in SCORERS:
            raise EvalError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
        out[name.strip()] = scorer or None
    if not out:
        raise EvalError("--features: no feature given")
    return out


async def resolve_features(client: Client, requested: dict[str, str | None] | None,
                           pack: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Feature → scorer, and each feature's catalog entry (400/404 from the server → EvalError)."""
    if requested is None:
        entries = await client.pack_features(pack)
        requested = {e["name"]: None for e in entries if scorer_for(e["name"]) is not None}
        if not requested:
            raise EvalError(f"pack {pack!r} has no feature with a scorer")
    features: dict[str, str] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, scorer in requested.items():
        info[name] = await client.feature(name)
        if scorer is None:
            s = scorer_for(name) or scorer_for(info[name].get("name", ""))
            if s is None:
                raise EvalError(f"no scorer for feature {name!r}; name one: '{name}=SCORER' "
                                f"({', '.join(SCORERS)})")
            scorer = s.name
        features[name] = scorer
    return features, info


async def evaluate(url: str, api_key: str | None, requested: dict[str, str | None] | None, pack: str,
                   cfg_kw: dict[str, Any], progress: bool = True) -> tuple[dict[str, Any], list]:
    """Run the whole evaluation against ``url``; returns the result dict and the samples."""
    client = Client(url, api_key)
    try:
        features, info = await resolve_features(client, requested, pack)
        cfg = EvalConfig(features=features, **cfg_kw)
        t0 = time.monotonic()
        model, samples = await run_samples(client, cfg, progress=progress)
        elapsed = time.monotonic() - t0
        version = (await client.http.get("/version")).json()
    finally:
        await client.close()
    result = {
        "config": cfg.public(),
        "server": {"url": url, "model": model, **version},
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "features": summarize_features(cfg, samples, info),
    }
    return result, samples


def write_all(result: dict[str, Any], samples: list, out: str | Path) -> dict[str, Path]:
    paths = report.write(result, out)
    paths["samples"] = Path(out) / "samples.jsonl"
    with open(paths["samples"], "w", encoding="utf-8") as f:
        for s in samples:
            d = asdict(s)
            d.pop("prompt_ids")
            d.pop("token_ids")
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return paths


def eval_cmd(args: argparse.Namespace) -> int:
    try:
        strengths = parse_strengths(args.strengths)
        requested = parse_features(args.features) if args.features else None
        prompts = load_prompts(args.prompts, args.limit_prompts)
    except (EvalError, OSError, ValueError, KeyError) as exc:
        print(f"steer eval: error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    cfg_kw = dict(strengths=strengths, prompts=prompts, samples=args.samples, max_tokens=args.max_tokens,
                  long_max_tokens=args.long_max_tokens,
                  temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                  seed=args.seed, concurrency=args.concurrency, mode=args.mode, perplexity=args.perplexity,
                  baseline=args.baseline, baseline_strength=args.baseline_strength)
    try:
        if args.url:
            result, samples = asyncio.run(evaluate(args.url, args.api_key, requested, args.pack, cfg_kw))
        else:
            from clients.launch import local_server

            serve_args = shlex.split(args.serve_args)
            print(f"steer eval: starting a server ({' '.join(serve_args)}) …", file=sys.stderr, flush=True)
            with local_server(serve_args) as srv:
                result, samples = asyncio.run(evaluate(srv.url, None, requested, args.pack, cfg_kw))
            result["server"]["serve_args"] = serve_args
    except (EvalError, RuntimeError, httpx.HTTPError) as exc:
        print(f"steer eval: error: {exc!r}" if isinstance(exc, httpx.HTTPError) else f"steer eval: error: {exc}",
              file=sys.stderr)
        return 1
    paths = write_all(result, samples, args.out)
    print(report.markdown(result, png_prefix=None))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0
