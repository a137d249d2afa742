"""Contrastive builder: named directions from positive/negative example sets.

A recipe (YAML) names concepts with paired examples::

    pack: {name: smollm2-tone, version: 1.0.0, description: ..., license: Apache-2.0}
    model: null                 # a catalog model (qwen2.5-0.5b) or a local HF folder; null = SmolLM2-135M
    concepts_from: other.yaml   # instead of concepts: those of another recipe (its layers dropped)
    seed: 0
    layers: [6, 8, 10, 12]      # candidate layers (a concept may fix its own `layer`)
    method: mean_diff           # or pca (first principal component of paired differences)
    heldout: 0.25               # fraction of pairs held out to pick the layer
    format: assistant           # examples are assistant turns (after `prompt`); or "plain"
    prompt: "Say something."    # default user turn before each example (format assistant)
    calibration: {corpus: [chitchat, wiki], samples: 120}
    concepts:
      - name: formality
        description: formal, polished register (negative: casual chat)
        tags: [tone]
        strength_range: [-1.5, 1.5]       # optional: recommended strengths
        pairs:                            # [positive, negative] or {prompt, pos, neg}
          - ["I would be delighted to assist you.", "sure lol, whatever u need"]

Per concept and candidate layer: the direction is mean(pos) − mean(neg) of the per-example mean
activation over the example's content tokens (method ``mean_diff``), computed on the training
pairs; the held-out pairs are projected on it and scored by paired accuracy and d′ (difference
of projected means over the pooled standard deviation). Unless ``layer`` is fixed, the earliest
layer with the best held-out paired accuracy and a d′ within ``layer_tolerance`` (0.85) of the
best d′ wins (earlier edits leave more computation to express the concept); the final direction is then recomputed on
all pairs at that layer and calibrated (:mod:`steering.builders.calibration`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from steering.builders import calibration as cal
from steering.builders import collect
from steering.packs.manifest import read_manifest
from steering.packs.registry import default_pack_dir
from steering.packs.tensors import model_fingerprint
from steering.packs.writer import PackWriter

BUILDER = "steering.packs.contrastive/1"
DEFAULT_PROMPT = "Say something."


class RecipeError(ValueError):
    pass


def load_recipe(recipe: str | Path | dict[str, Any]) -> dict[str, Any]:
    import yaml

    if isinstance(recipe, dict):
        r = dict(recipe)
        r.setdefault("_path", None)
    else:
        p = Path(recipe)
        r = yaml.safe_load(p.read_text())
        if not isinstance(r, dict):
            raise RecipeError(f"{p}: a recipe must be a mapping")
        r["_path"] = str(p)
    if r.get("concepts_from") is not None:
        r = _with_concepts_of(r)
    if not isinstance(r.get("pack"), dict) or "name" not in r["pack"]:
        raise RecipeError("recipe needs pack: {name: ...}")
    concepts = r.get("concepts")
    if not isinstance(concepts, list) or not concepts:
        raise RecipeError("recipe needs a non-empty concepts list")
    seen = set()
    for c in concepts:
        if "name" not in c:
            raise RecipeError("every concept needs a name")
        if c["name"] in seen:
            raise RecipeError(f"duplicate concept {c['name']!r}")
        seen.add(c["name"])
        pairs = concept_pairs(r, c)
        if len(pairs) < 4:
            raise RecipeError(f"concept {c['name']!r} needs at least 4 pairs (has {len(pairs)})")
    return r


def _with_concepts_of(r: dict[str, Any]) -> dict[str, Any]:
    """``r`` with the concepts (and default ``prompt``) of the recipe its ``concepts_from`` names,
    a path beside ``r``'s file: one set of examples builds the pack of every model. A layer the
    other recipe fixes for a concept was chosen on its model, so it is dropped."""
    if r.get("concepts"):
        raise RecipeError("a recipe has either concepts or concepts_from, not both")
    if not r.get("_path"):
        raise RecipeError("concepts_from needs a recipe file (it is a path beside it)")
    source = load_recipe(Path(r["_path"]).parent / str(r["concepts_from"]))
    r = {**r, "concepts": [{k: v for k, v in c.items() if k != "layer"} for c in source["concepts"]]}
    if "prompt" in source:
        r.setdefault("prompt", source["prompt"])
    return r


def concept_pairs(recipe: dict[str, Any], concept: dict[str, Any]) -> list[tuple[str, str, str]]:
    """[(prompt, positive, negative)] of a concept."""
    prompt = concept.get("prompt", recipe.get("prompt", DEFAULT_PROMPT))
    out = []
    for p in concept.get("pairs", []):
        if isinstance(p, dict):
            out.append((p.get("prompt", prompt), p["pos"], p["neg"]))
        else:
            if len(p) != 2:
                raise RecipeError(f"concept {concept['name']!r}: a pair must be [positive, negative]")
            out.append((prompt, str(p[0]), str(p[1])))
    pos, neg = concept.get("positive"), concept.get("negative")
    if pos or neg:
        if not pos or not neg or len(pos) != len(neg):
            raise RecipeError(f"concept {concept['name']!r}: positive/negative lists must have equal length")
        out.extend((prompt, str(a), str(b)) for a, b in zip(pos, neg))
    return out


def _encode(tok, fmt: str, prompt: str, text: str) -> collect.Encoded:
    if fmt == "plain":
        return collect.encode_plain(tok, text)
    msgs = ([{"role": "user", "content": prompt}] if prompt else []) + [{"role": "assistant", "content": text}]
    return collect.encode_chat(tok, msgs, content_roles=("assistant",))


def _direction(pos: np.ndarray, neg: np.ndarray, method: str) -> np.ndarray:
    md = pos.mean(0) - neg.mean(0)
    if method == "mean_diff":
        return md
    if method == "pca":
        diffs = pos - neg  # uncentered: the shared offset is the signal
        _, _, vt = np.linalg.svd(diffs, full_matrices=False)
        v = vt[0]
        v = v if v @ md >= 0 else -v
        return v * np.linalg.norm(md)  # keep the mean-difference magnitude
    raise RecipeError(f"unknown method {method!r} (mean_diff | pca)")


def separation(direction: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """Held-out separation of paired examples along ``direction``."""
    u = direction / np.linalg.norm(direction)
    a, b = pos @ u, neg @ u
    pooled = np.sqrt((a.var() + b.var()) / 2) + 1e-8
    return {"paired_accuracy": float((a > b).mean()), "d_prime": float((a.mean() - b.mean()) / pooled),
            "gap": float(a.mean() - b.mean())}


def concept_activations(model, tok, recipe: dict[str, Any], concept: dict[str, Any],
                        layers: Sequence[int]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per-example mean activations {layer: [n_pairs, d]} for positives and negatives."""
    fmt = concept.get("format", recipe.get("format", "assistant"))
    pairs = concept_pairs(recipe, concept)
    enc = [_encode(tok, fmt, pr, t) for pr, a, b in pairs for t in (a, b)]
    acts = collect.sample_activations(model, enc, layers, reduce="mean")
    return ({L: v[0::2] for L, v in acts.items()}, {L: v[1::2] for L, v in acts.items()})


def fit_concept(recipe: dict[str, Any], concept: dict[str, Any], pos: dict[int, np.ndarray],
                neg: dict[int, np.ndarray], seed: int = 0) -> dict[str, Any]:
    """Choose the layer by held-out separation and fit the final direction."""
    method = concept.get("method", recipe.get("method", "mean_diff"))
    n = len(next(iter(pos.values())))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_held = max(2, int(round(n * float(recipe.get("heldout", 0.25)))))
    held, train = perm[:n_held], perm[n_held:]
    per_layer = {}
    for L in sorted(pos):
        d = _direction(pos[L][train], neg[L][train], method)
        per_layer[L] = separation(d, pos[L][held], neg[L][held])
    fixed = concept.get("layer", recipe.get("layer"))
    if fixed is not None:
        layer = int(fixed)
    else:
        # the earliest layer whose held-out separation is within `layer_tolerance` of the best:
        # earlier edits leave more computation to express the concept
        # (a negative best — noisy pairs — keeps its own layer: the bar is below it, not above)
        tol = float(recipe.get("layer_tolerance", 0.85))
        best = max(s["d_prime"] for s in per_layer.values())
        acc = max(s["paired_accuracy"] for s in per_layer.values())
        bar = best - (1.0 - tol) * abs(best)
        layer = min((L for L, s in per_layer.items()
                     if s["d_prime"] >= bar and s["paired_accuracy"] >= acc),
                    default=max(per_layer, key=lambda L: per_layer[L]["d_prime"]))
    direction = _direction(pos[layer], neg[layer], method)
    return {"layer": layer, "direction": direction, "method": method,
            "heldout": {"pairs": int(n_held), "train_pairs": int(len(train)), **per_layer[layer]},
            "layer_scan": {str(L): {k: round(v, 4) for k, v in s.items()} for L, s in per_layer.items()}}


def _git_rev() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).parent, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def recipe_model(r: dict[str, Any], model_dir: str | Path | None = None) -> tuple[Any, Any, int, str | Path]:
    """(model, tokenizer, number of layers, model folder) a recipe is built on: ``model_dir``,
    else the recipe's ``model``, else the bundled model (transformers, for collection)."""
    if model_dir is None:
        from steering.model_store import resolve_model

        model_dir = resolve_model(r.get("model"))  # a catalog name or alias, a folder, or null
    model, tok = collect.load_model(model_dir)
    return model, tok, collect.num_layers(model), model_dir


def recipe_writer(r: dict[str, Any], model_dir: str | Path, provenance: dict[str, Any],
                  calibration: dict[str, Any]) -> PackWriter:
    """The PackWriter of a recipe's pack: its name, version, model and licence from the recipe's
    ``pack``; ``provenance`` (its ``builder`` first) gains the git revision and the recipe file."""
    pk = r["pack"]
    prov = {"builder": provenance["builder"], "git": _git_rev(),
            "recipe": Path(r["_path"]).name if r.get("_path") else None,
            **{k: v for k, v in provenance.items() if k != "builder"}}
    return PackWriter(
        pk["name"], str(pk.get("version", "0.1.0")), model_fingerprint(model_dir),
        model_id=pk.get("model_id", r.get("model_id", Path(str(model_dir)).name)),
        description=pk.get("description", ""), license=pk.get("license", "Apache-2.0"),
        provenance=prov, calibration=calibration)


def build_contrastive(recipe: str | Path | dict[str, Any], out: str | Path | None = None,
                      model_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Build a direction pack from ``recipe`` (path or dict); returns the pack folder.

    ``out`` defaults to ``feature_packs/{pack name}`` next to the recipe's folder."""
    import torch
    from tqdm.auto import tqdm

    r = load_recipe(recipe)
    seed = int(r.get("seed", 0))
    np.random.seed(seed)
    torch.manual_seed(seed)
    model, tok, n_layers, model_dir = recipe_model(r, model_dir)
    cand = [int(x) for x in r.get("layers", [n_layers // 4, n_layers // 3, n_layers // 2])]
    fits: dict[str, dict[str, Any]] = {}
    for c in tqdm(r["concepts"], desc="concepts", disable=not progress):
        layers = sorted(set(cand) | ({int(c["layer"])} if c.get("layer") is not None else set()))
        pos, neg = concept_activations(model, tok, r, c, layers)
        fits[c["name"]] = fit_concept(r, c, pos, neg, seed)

    # calibration on the corpus
    all_texts = [t for c in r["concepts"] for _, a, b in concept_pairs(r, c) for t in (a, b)]
    enc, cal_info = cal.calibration_samples(tok, r.get("calibration"), all_texts)
    toks = cal.layer_tokens(model, enc, [f["layer"] for f in fits.values()], progress=progress)

    w = recipe_writer(r, model_dir, {
        "builder": BUILDER, "corpus": "recipe examples (directions); calibration: see calibration.corpus",
        "seed": seed, "method": r.get("method", "mean_diff")}, {"unit": cal.CALIBRATION_UNIT, **cal_info})
    for c in r["concepts"]:
        f = fits[c["name"]]
        stats = cal.direction_stats(toks[f["layer"]], f["direction"])
        stats["strength_range"] = list(c.get("strength_range", r.get("strength_range", [-1.5, 1.5])))
        w.add_feature(
            c["name"], f["layer"], "direction", f["direction"], calibration=stats,
            description=c.get("description", ""), tags=c.get("tags", []),
            default_mode=c.get("default_mode", "add"),
            extra={"contrastive": {"method": f["method"], "pairs": len(concept_pairs(r, c)),
                                   "heldout": f["heldout"], "layer_scan": f["layer_scan"]}})
    if out is None:
        base = Path(r["_path"]).resolve().parent.parent if r.get("_path") else Path.cwd()
        out = default_pack_dir(r["pack"]["name"], base)
    return w.write(out)


def concept_directions(model, tok, recipe: str | Path | dict[str, Any], layer: int
                       ) -> dict[str, dict[str, Any]]:
    """Every concept's direction at one fixed ``layer`` plus its per-example activations
    (used to match SAE latents to concepts)."""
    r = load_recipe(recipe)
    out = {}
    for c in r["concepts"]:
        pos, neg = concept_activations(model, tok, r, c, [layer])
        method = c.get("method", r.get("method", "mean_diff"))
        out[c["name"]] = {"direction": _direction(pos[layer], neg[layer], method),
                          "pos": pos[layer], "neg": neg[layer], "concept": c}
    return out


def summary(pack_dir: str | Path) -> str:
    """One line per feature of a contrastive pack: layer, dose, calibration, held-out separation."""
    def num(x: float | None) -> float:
        return float("nan") if x is None else x

    lines = []
    for f in read_manifest(pack_dir).features:
        c, h = f.calibration, (f.contrastive or {}).get("heldout", {})
        lines.append(f"{f.name:<18} L{f.layer:<3} c={c.scale:8.2f} p50={num(c.p50):8.2f} "
                     f"|d|={num(c.direction_norm):7.2f} |h|p50={num(c.resid_norm_p50):7.1f} "
                     f"held-out acc={h.get('paired_accuracy', float('nan')):.2f} d'={h.get('d_prime', float('nan')):.2f}")
    return "\n".join(lines)
