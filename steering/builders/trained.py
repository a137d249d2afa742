"""``steer pack train RECIPE``: a pack of trained features (see :mod:`steering.builders.train`).

The recipe is a contrastive recipe (:mod:`steering.builders.contrastive`) with a ``train:`` mapping,
pack-wide and per concept (the concept's keys win, then the command line's)::

    train: {method: vector, layers: [6], steps: 120, data: generated}
    concepts:
      - name: golden_gate
        train: {method: lowrank, layers: [6, 8], rank: 4}
      - name: humor
        train: {method: mean_diff}          # keep the contrastive direction for this one

Keys: every :class:`~steering.builders.train.TrainConfig` field, plus ``method: mean_diff`` (the
contrastive fit, layer scan and all) and ``data`` — ``generated`` (only the pairs of
``steer pack gen-data``: ``--data DIR/<concept>.jsonl``), ``recipe`` (only the recipe's pairs) or
``both`` (default: the generated pairs when the file exists, plus the recipe's).

Strength units (``calibration.scale``, with ``norm_scale`` the same so that
``steer pack calibrate`` doses are multiples of it):

* trained vector: scale = ‖v at the first layer‖, so strength 1 writes exactly the trained
  vectors at every layer (``method: trained``);
* lowrank: scale = 1, so strength 1 is the trained edit (α = 1);
* mean_diff: the contrastive builder's norm unit.

The neutral text of the KL term is the corpora's ``train`` split (assistant turns), disjoint from
the calibration split the statistics are measured on. Each feature's ``trained`` record keeps the
training config, log (losses first/last, held-out preference accuracy, seconds) and the data's
provenance (file sha256 and the generator's meta), so a pack says how it was made.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from steering.builders import calibration as cal
from steering.builders import corpora
from steering.builders.contrastive import (concept_activations, concept_pairs, fit_concept, load_recipe, recipe_model, recipe_writer, RecipeError)
from steering.builders.train import (METHODS, Pair, TrainConfig, TrainedFeature, layer_norms,
                                  mean_diff_init, train_feature)
from steering.packs.registry import default_pack_dir

BUILDER = "steering.builders.trained/1"
DATA_CHOICES = ("both", "generated", "recipe")
NEUTRAL_CORPORA = ("chitchat", "wiki")
NEUTRAL_TEXTS = 256
INIT_FRACTION = 0.25
"""A trained vector starts from the difference of means at this × the median residual norm."""


def concept_train_options(recipe: dict[str, Any], concept: dict[str, Any],
                          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merged ``train:`` options of a concept (recipe < concept < command line)."""
    opts = {**(recipe.get("train") or {}), **(concept.get("train") or {}),
            **{k: v for k, v in (overrides or {}).items() if v is not None}}
    method = opts.get("method", "vector")
    if method not in (*METHODS, "mean_diff"):
        raise RecipeError(f"concept {concept['name']!r}: train.method must be one of "
                          f"{(*METHODS, 'mean_diff')} (got {method!r})")
    if opts.get("data", "both") not in DATA_CHOICES:
        raise RecipeError(f"concept {concept['name']!r}: train.data must be one of {DATA_CHOICES}")
    known = set(TrainConfig.__dataclass_fields__) | {"data"}
    if unknown := set(opts) - known:
        raise RecipeError(f"concept {concept['name']!r}: unknown train keys {sorted(unknown)}")
    return opts


def read_data(data_dir: Path | None, name: str) -> tuple[list[Pair], dict[str, Any] | None]:
    """Generated pairs of a concept and their provenance (the generator's meta, checked: the
    file's sha256 must be the one the generator recorded)."""
    if data_dir is None:
        return [], None
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.exists():
        return [], None
    raw = path.read_bytes()
    meta_path = path.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    sha = hashlib.sha256(raw).hexdigest()
    if meta.get("sha256") and meta["sha256"] != sha:
        raise RecipeError(f"{path}: sha256 {sha[:12]}… is not the generator's {meta['sha256'][:12]}… "
                          "(edited after generation?)")
    pairs = []
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            pairs.append(Pair(str(row["prompt"]), str(row["positive"]), str(row["negative"])))
        except KeyError as e:
            raise RecipeError(f"{path}:{i + 1}: a pair needs prompt, positive and negative ({e} missing)") from None
    return pairs, {**meta, "file": path.name, "sha256": sha, "pairs": len(pairs)}


def neutral_texts(n: int = NEUTRAL_TEXTS) -> list[str]:
    """Assistant turns of the corpora's train split, round-robin (the KL term's text)."""
    out = []
    for _, conv in corpora.interleave(list(NEUTRAL_CORPORA), "train"):
        out.extend(m["content"] for m in conv if m["role"] == "assistant" and m["content"].strip())
        if len(out) >= n:
            break
    return out[:n]


def concept_pairs_for(recipe: dict[str, Any], concept: dict[str, Any], data: str,
                      data_dir: Path | None) -> tuple[list[Pair], dict[str, Any]]:
    gen, meta = read_data(data_dir, concept["name"]) if data != "recipe" else ([], None)
    own = [Pair(*p) for p in concept_pairs(recipe, concept)] if data != "generated" else []
    if data == "generated" and not gen:
        raise RecipeError(f"concept {concept['name']!r}: train.data is 'generated' but "
                          f"{data_dir}/{concept['name']}.jsonl has no pairs (run steer pack gen-data)")
    return gen + own, {"generated": meta, "recipe_pairs": len(own), "generated_pairs": len(gen)}


def build_trained(recipe: str | Path | dict[str, Any], out: str | Path | None = None,
                  model_dir: str | Path | None = None, data_dir: str | Path | None = None,
                  features: Sequence[str] | None = None, overrides: dict[str, Any] | None = None,
                  progress: bool = True, on_step: Callable[[int, int], None] | None = None) -> Path:
    """Train the recipe's concepts (``features``: a subset) and write the pack; returns its folder.
    ``on_step`` is passed to :func:`~steering.builders.train.train_feature`."""
    import torch

    r = load_recipe(recipe)
    concepts = [c for c in r["concepts"] if not features or c["name"] in features]
    if features and (missing := set(features) - {c["name"] for c in concepts}):
        raise RecipeError(f"no concept {', '.join(sorted(missing))} in the recipe")
    plans = {c["name"]: concept_train_options(r, c, overrides) for c in concepts}
    seed = int(r.get("seed", 0))
    torch.manual_seed(seed)
    model, tok, n_layers, model_dir = recipe_model(r, model_dir)
    neutral = neutral_texts()
    data_dir = Path(data_dir) if data_dir is not None else None

    built: dict[str, dict[str, Any]] = {}
    for c in concepts:
        opts = dict(plans[c["name"]])
        data = opts.pop("data", "both")
        method = opts.get("method", "vector")
        pairs, data_record = concept_pairs_for(r, c, data, data_dir)
        if method == "mean_diff":
            cand = [int(x) for x in r.get("layers", [n_layers // 4, n_layers // 3, n_layers // 2])]
            pos, neg = concept_activations(model, tok, r, c, sorted(set(cand)))
            fit = fit_concept(r, c, pos, neg, seed)
            built[c["name"]] = {"method": "mean_diff", "layer": fit["layer"], "direction": fit["direction"],
                                "contrastive": {k: fit[k] for k in ("method", "heldout", "layer_scan")}}
            continue
        opts.setdefault("seed", seed)
        cfg = TrainConfig(**opts)
        if max(cfg.layers) >= n_layers:
            raise RecipeError(f"concept {c['name']!r}: layer {max(cfg.layers)} ≥ the model's {n_layers}")
        init = None
        if cfg.method == "vector":
            norms = layer_norms(model, tok, neutral[:64], cfg.layers)
            init = mean_diff_init(model, tok, pairs, cfg.layers, INIT_FRACTION, norms)
        tf = train_feature(model, tok, pairs, neutral, cfg, init=init, progress=progress, desc=c["name"],
                           on_step=on_step)
        built[c["name"]] = {"method": cfg.method, "layer": cfg.layers[0], "trained": tf,
                            "direction": tf.readout, "data": data_record}

    all_texts = [t for c in concepts for _, a, b in concept_pairs(r, c) for t in (a, b)]
    enc, cal_info = cal.calibration_samples(tok, r.get("calibration"), all_texts)
    toks = cal.layer_tokens(model, enc, sorted({b["layer"] for b in built.values()}), progress=progress)

    pk = r["pack"]
    w = recipe_writer(r, model_dir, {
        "builder": BUILDER,
        "corpus": "training pairs per feature (see each feature's trained.data); KL text: "
                  f"{'+'.join(NEUTRAL_CORPORA)} train split; calibration: see calibration.corpus",
        "seed": seed, "method": "per feature (trained.method)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
        {"unit": cal.CALIBRATION_UNIT + " Trained vectors: scale = the trained vector's norm at its "
                 "first layer (strength 1 = the edit as trained); lowrank: scale 1.", **cal_info})
    for c in concepts:
        b = built[c["name"]]
        stats = cal.direction_stats(toks[b["layer"]], b["direction"])
        stats["strength_range"] = list(c.get("strength_range", r.get("strength_range", [-1.5, 1.5])))
        common = dict(description=c.get("description", ""), tags=c.get("tags", []),
                      default_mode=c.get("default_mode", "add"))
        if b["method"] == "mean_diff":
            w.add_feature(c["name"], b["layer"], "direction", b["direction"], calibration=stats,
                          extra={"contrastive": b["contrastive"]}, **common)
            continue
        tf: TrainedFeature = b["trained"]
        record = {"trained": {"method": tf.method, "layers": tf.layers, "builder": BUILDER,
                              "data": b["data"], "log": tf.log,
                              "resid_norm_p50": {str(k): v for k, v in tf.resid_norm_p50.items()}}}
        multi = tf.layers if len(tf.layers) > 1 else None
        if tf.method == "vector":
            unit = float(np.linalg.norm(tf.directions[0]))
            stats.update(scale=unit, norm_scale=unit, method="trained")
            w.add_feature(c["name"], tf.layers[0], "direction", tf.directions[0], calibration=stats,
                          layers=multi, directions=tf.directions if multi else None, extra=record, **common)
        else:
            stats.update(scale=1.0, norm_scale=1.0, method="trained")
            common["default_mode"] = "add"
            w.add_feature(c["name"], tf.layers[0], "lowrank", tf.readout, calibration=stats, layers=multi,
                          lowrank={"R": tf.R, "W": tf.W, "b": tf.b}, extra=record, **common)
    if out is None:
        base = Path(r["_path"]).resolve().parent.parent if r.get("_path") else Path.cwd()
        out = default_pack_dir(pk["name"], base)
    return w.write(out)


def summary(pack_dir: str | Path) -> str:
    """One line per feature: method, layers, unit, held-out preference accuracy, final losses."""
    from steering.packs.manifest import read_manifest

    lines = []
    for f in read_manifest(pack_dir).features:
        t = getattr(f, "trained", None) or {}
        log = t.get("log", {})
        acc = log.get("heldout_preference_accuracy") or {}
        last = log.get("loss_last", {})
        lines.append(f"{f.name:<18} {t.get('method', 'mean_diff'):<9} L{','.join(map(str, f.layers or [f.layer])):<8} "
                     f"c={f.calibration.scale:8.3f} pairs={log.get('pairs', '-')!s:<4} "
                     f"held-out pref acc +{acc.get('plus', float('nan')):.2f}/−{acc.get('minus', float('nan')):.2f} "
                     f"pref={last.get('pref', float('nan')):.3f} kl={last.get('kl', float('nan')):.4f}")
    return "\n".join(lines)


__all__ = ["BUILDER", "build_trained", "concept_train_options", "neutral_texts", "read_data", "summary"]
