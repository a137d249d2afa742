"""From scored samples to per-feature results: per-strength means, paired tests, ρ, perplexity, the bar.

Samples of one prompt are averaged first, so every test is paired by prompt (the unit that is the
same at every strength). The statistics are :mod:`server.stats`; the bar is :mod:`clients.eval.bar`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clients.eval.bar import PPL_RATIO_MAX, dose_response, passes_bar
from clients.eval.harness import PROMPT, STEER, EvalConfig, Sample
from clients.eval.prompting import compare_with_prompting, tradeoff
from clients.eval.scorers import SCORERS
from server.stats import finite_values, mean_ci, paired_wilcoxon, per_prompt_means, percentile
from steering.packs.manifest import norm_unit

# Perplexities and scores may be None or NaN (a failed perplexity request, an empty output). The
# eval drops them before a mean, CI or percentile, as its former private twins (_fin, _mean_ci, _q)
# did inside; server.stats.mean_ci / percentile take values as given, which is what the
# experiment results and ``steer ab run`` relied on.


def _q(vals: list[float | None], q: float) -> float | None:
    """The ``q``-th percentile of the finite values (None when there is none)."""
    return percentile(finite_values(vals), q)


def strength_key(s: float) -> str:
    """A strength as a JSON key: ``-1``, ``-0.5``, ``0``, ``2``."""
    return f"{s:g}"


def feature_summary(feature: str, scorer: str, cfg: EvalConfig, samples: list[Sample],
                    seed: int = 0) -> dict[str, Any]:
    """Results of one feature: per strength the score, perplexity and repetition; vs strength 0
    the paired statistics and the AxBench-style concept / fluency / harmonic mean
    (:func:`clients.eval.prompting.tradeoff`); over strengths the Spearman ρ; the pass/fail of the bar; and
    ``max_fluent``, the largest positive strength whose median perplexity stays ≤ 2× the baseline's
    (with its Δ and p): the dose to use when strength 1 is too strong."""
    budget = cfg.max_tokens_for(feature)
    mine = [s for s in samples if s.condition == STEER
            and (s.feature == feature or (s.feature is None and s.max_tokens == budget))]
    by_s: dict[float, dict[str, list[float]]] = {}
    ppl: dict[float, list[float]] = {}
    rep: dict[float, list[float]] = {}
    toks: dict[float, list[float]] = {}
    capped: dict[float, list[float]] = {}
    examples: dict[str, str] = {}
    first_prompt = cfg.prompts[0].id if cfg.prompts else None
    for s in mine:
        by_s.setdefault(s.strength, {}).setdefault(s.prompt_id, []).append(s.scores[scorer])
        ppl.setdefault(s.strength, []).append(s.perplexity)
        rep.setdefault(s.strength, []).append(s.scores["repetition"])
        toks.setdefault(s.strength, []).append(s.tokens)
        capped.setdefault(s.strength, []).append(1.0 if s.finish_reason == "length" else 0.0)
        if s.prompt_id == first_prompt and s.index == 0:
            examples[strength_key(s.strength)] = s.text
    base = per_prompt_means(by_s.get(0.0, {}))
    base_ppl = _q(ppl.get(0.0, []), 50)
    per_strength: dict[str, Any] = {}
    for st in sorted(by_s):
        pm = per_prompt_means(by_s[st])
        mean, lo, hi = mean_ci(finite_values(pm.values()))
        med = _q(ppl[st], 50)
        row = {
            "strength": st, "n_prompts": len(pm), "n_samples": sum(len(v) for v in by_s[st].values()),
            "score_mean": mean, "score_ci95": [lo, hi],
            "ppl_median": med, "ppl_q25": _q(ppl[st], 25), "ppl_q75": _q(ppl[st], 75),
            "ppl_ratio": (med / base_ppl) if (med is not None and base_ppl) else None,
            "repetition_mean": float(np.mean(rep[st])), "tokens_mean": float(np.mean(toks[st])),
            "capped_share": float(np.mean(capped[st])),
        }
        if st != 0 and base:
            row["vs_baseline"] = paired_wilcoxon(pm, base, seed=seed)
            row.update(tradeoff(pm, base, finite_values(ppl[st]), base_ppl))
        per_strength[strength_key(st)] = row
    fluent = [r for r in per_strength.values() if r["strength"] > 0 and r["ppl_ratio"] is not None
              and r["ppl_ratio"] <= PPL_RATIO_MAX]
    top = max(fluent, key=lambda r: r["strength"]) if fluent else None
    max_fluent = None if top is None else {
        "strength": top["strength"], "ppl_ratio": top["ppl_ratio"],
        "diff": (top.get("vs_baseline") or {}).get("diff"),
        "p_wilcoxon": (top.get("vs_baseline") or {}).get("p_wilcoxon")}
    dr = dose_response(by_s)
    at_one = per_strength.get("1", {})
    bar = passes_bar(at_one.get("vs_baseline"), dr["over_means"]["rho"], at_one.get("ppl_ratio"))
    sc = SCORERS[scorer]
    return {"feature": feature, "scorer": scorer, "max_tokens": budget, "unit": sc.unit, "scorer_description": sc.description,
            "strengths": per_strength, "spearman": dr, "bar": bar, "max_fluent": max_fluent,
            "examples": examples}


def strength_unit(cal: dict[str, Any]) -> dict[str, Any]:
    """What strength 1 was in this run: the feature's scale, its method (``effect``: set by ``steer
    pack calibrate``; ``norm``/None: the norm unit) and the dose in norm units (1 for the norm unit)."""
    scale, unit = cal.get("scale"), norm_unit(cal)
    return {"scale": scale, "method": cal.get("method") or "norm",
            "dose": (scale / unit) if (scale and unit) else 1.0}


def summarize_features(cfg: EvalConfig, samples: list[Sample], feature_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every feature's summary, keyed by feature name (with its catalog layer/mode/pack)."""
    out = {}
    for feature, scorer in cfg.features.items():
        summ = feature_summary(feature, scorer, cfg, samples, seed=cfg.seed)
        info = feature_info.get(feature) or {}
        summ["layer"] = info.get("layer")
        summ["pack"] = info.get("pack")
        summ["tags"] = list(info.get("tags") or [])
        summ["mode"] = cfg.mode or info.get("default_mode", "add")
        summ["calibration"] = strength_unit(info.get("calibration") or {})
        if cfg.baseline == PROMPT:
            summ["prompting"] = compare_with_prompting(feature, scorer, cfg, samples, seed=cfg.seed)
        out[feature] = summ
    return out
