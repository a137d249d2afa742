"""``steer demo monitor``: a feature monitor catching a topic as it appears in generations.

For each prompt (some on the feature's topic, some not) two chat completions run through the
real engine with the same seed, neither steered:

* **flag** — ``"monitors": [{"feature": F, "above": X, "action": "flag"}]``: the whole output, and
  the response's ``steering.monitors`` (fired, first token, peak activation);
* **stop** — the same monitor with ``"action": "stop"``: the output ends right after the token
  where the monitor fired, with ``finish_reason: "content_filter"``.

The flag output is read back with ``POST /v1/features/inspect`` (the prompt and the output as one
chat, unsteered): the per-token activation trace, with the token the monitor fired on outlined —
the monitor reads the same activation, on the generated token, inside the engine.

Writes a rich table to the terminal and a self-contained HTML report (inline CSS, no scripts);
``--json`` also writes the results.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.eval.demo import DemoClient, DemoError, demo_target, response_span
from clients.eval.demo_view import write_report
from clients.eval.harness import DEFAULT_SERVE_ARGS, EvalError, Prompt, load_prompts

DEFAULT_FEATURE = "golden_gate"
DEFAULT_THRESHOLD = 40.0
"""golden_gate (a direction at layer 10) measured with /v1/features/inspect on SmolLM2's greedy
answers: an answer about San Francisco's bridges reads 54–91 on "San Francisco" and "Golden Gate",
an answer about baking bread at most 17.6 (on "salt"); 40 lies between with room on both sides."""
DEFAULT_PROMPTS = (
    Prompt("sf-bridges", "Tell me about famous bridges in San Francisco."),
    Prompt("sf-icon", "What is the most iconic landmark of San Francisco?"),
    Prompt("bread", "How do I bake a simple loaf of bread?"),
    Prompt("python", "Explain what a Python list comprehension is."),
)
DEFAULT_OUT = "demo_monitor.html"


@dataclass
class MonitorDemoConfig:
    """What the demo runs (the command's defaults)."""

    feature: str = DEFAULT_FEATURE
    threshold: float = DEFAULT_THRESHOLD
    prompts: tuple[Prompt, ...] = DEFAULT_PROMPTS
    max_tokens: int = 48
    temperature: float = 0.0
    seed: int = 0
    model: str | None = None


async def _one(client: DemoClient, cfg: MonitorDemoConfig, model: str, feature: str,
               prompt: Prompt, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"id": prompt.id, "prompt": prompt.prompt, "seed": seed}
    for action in ("flag", "stop"):
        body = {"model": model, "messages": [{"role": "user", "content": prompt.prompt}],
                "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "seed": seed,
                "return_token_ids": True,
                "steering": {"monitors": [{"feature": feature, "above": cfg.threshold, "action": action}]}}
        resp = await client.chat(body)
        choice = resp["choices"][0]
        out[action] = {"text": choice["message"]["content"] or "", "finish_reason": choice["finish_reason"],
                       "token_ids": choice["token_ids"], "prompt_token_ids": resp["prompt_token_ids"],
                       "monitor": resp["steering"]["monitors"][0]}
    flag = out["flag"]
    ins = await client.inspect({
        "model": model, "features": [feature], "layers": [], "top_k": 0,
        "messages": [{"role": "user", "content": prompt.prompt},
                     {"role": "assistant", "content": flag["text"]}]})
    span = response_span(ins["tokens"], flag["prompt_token_ids"], flag["token_ids"], flag["finish_reason"])
    flag["trace"] = [(t["token"], float(t["features"][feature])) for t in span]
    return out


async def run_monitor_demo(client: DemoClient, cfg: MonitorDemoConfig) -> dict[str, Any]:
    model, info = await demo_target(client, cfg)
    feature = info["id"]
    rows = [await _one(client, cfg, model, feature, p, cfg.seed + i) for i, p in enumerate(cfg.prompts)]
    return {
        "object": "steer.demo.monitor",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "feature": {"id": feature, "layer": info.get("layer"), "description": info.get("description", "")},
        "settings": {"threshold": cfg.threshold, "max_tokens": cfg.max_tokens,
                     "temperature": cfg.temperature, "seed": cfg.seed},
        "rows": rows,
        "fired": sum(r["flag"]["monitor"]["fired"] for r in rows),
    }


def print_table(result: dict[str, Any], file=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file)
    t = Table(title=f"monitor {result['feature']['id']} > {result['settings']['threshold']:g} "
                    f"on {result['model']}", show_lines=True)
    for col in ("prompt", "flag: fired / first token / peak", "stop: output (finish_reason)"):
        t.add_column(col)
    for r in result["rows"]:
        m = r["flag"]["monitor"]
        flag = f"[red]fired[/] at token {m['first_token']}" if m["fired"] else "[green]quiet[/]"
        if m["peak"] is not None:
            flag += f", peak {m['peak']:.1f}"
        stop = r["stop"]
        t.add_row(escape(r["prompt"]), flag, f"{escape(' '.join(stop['text'].split())[:100])} "
                                             f"[dim]({stop['finish_reason']})[/]")
    console.print(t, width=max(console.width, 140))
    console.print(f"{result['fired']}/{len(result['rows'])} generations flagged")


def render_html(result: dict[str, Any]) -> str:
    from clients.report import render

    return render("monitor_demo.html.j2", result=result)


def add_monitor_parser(sub: argparse._SubParsersAction) -> None:
    """``steer demo monitor`` (registered by :func:`clients.eval.demo_cli.add_demo_parser`)."""
    d = MonitorDemoConfig()
    a = sub.add_parser("monitor", help="a feature monitor flagging and stopping generations, with the "
                       "per-token activation trace", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--feature", default=d.feature, help=f"feature to monitor (default: {d.feature})")
    a.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"the monitor fires where the activation is above this (default: {d.threshold:g})")
    a.add_argument("--prompts", default=None, help="JSONL of {id, prompt} or a text file, one prompt a line")
    a.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"(default: {d.max_tokens})")
    a.add_argument("--temperature", type=float, default=d.temperature, help=f"(default: {d.temperature})")
    a.add_argument("--seed", type=int, default=d.seed)
    a.add_argument("--model", default=None)
    a.add_argument("--url", default=os.environ.get("STEER_URL"), help="a running server; default: start one")
    a.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"))
    a.add_argument("--serve-args", default=DEFAULT_SERVE_ARGS)
    a.add_argument("--out", default=DEFAULT_OUT, help=f"HTML report (default: {DEFAULT_OUT})")
    a.add_argument("--json", dest="json_out", default=None, metavar="FILE")
    a.set_defaults(func=monitor_cmd)


async def _run(url: str, api_key: str | None, cfg: MonitorDemoConfig) -> dict[str, Any]:
    client = DemoClient(url, api_key)
    try:
        return await run_monitor_demo(client, cfg)
    finally:
        await client.close()


def monitor_cmd(args: argparse.Namespace) -> int:
    import shlex

    import httpx

    cfg = MonitorDemoConfig(feature=args.feature, threshold=args.threshold, max_tokens=args.max_tokens,
                            temperature=args.temperature, seed=args.seed, model=args.model)
    try:
        if args.prompts:
            cfg.prompts = tuple(load_prompts(Path(args.prompts)))
        if args.url:
            result = asyncio.run(_run(args.url, args.api_key, cfg))
        else:
            from clients.launch import local_server

            extra = shlex.split(args.serve_args) + (["--api-key", args.api_key] if args.api_key else [])
            with local_server(extra, api_key=args.api_key) as srv:
                result = asyncio.run(_run(srv.url, args.api_key, cfg))
    except (EvalError, ValueError, KeyError) as e:
        print(f"steer demo: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"steer demo: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2
    write_report(result, args.out, args.json_out, render_html, print_table)
    return 0
