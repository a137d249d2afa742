"""``steer pack calibrate PACK``, and rebuilds (``build-contrastive``, ``train-sae``) that run it.

The pack subcommands live in :mod:`steering.builders.cli`, which cannot reach the eval (it needs a
server and the scorers); ``steer`` adds ``calibrate`` to them here and wraps the two builders so a
rebuilt pack is calibrated unless ``--no-calibrate``. See :mod:`clients.eval.calibrate`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import httpx

from clients.eval import calibrate
from clients.eval.calibrate import (CALIBRATION_PROMPTS, CalibrationConfig, apply, measure, pack_features,
                                    prompts_record, write_manifest)
from clients.eval.cli import DEFAULTS
from clients.eval.harness import DEFAULT_SERVE_ARGS, Client, EvalError, load_prompts
from steering.packs import bundled_packs_dir
from steering.packs.manifest import MANIFEST_FILE, PackError, read_manifest

DEFAULT_DOSES = ",".join(f"{d:g}" for d in CalibrationConfig().doses)


def add_calibrate_parser(pack_sub: argparse._SubParsersAction) -> None:
    """``steer pack calibrate`` and ``--no-calibrate`` on the builders."""
    s = pack_sub.add_parser("calibrate", help="set each feature's strength 1.0 from its measured effect",
                            description=calibrate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    calibrate_arguments(s)
    from clients.eval.gendata_cli import add_gendata_parser

    add_gendata_parser(pack_sub)
    from clients.eval.choose import add_choose_parser

    add_choose_parser(pack_sub)
    for name in ("build-contrastive", "train-sae", "train"):
        _calibrate_after(pack_sub.choices[name])


def calibrate_arguments(s: argparse.ArgumentParser) -> None:
    d, c = DEFAULTS, CalibrationConfig()
    s.add_argument("pack", help="pack folder, or the name of a bundled pack")
    s.add_argument("--features", default=None, help="comma list (default: every feature with a scorer)")
    s.add_argument("--doses", default=DEFAULT_DOSES, help=f"dose grid in norm units (default: {DEFAULT_DOSES})")
    s.add_argument("--max-ppl-ratio", type=float, default=c.max_ppl_ratio,
                   help=f"fluency budget: median perplexity / unsteered (default: {c.max_ppl_ratio:g})")
    s.add_argument("--alpha", type=float, default=c.alpha, help=f"Wilcoxon p of a clear effect (default: {c.alpha:g})")
    s.add_argument("--prompts", default=str(CALIBRATION_PROMPTS),
                   help="JSONL of {id, prompt}, disjoint from the eval's (default: the shipped calibration set)")
    s.add_argument("--limit-prompts", type=int, default=None, help="use only the first N prompts")
    s.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"(default: {d.max_tokens})")
    s.add_argument("--long-max-tokens", type=int, default=d.long_max_tokens,
                   help=f"tokens for length scorers (default: {d.long_max_tokens})")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--concurrency", type=int, default=d.concurrency)
    s.add_argument("--dry-run", action="store_true", help="print the chosen points; do not write the pack")
    s.add_argument("--url", default=None, help="a running server that serves this pack folder; default: start one")
    s.add_argument("--api-key", default=None)
    s.add_argument("--serve-args", default=DEFAULT_SERVE_ARGS,
                   help=f"flags for the server started without --url (default: '{DEFAULT_SERVE_ARGS}')")
    s.set_defaults(func=calibrate_cmd)


def _calibrate_after(builder: argparse.ArgumentParser) -> None:
    """Make a builder calibrate the pack it wrote (its handler sets ``args.built_pack``)."""
    build = builder.get_default("func")
    builder.add_argument("--no-calibrate", action="store_true",
                         help="keep the norm-based scale (skip steer pack calibrate)")

    def build_then_calibrate(a: argparse.Namespace) -> int:
        rc = build(a)
        if rc or a.no_calibrate:
            return rc
        parser = argparse.ArgumentParser(prog="steer pack calibrate")
        calibrate_arguments(parser)
        serve_args = DEFAULT_SERVE_ARGS + (f" --model {shlex.quote(a.model)}" if a.model else "")
        return calibrate_cmd(parser.parse_args([str(a.built_pack), "--serve-args", serve_args]))

    builder.set_defaults(func=build_then_calibrate)


def resolve_pack(arg: str) -> Path:
    path = Path(arg)
    if not (path / MANIFEST_FILE).is_file():
        path = bundled_packs_dir() / arg
    if not (path / MANIFEST_FILE).is_file():
        raise EvalError(f"no pack folder or bundled pack {arg!r}")
    return path


async def run(url: str, api_key: str | None, pack_dir: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """Measure and apply; returns (new manifest, curves)."""
    read_manifest(pack_dir)  # a PackError names a bad manifest before any request
    pack = json.loads((pack_dir / MANIFEST_FILE).read_text())
    cfg = CalibrationConfig(doses=[float(x) for x in args.doses.split(",") if x.strip()],
                            max_ppl_ratio=args.max_ppl_ratio, alpha=args.alpha)
    only = [x.strip() for x in args.features.split(",")] if args.features else None
    features = pack_features(pack, only)
    if not features:
        raise EvalError(f"pack {pack['name']!r} has no feature with a scorer; its scales stay norm-based")
    prompts = load_prompts(args.prompts, args.limit_prompts)
    sampling = dict(max_tokens=args.max_tokens, long_max_tokens=args.long_max_tokens, seed=args.seed,
                    concurrency=args.concurrency)
    client = Client(url, api_key)
    try:
        curves = await measure(client, pack, features, prompts, cfg, sampling)
        version = (await client.http.get("/version")).json()
    finally:
        await client.close()
    record = prompts_record(Path(args.prompts), prompts, cfg, sampling, version)
    return apply(pack, curves, features, cfg, record), curves


def table(manifest: dict[str, Any], features: Any) -> str:
    """One line per calibrated feature: chosen dose, status, Δ, p, perplexity ratio."""
    lines = [f"{'feature':<22} {'status':<7} {'dose':>5} {'scale':>8} {'diff':>9} {'p':>8} {'ppl×':>5}"]
    for f in manifest["features"]:
        if f["name"] not in features:
            continue
        ch = f["calibration"]["effect"]["chosen"]
        p = "-" if ch["p"] is None else f"{ch['p']:.1e}"
        diff = "-" if ch["diff"] is None else f"{ch['diff']:.3g}"
        lines.append(f"{f['name']:<22} {ch['status']:<7} {ch['dose']:>5g} {f['calibration']['scale']:>8.2f} "
                     f"{diff:>9} {p:>8} {ch['ppl_ratio'] or float('nan'):>5.2f}")
    return "\n".join(lines)


def calibrate_cmd(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        pack_dir = resolve_pack(args.pack)
        if args.url:
            manifest, curves = asyncio.run(run(args.url, args.api_key, pack_dir, args))
        else:
            from clients.launch import local_server

            serve_args = [*shlex.split(args.serve_args), "--no-bundled-packs", "--feature-pack", str(pack_dir)]
            print(f"steer pack calibrate: starting a server ({' '.join(serve_args)}) …", file=sys.stderr, flush=True)
            with local_server(serve_args) as srv:
                manifest, curves = asyncio.run(run(srv.url, None, pack_dir, args))
    except (EvalError, PackError, RuntimeError, OSError, ValueError, httpx.HTTPError) as exc:
        print(f"steer pack calibrate: error: {exc}", file=sys.stderr)
        return 1
    print(table(manifest, curves))
    if args.dry_run:
        print("(dry run: the pack is unchanged)", file=sys.stderr)
    else:
        write_manifest(pack_dir, manifest)
        print(f"wrote {pack_dir / MANIFEST_FILE}", file=sys.stderr)
    return 0
