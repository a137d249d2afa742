"""``steer pack calibrate``: strength 1.0 = the dose where a feature clearly shows, still fluent.

Semantics: for every feature of a pack that has a scorer, generate on the calibration prompts
(``prompts/calibration.jsonl``, disjoint from the eval's ``neutral.jsonl``) at doses m·u on a grid,
where u is the *norm unit* (``DOSE_FRACTION`` × the median residual norm at the feature's layer,
the pack builders' scale and the fallback), score each output with the feature's own scorer and
its perplexity under the unsteered model (the eval harness, over HTTP, the real engine), and pick:

* fluent doses: grid doses from the smallest up, while the median perplexity stays
  ≤ ``max_ppl_ratio`` (1.5) × the unsteered one;
* the chosen dose m*: the largest fluent dose (the smallest grid dose if none is fluent);
* ``status``: ``effect`` when the score rises at m* (paired Wilcoxon p < ``alpha`` = 0.01),
  ``weak`` when it rises that clearly only at doses that are not fluent, ``none`` when no dose
  moves it. ``effect``/``weak`` set ``calibration.scale = m*·u``; ``none`` keeps u, and the
  feature's ``evidence.steering`` says steering showed no effect on its concept (and the catalog
  tag ``no-measured-effect`` marks it).

The whole curve (dose → score, Δ, p, perplexity ratio, and the AxBench-style concept share,
fluency share and their harmonic mean that ``steer pack choose`` compares methods by), the chosen point and how the run measured
(prompts and their sha256, doses, sampling, server) go into each feature's ``calibration.effect``
(and ``calibration.method``). Recalibrating measures in
norm units again (strength = m·u / current scale), so it does not compound. Features without a
scorer, and packs without ``resid_norm_p50``, keep their scale (``method`` ``norm``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.eval.harness import PROMPTS_DIR, Client, EvalConfig, EvalError, Prompt, run_samples
from clients.eval.scorers import scorer_for
from clients.eval.summary import feature_summary, strength_key
from steering.packs.manifest import MANIFEST_FILE, NO_EFFECT_TAG, norm_unit, parse_manifest

CALIBRATION_PROMPTS = PROMPTS_DIR / "calibration.jsonl"
EFFECT, WEAK, NONE = "effect", "weak", "none"


@dataclass
class CalibrationConfig:
    """How features are calibrated (sampling is the eval's: :class:`EvalConfig`)."""

    doses: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.5])
    """The dose grid, in norm units (1 = the pack builders' strength 1)."""
    max_ppl_ratio: float = 1.5
    """A dose is fluent while its median perplexity ≤ this × the unsteered one (margin under the
    eval bar's 2×, since held-out prompts differ)."""
    alpha: float = 0.01
    """Paired Wilcoxon p below which a rise of the score counts as a clear effect."""

    def __post_init__(self) -> None:
        if not self.doses or any(not (d > 0 and math.isfinite(d)) for d in self.doses):
            raise EvalError("doses must be positive numbers")
        self.doses = sorted(set(self.doses))
        if not self.max_ppl_ratio > 1:
            raise EvalError("the perplexity budget must be above 1")


def choose(curve: Sequence[dict[str, Any]], cfg: CalibrationConfig) -> dict[str, Any]:
    """The chosen point of a curve (rows ``{dose, diff, p, ppl_ratio}``, ascending dose) and its
    status (see the module docstring)."""
    def clear(r: dict[str, Any]) -> bool:
        return r["diff"] is not None and r["diff"] > 0 and r["p"] is not None and r["p"] < cfg.alpha

    fluent = []
    for r in curve:
        if r["ppl_ratio"] is None or r["ppl_ratio"] > cfg.max_ppl_ratio:
            break
        fluent.append(r)
    point = fluent[-1] if fluent else curve[0]
    status = EFFECT if clear(point) else WEAK if any(clear(r) for r in curve) else NONE
    return {"dose": point["dose"], "fluent": bool(fluent), "status": status}


def feature_curve(feature: str, scorer: str, ecfg: EvalConfig, samples: list, per_dose: dict[float, float]
                  ) -> list[dict[str, Any]]:
    """Dose rows from the eval summary of one feature (``per_dose``: dose → request strength)."""
    rows = feature_summary(feature, scorer, ecfg, samples, seed=ecfg.seed)["strengths"]
    base = rows[strength_key(0.0)]
    out = [{"dose": 0.0, "strength": 0.0, "score": base["score_mean"], "diff": 0.0, "p": None,
            "ppl_ratio": 1.0, "ppl_median": base["ppl_median"], "concept": None, "fluency": None,
            "harmonic": None}]
    for dose, strength in sorted(per_dose.items()):
        r = rows[strength_key(strength)]
        vs = r.get("vs_baseline") or {}
        out.append({"dose": dose, "strength": strength, "score": r["score_mean"], "diff": vs.get("diff"),
                    "p": vs.get("p_wilcoxon"), "ppl_ratio": r["ppl_ratio"], "ppl_median": r["ppl_median"],
                    **{k: r.get(k) for k in ("concept", "fluency", "harmonic")}})
    return out


async def measure(client: Client, pack: dict[str, Any], features: dict[str, str], prompts: list[Prompt],
                  cfg: CalibrationConfig, sampling: dict[str, Any], progress: bool = True
                  ) -> dict[str, list[dict[str, Any]]]:
    """Each feature's curve (dose 0 first), measured through the server; features whose served
    scale differs from the manifest's are refused (the server runs another calibration)."""
    entries = {f["name"]: f for f in pack["features"]}
    groups: dict[tuple[float, ...], dict[str, str]] = {}
    for name, scorer in features.items():
        cal = entries[name]["calibration"]
        served = (await client.feature(f"{pack['name']}/{name}")).get("calibration", {}).get("scale")
        if served is None or not math.isclose(float(served), cal["scale"], rel_tol=1e-6):
            raise EvalError(f"the server's {pack['name']}/{name} has scale {served}, the manifest "
                            f"{cal['scale']}: serve this pack folder (--feature-pack)")
        ratio = norm_unit(cal) / cal["scale"]
        groups.setdefault(tuple(round(d * ratio, 6) for d in cfg.doses), {})[name] = scorer
    curves: dict[str, list[dict[str, Any]]] = {}
    for strengths, group in groups.items():
        qualified = {f"{pack['name']}/{n}": s for n, s in group.items()}
        ecfg = EvalConfig(features=qualified, strengths=[0.0, *strengths], prompts=prompts, mode="add",
                          **sampling)
        _, samples = await run_samples(client, ecfg, progress=progress)
        for (name, scorer), qname in zip(group.items(), qualified):
            curves[name] = feature_curve(qname, scorer, ecfg, samples, dict(zip(cfg.doses, strengths)))
    return curves


def apply(pack: dict[str, Any], curves: dict[str, list[dict[str, Any]]], features: dict[str, str],
          cfg: CalibrationConfig, record: dict[str, Any]) -> dict[str, Any]:
    """The manifest with each measured feature's scale, curve, chosen point and evidence set
    (a new dict; validated by :func:`parse_manifest`)."""
    out = json.loads(json.dumps(pack))
    for f in out["features"]:
        if f["name"] not in curves:
            continue
        cal = f["calibration"]
        u = norm_unit(cal)
        chosen = choose(curves[f["name"]][1:], cfg)
        point = next(r for r in curves[f["name"]] if r["dose"] == chosen["dose"])
        effective = chosen["status"] != NONE
        cal.update(scale=chosen["dose"] * u if effective else u, norm_scale=u,
                   method="effect" if effective else "norm",
                   effect={"scorer": features[f["name"]], "chosen": {**chosen, **point},
                           "curve": curves[f["name"]], "run": record})
        f["evidence"] = {**(f.get("evidence") or {}), "steering": {
            "status": chosen["status"], "scorer": features[f["name"]], "dose": chosen["dose"],
            "diff": point["diff"], "p": point["p"], "ppl_ratio": point["ppl_ratio"],
            "note": {EFFECT: "its scorer rises clearly at strength 1 (calibrated)",
                     WEAK: "its scorer rises clearly only where fluency is lost; strength 1 is the "
                           "largest fluent dose",
                     NONE: "steering showed no measurable effect on this concept"}[chosen["status"]]}}
        f["tags"] = [t for t in f.get("tags", []) if t != NO_EFFECT_TAG] + ([NO_EFFECT_TAG] if not effective else [])
    parse_manifest(out, pack.get("name", "pack"))
    return out


def prompts_record(path: Path, prompts: list[Prompt], cfg: CalibrationConfig, sampling: dict[str, Any],
                   server: dict[str, Any]) -> dict[str, Any]:
    """How a calibration run measured (kept with each feature it calibrated: ``--features`` runs
    of one pack may differ)."""
    return {"method": "effect: strength 1 = the largest fluent dose (see clients/eval/calibrate.py)",
            "prompts": path.name, "prompts_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "n_prompts": len(prompts), "doses": cfg.doses, "max_ppl_ratio": cfg.max_ppl_ratio,
            "alpha": cfg.alpha, "mode": "add", "sampling": sampling, "server": server,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def pack_features(pack: dict[str, Any], only: Sequence[str] | None = None) -> dict[str, str]:
    """Feature → scorer for the features to calibrate (those with a scorer and a norm unit)."""
    out = {}
    for f in pack["features"]:
        if only and f["name"] not in only:
            continue
        sc = scorer_for(f["name"])
        if sc is not None and norm_unit(f["calibration"]) is not None:
            out[f["name"]] = sc.name
        elif only:
            raise EvalError(f"feature {f['name']!r} has no scorer or no norm unit; it keeps its scale")
    if only and (missing := set(only) - {f["name"] for f in pack["features"]}):
        raise EvalError(f"no feature {', '.join(sorted(missing))} in pack {pack['name']!r}")
    return out


def write_manifest(pack_dir: Path, data: dict[str, Any]) -> None:
    tmp = pack_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(pack_dir / MANIFEST_FILE)
