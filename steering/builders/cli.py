"""``steer pack ...``: build, import, export, validate and list feature packs.

The server CLI adds these with :func:`add_pack_parser` (``steer pack build-contrastive ...``);
``python -m steering.builders.cli ...`` runs them standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _build_contrastive(a) -> int:
    from steering.builders.contrastive import build_contrastive, summary

    p = build_contrastive(a.recipe, a.out, a.model, progress=not a.quiet)
    print(summary(p))
    print(p)
    a.built_pack = p  # for a follow-up step (``steer`` calibrates it)
    return 0


def _train_sae(a) -> int:
    from steering.builders import sae
    from steering.packs.manifest import read_manifest

    opts = sae.load_sae_recipe(a.config) if a.config else {}
    for k in ("layer", "d_sae", "k", "tokens", "epochs", "lr", "seed", "name", "model",
              "concepts_recipe", "activations_dir", "batch_size"):
        v = getattr(a, k, None)
        if v is not None:
            opts[k] = v
    p = sae.train_sae(out=a.out, progress=not a.quiet, **opts)
    m = read_manifest(p)
    _print({"pack": str(p), "metrics": m.saes[0].metrics, "named": [f.name for f in m.features]})
    a.built_pack = p  # for a follow-up step (``steer`` calibrates it)
    return 0


def _train(a) -> int:
    from steering.builders.trained import build_trained, summary

    overrides = {"method": a.method, "rank": a.rank, "steps": a.steps, "lr": a.lr,
                 "kl_weight": a.kl_weight, "time_budget_s": a.time_budget, "data": a.data_source,
                 "layers": [int(x) for x in a.layers.split(",")] if a.layers else None}
    features = [f for f in a.features.split(",") if f] if a.features else None
    p = build_trained(a.recipe, a.out, a.model, a.data, features, overrides, progress=not a.quiet)
    print(summary(p))
    print(p)
    a.built_pack = p  # for a follow-up step (``steer`` calibrates it)
    return 0


def _import_saelens(a) -> int:
    from steering.builders.importers import import_saelens

    print(import_saelens(a.dir, a.out, a.model, a.name, a.explanations, calibrate=not a.no_calibrate))
    return 0


def _import_gguf(a) -> int:
    from steering.builders.importers import import_gguf

    print(import_gguf(a.file, a.out, a.model, a.name))
    return 0


def _export_gguf(a) -> int:
    from steering.builders.importers import export_gguf

    feats = None
    if a.feature:
        feats = {}
        for spec in a.feature:
            n, _, s = spec.partition("=")
            feats[n] = float(s) if s else 1.0
    print(export_gguf(a.pack, a.file, feats))
    return 0


def _validate(a) -> int:
    from steering.packs.manifest import PackError
    from steering.builders.importers import validate

    model = a.model
    if model is None and not a.no_model:
        from steering.model_store import resolve_model

        model = resolve_model(None)
    try:
        _print(validate(a.path, model, strict_model=not a.allow_other_weights))
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _list(a) -> int:
    from steering.builders.importers import list_packs

    rows = list_packs(a.paths or None)
    if a.json:
        _print(rows)
    else:
        for r in rows:
            if r.get("ok"):
                print(f"{r['name']:<28} {r['version']:<8} {r['num_features']:>4} features  "
                      f"layers {r['layers']}  saes {[s['id'] for s in r['saes']]}  {r['path']}")
            else:
                print(f"{r['name']:<28} INVALID  {r['error']}")
    return 0 if all(r.get("ok") for r in rows) else 1


def add_pack_parser(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``pack`` and its subcommands; each sets ``func`` (call ``args.func(args)`` → exit code).
    Returns the subcommands, so ``steer`` can add the ones that need a server (``calibrate``)."""
    p = subparsers.add_parser("pack", help="build, import, export, validate and list feature packs")
    sub = p.add_subparsers(dest="pack_command", required=True)

    def common(sp, model=True):
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if model:
            sp.add_argument("--model", default=None, help="local HF model folder (default: bundled SmolLM2)")

    s = sub.add_parser("build-contrastive", help="build a direction pack from a contrastive recipe YAML")
    s.add_argument("recipe")
    s.add_argument("--out", default=None, help="pack folder (default: feature_packs/<name> beside recipes/)")
    common(s)
    s.set_defaults(func=_build_contrastive)

    s = sub.add_parser("train-sae", help="collect activations, train a TopK SAE, label it, write a pack")
    s.add_argument("--config", default=None, help="SAE recipe YAML (flags override it)")
    s.add_argument("--layer", type=int)
    s.add_argument("--d-sae", dest="d_sae", type=int)
    s.add_argument("-k", "--k", type=int, help="latents active per token (TopK)")
    s.add_argument("--tokens", type=int, help="activation tokens to collect and train on")
    s.add_argument("--epochs", type=float)
    s.add_argument("--batch-size", dest="batch_size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--name", default=None, help="pack name")
    s.add_argument("--concepts-recipe", dest="concepts_recipe", default=None,
                   help="contrastive recipe whose concepts are matched to latents")
    s.add_argument("--activations-dir", dest="activations_dir", default=None,
                   help="where activation shards are cached (resumable)")
    s.add_argument("--out", default=None)
    common(s)
    s.set_defaults(func=_train_sae)

    s = sub.add_parser("train", help="train features (vectors, lowrank, multi-layer) from a recipe and its data",
                       description="Train each concept of a contrastive recipe by its train: options (a "
                       "preference-trained vector on one or several layers, a rank-r lowrank edit, or the "
                       "mean_diff direction) on the recipe's pairs and gen-data's; see steering/builders/trained.py.")
    s.add_argument("recipe")
    s.add_argument("--data", default=None, help="folder of steer pack gen-data output (<concept>.jsonl)")
    s.add_argument("--data-source", dest="data_source", choices=("both", "generated", "recipe"), default=None,
                   help="which pairs to train on (default: the recipe's train.data, else both)")
    s.add_argument("--features", default=None, help="comma list of concepts (default: all)")
    s.add_argument("--method", choices=("vector", "lowrank", "mean_diff"), default=None,
                   help="override every concept's train.method")
    s.add_argument("--layers", default=None, help="comma list of layers, e.g. 6,8,10 (override)")
    s.add_argument("--rank", type=int, default=None, help="r of lowrank features (1..8)")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--kl-weight", dest="kl_weight", type=float, default=None)
    s.add_argument("--time-budget", dest="time_budget", type=float, default=None,
                   help="seconds per feature before training stops early")
    s.add_argument("--out", default=None, help="pack folder (default: feature_packs/<name> beside recipes/)")
    common(s)
    s.set_defaults(func=_train)

    s = sub.add_parser("import-saelens", help="import a SAELens SAE folder (cfg.json + sae_weights.safetensors)")
    s.add_argument("dir")
    s.add_argument("--out", default=None)
    s.add_argument("--name", default=None)
    s.add_argument("--explanations", default=None, help="Neuronpedia explanations JSON")
    s.add_argument("--no-calibrate", action="store_true", help="skip measuring the layer norm (strength = raw activation)")
    common(s)
    s.set_defaults(func=_import_saelens)

    s = sub.add_parser("import-gguf", help="import a llama.cpp/repeng control-vector GGUF")
    s.add_argument("file")
    s.add_argument("--out", default=None)
    s.add_argument("--name", default=None)
    common(s)
    s.set_defaults(func=_import_gguf)

    s = sub.add_parser("export-gguf", help="export direction features as a control-vector GGUF")
    s.add_argument("pack")
    s.add_argument("file")
    s.add_argument("--feature", action="append", metavar="NAME[=STRENGTH]",
                   help="feature to export (repeatable; default: all, one per layer)")
    s.set_defaults(func=_export_gguf)

    s = sub.add_parser("validate", help="verify a pack (hashes, tensors, model fingerprint)")
    s.add_argument("path")
    s.add_argument("--model", default=None, help="model folder to check against (default: bundled)")
    s.add_argument("--no-model", action="store_true", help="do not check the model fingerprint")
    s.add_argument("--allow-other-weights", action="store_true",
                   help="accept a model with the same shapes but other weights")
    s.set_defaults(func=_validate)

    s = sub.add_parser("list", help="list packs (default: the bundled feature_packs/)")
    s.add_argument("paths", nargs="*")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_list)
    return sub


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steer")
    add_pack_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
