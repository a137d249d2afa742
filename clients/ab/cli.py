"""``steer ab``: ``results NAME`` (a table, ``--json``, ``--plot out.png``) and ``run`` (offline A/B)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from clients.report import num  # None → "–", floats to 3 significant figures


def add_ab_parser(subparsers: argparse._SubParsersAction) -> None:
    from clients.ab.offline import RunConfig

    d = RunConfig(experiment="", prompts=[])  # the run's defaults, defined once there
    p = subparsers.add_parser("ab", help="A/B experiments: a server's results, offline runs")
    sub = p.add_subparsers(dest="ab_command", required=True, metavar="COMMAND")
    r = sub.add_parser("results", help="print an experiment's results")
    r.add_argument("name", help="the experiment")
    r.add_argument("--url", default=os.environ.get("STEER_URL", "http://127.0.0.1:8000"),
                   help="the server (default: $STEER_URL or http://127.0.0.1:8000)")
    r.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"), help="(env STEER_API_KEY)")
    r.add_argument("--json", action="store_true", help="print the raw JSON")
    r.add_argument("--plot", metavar="PNG", default=None,
                   help="also write per-variant mean score and good-rate with 95%% CIs to this PNG")
    r.set_defaults(func=results_cmd)

    o = sub.add_parser("run", help="offline A/B: a prompt set through every variant, same seeds, "
                                   "automatic scores, side-by-side HTML + JSON report")
    o.add_argument("--experiment", required=True, help="the experiment whose variants to run")
    o.add_argument("--prompts", required=True, metavar="FILE",
                   help='JSONL of {"id", "prompt"} or a text file, one prompt per line')
    o.add_argument("--out", default=None, metavar="DIR",
                   help="where report.html and report.json go (default: ./ab-run-NAME)")
    o.add_argument("--scorers", default=None, metavar="A,B",
                   help="text scorers to apply (default: all of clients.eval.scorers)")
    o.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    o.add_argument("--samples", type=int, default=d.samples, help=f"outputs per prompt and variant (default: {d.samples})")
    o.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"(default: {d.max_tokens})")
    o.add_argument("--temperature", type=float, default=d.temperature, help=f"(default: {d.temperature})")
    o.add_argument("--top-p", type=float, default=d.top_p, help=f"(default: {d.top_p})")
    o.add_argument("--seed", type=int, default=d.seed,
                   help=f"base seed; prompt i uses seed*100003+i in every variant (default: {d.seed})")
    o.add_argument("--concurrency", type=int, default=d.concurrency, help=f"requests in flight (default: {d.concurrency})")
    o.add_argument("--url", default=os.environ.get("STEER_URL", "http://127.0.0.1:8000"),
                   help="the server (default: $STEER_URL or http://127.0.0.1:8000)")
    o.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"), help="(env STEER_API_KEY)")
    o.add_argument("--local", action="store_true",
                   help="start an engine of its own (steer serve on a free port) instead of --url")
    o.add_argument("--serve-args", default="", metavar="ARGS",
                   help="with --local: flags for steer serve, e.g. '--dtype float32 --data-dir DIR'")
    o.set_defaults(func=run_cmd)


def table_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v in res["variants"]:
        s, lab, vs = v["score"], v["labels"], v.get("vs_control") or {}
        lo, hi = s["ci95"]
        rows.append([
            v["name"] + (" (control)" if v["control"] else ""), num(v["weight"]), str(v["n"]),
            num(s["mean"]), f"[{num(lo)}, {num(hi)}]" if lo is not None else "–",
            num(lab["good_rate"]), num(v["generated_tokens"]["p50"]), num(v["generated_tokens"]["p95"]),
            num(v["latency_s"]["p50"]), num(v["latency_s"]["p95"]),
            num(vs.get("score_diff")), num(vs.get("score_p_value")),
            num(vs.get("good_rate_diff")), num(vs.get("good_rate_p_value")),
        ])
    return rows


HEADERS = ["variant", "weight", "n", "score", "95% CI", "good", "tok p50", "tok p95", "lat p50",
           "lat p95", "Δscore", "p", "Δgood", "p(good)"]


def render(res: dict[str, Any]) -> str:
    """The results as a plain-text table (rich, when installed, renders it in ``results_cmd``)."""
    rows = [HEADERS, *table_rows(res)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = [f"experiment {res['experiment']} ({res.get('status')}), n = {res['n']}"]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    srm = res["sample_ratio"]
    lines.append(f"sample ratio check: p = {num(srm['p_value'])}")
    lines.extend(f"WARNING: {w}" for w in res.get("warnings", []))
    return "\n".join(lines)


def results_cmd(args: argparse.Namespace) -> int:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        resp = httpx.get(f"{args.url.rstrip('/')}/v1/experiments/{args.name}/results",
                         headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        print(f"steer ab: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    if resp.status_code != 200:
        try:
            msg = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = resp.text
        print(f"steer ab: {resp.status_code}: {msg}", file=sys.stderr)
        return 1
    res = resp.json()
    if args.plot:
        from clients.ab.plot import plot_results

        print(f"wrote {plot_results(res, args.plot)}", file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    if not sys.stdout.isatty():  # plain text for pipes and logs
        print(render(res))
        return 0
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render(res))
        return 0
    t = Table(title=f"experiment {res['experiment']} ({res.get('status')}), n = {res['n']}")
    for h in HEADERS:
        t.add_column(h)
    for row in table_rows(res):
        t.add_row(*row)
    console = Console()
    console.print(t, width=max(console.width, 150))
    console.print(f"sample ratio check: p = {num(res['sample_ratio']['p_value'])}")
    for w in res.get("warnings", []):
        console.print(f"[bold red]WARNING[/]: {w}")
    return 0


def run_cmd(args: argparse.Namespace) -> int:
    """``steer ab run``: offline A/B over a prompt set; writes report.html and report.json."""
    import asyncio
    import contextlib
    import logging
    import shlex
    from pathlib import Path

    import httpx

    from clients.eval.harness import Client, EvalError, load_prompts
    from clients.ab.offline import RunConfig, pick_scorers, run
    from clients.ab.report import render_html

    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        scorers = pick_scorers(args.scorers)
        prompts = load_prompts(args.prompts, limit=args.limit)
    except (ValueError, OSError, EvalError) as exc:
        print(f"steer ab run: {exc}", file=sys.stderr)
        return 2
    cfg = RunConfig(experiment=args.experiment, prompts=prompts, scorers=scorers, samples=args.samples,
                    max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, concurrency=args.concurrency)

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r  {done}/{total} requests", end="" if done < total else "\n", file=sys.stderr)

    async def go(url: str, api_key: str | None) -> dict[str, Any]:
        client = Client(url, api_key)
        try:
            return await run(client, cfg, progress)
        finally:
            await client.close()

    with contextlib.ExitStack() as stack:
        url, key = args.url, args.api_key
        if args.local:
            from clients.launch import local_server

            print("starting a local engine …", file=sys.stderr)
            serve_args = shlex.split(args.serve_args)
            keyed = any(a.startswith("--api-key") for a in serve_args)
            srv = stack.enter_context(local_server(serve_args, api_key=args.api_key if keyed else None))
            url, key = srv.url, srv.api_key
        try:
            report = asyncio.run(go(url, key))
        except EvalError as exc:
            print(f"steer ab run: {exc}", file=sys.stderr)
            return 1
        except httpx.HTTPError as exc:
            print(f"steer ab run: cannot reach {url}: {exc}", file=sys.stderr)
            return 2
    out = Path(args.out or f"ab-run-{args.experiment}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    head = ["scorer", *(v["name"] + (" (control)" if v["control"] and v["name"] != "control" else "")
                        for v in report["variants"])]
    rows = [head] + [[s, *(num(v["scores"][s]["mean"]) for v in report["variants"])] for s in scorers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"wrote {out / 'report.html'} and {out / 'report.json'}", file=sys.stderr)
    return 0
