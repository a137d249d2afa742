"""The ``steer demo ablation`` command: its arguments, the run, the files it writes.

Every default is :class:`clients.eval.demo.DemoConfig`'s (or the module constants next to it): the
parser reads them from ``DemoConfig()`` instead of repeating them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from clients.eval import demo
from clients.eval.demo import DEFAULT_FEATURE, DEFAULT_PROMPTS, DemoConfig, DemoError, run_against
from clients.eval.demo_view import screenshot, write_report
from clients.eval.harness import DEFAULT_SERVE_ARGS, EvalError, load_prompts

DEFAULTS = DemoConfig()
DEFAULT_OUT = "demo_ablation.html"


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    """``steer demo ablation``."""
    d = DEFAULTS
    p = subparsers.add_parser("demo", help="demos of steering on the real engine")
    sub = p.add_subparsers(dest="demo_command", required=True, metavar="DEMO")
    a = sub.add_parser("ablation", help="baseline vs ablated vs amplified feature, as a table and an HTML report",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--feature", default=d.feature,
                   help=f"feature to ablate and amplify, bare or pack/feature (default: {d.feature})")
    a.add_argument("--prompts", default=None,
                   help="JSONL of {id, prompt} or a text file, one prompt a line "
                        f"(default: the shipped {DEFAULT_PROMPTS.name} for {DEFAULT_FEATURE}; required for other features)")
    a.add_argument("--limit-prompts", type=int, default=None, help="use only the first N prompts")
    a.add_argument("--amplify", type=float, default=d.amplify,
                   help=f"clamp target of the amplified variant, in norm units u (default: {d.amplify})")
    a.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"tokens per output (default: {d.max_tokens})")
    a.add_argument("--temperature", type=float, default=d.temperature, help=f"(default: {d.temperature})")
    a.add_argument("--top-p", type=float, default=d.top_p, help=f"(default: {d.top_p})")
    a.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"(default: {d.repetition_penalty})")
    a.add_argument("--seed", type=int, default=d.seed, help="base seed; prompt i uses seed + i in all three variants")
    a.add_argument("--concurrency", type=int, default=d.concurrency,
                   help=f"requests in flight (default: {d.concurrency})")
    a.add_argument("--model", default=d.model, help="model name (default: the server's first model)")
    a.add_argument("--url", default=os.environ.get("STEER_URL"),
                   help="a running server (env STEER_URL); default: start one")
    a.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"), help="(env STEER_API_KEY)")
    a.add_argument("--serve-args", default=DEFAULT_SERVE_ARGS,
                   help=f"flags for the server started without --url (default: '{DEFAULT_SERVE_ARGS}')")
    a.add_argument("--out", default=DEFAULT_OUT, help=f"HTML report (default: {DEFAULT_OUT})")
    a.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the results as JSON")
    a.add_argument("--screenshot", default=None, metavar="PNG",
                   help="also render the report to PNG with headless Chromium (must be installed)")
    a.set_defaults(func=ablation_cmd)
    from clients.eval.demo_monitor import add_monitor_parser

    add_monitor_parser(sub)  # steer demo monitor


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The run the arguments ask for (DemoError for a bad --prompts or --max-tokens)."""
    bare = args.feature.rsplit("/", 1)[-1]
    if args.prompts is None and bare != DEFAULT_FEATURE:
        raise DemoError(f"--prompts is required for feature {args.feature!r} "
                        f"(the shipped prompts are about {DEFAULT_FEATURE})")
    path = Path(args.prompts) if args.prompts else DEFAULT_PROMPTS
    if not path.is_file():
        raise DemoError(f"--prompts: no such file {str(path)!r}")
    try:
        prompts = load_prompts(path, args.limit_prompts)
    except (ValueError, KeyError) as e:
        raise DemoError(f"--prompts {path}: {e}") from None
    if args.max_tokens < 1:
        raise DemoError("--max-tokens must be at least 1")
    return DemoConfig(feature=args.feature, prompts=tuple(prompts), amplify=args.amplify,
                      max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                      repetition_penalty=args.repetition_penalty, seed=args.seed,
                      concurrency=args.concurrency, model=args.model)


def command_line(args: argparse.Namespace) -> str:
    """A ``steer demo ablation`` command that reproduces this run (every setting spelled out, no key)."""
    parts = ["steer", "demo", "ablation", "--feature", args.feature]
    if args.prompts:
        parts += ["--prompts", args.prompts]
    if args.limit_prompts:
        parts += ["--limit-prompts", str(args.limit_prompts)]
    parts += ["--amplify", f"{args.amplify:g}", "--max-tokens", str(args.max_tokens),
              "--temperature", f"{args.temperature:g}", "--top-p", f"{args.top_p:g}",
              "--repetition-penalty", f"{args.repetition_penalty:g}", "--seed", str(args.seed)]
    if args.model:
        parts += ["--model", args.model]
    if args.url:
        parts += ["--url", args.url]
    elif args.serve_args != DEFAULT_SERVE_ARGS:
        parts += ["--serve-args", args.serve_args]
    parts += ["--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)


def ablation_cmd(args: argparse.Namespace) -> int:
    """Run the demo, write the HTML (and --json, --screenshot), print the table; the exit status."""
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)
    command = command_line(args)
    try:
        cfg = config_from_args(args)
        result = run_against(args.url, args.api_key, cfg, args.serve_args)
    except EvalError as e:
        print(f"steer demo: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"steer demo: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2
    result["command"] = command
    out = write_report(result, args.out, args.json_out)
    if args.screenshot:
        try:
            ok = screenshot(out, Path(args.screenshot))
        except (subprocess.SubprocessError, OSError) as e:
            print(f"steer demo: screenshot failed: {e}", file=sys.stderr)
            return 1
        if not ok:
            print("steer demo: --screenshot needs chromium (apt-get install chromium)", file=sys.stderr)
            return 1
        print(f"screenshot: {args.screenshot}", file=sys.stderr)
    return 0


__all__ = ["DEFAULTS", "ablation_cmd", "add_demo_parser", "command_line", "config_from_args"]
