"""``steer ab``: ``results NAME`` (a table, ``--json``, ``--plot out.png``) and ``run`` (offline A/B)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_ab_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ab", help="A/B experiments on a running server")
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


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def table_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v in res["variants"]:
        s, lab, vs = v["score"], v["labels"], v.get("vs_control") or {}
        lo, hi = s["ci95"]
        rows.append([
            v["name"] + (" (control)" if v["control"] else ""), _fmt(v["weight"]), str(v["n"]),
            _fmt(s["mean"]), f"[{_fmt(lo)}, {_fmt(hi)}]" if lo is not None else "–",
            _fmt(lab["good_rate"]), _fmt(v["generated_tokens"]["p50"]), _fmt(v["generated_tokens"]["p95"]),
            _fmt(v["latency_s"]["p50"]), _fmt(v["latency_s"]["p95"]),
            _fmt(vs.get("score_diff")), _fmt(vs.get("score_p_value")),
            _fmt(vs.get("good_rate_diff")), _fmt(vs.get("good_rate_p_value")),
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
    lines.append(f"sample ratio check: p = {_fmt(srm['p_value'])}")
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
        from server.experiments.plot import plot_results

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
    console.print(f"sample ratio check: p = {_fmt(res['sample_ratio']['p_value'])}")
    for w in res.get("warnings", []):
        console.print(f"[bold red]WARNING[/]: {w}")
    return 0
