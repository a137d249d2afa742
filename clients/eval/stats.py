"""Statistics of a dose-response evaluation (scipy): paired tests, effect sizes, rank correlations.

Scores arrive as ``{strength: {prompt_id: [score per sample]}}``; samples of one prompt are
averaged first, so every test is paired by prompt (the unit that is the same at every strength).

* ``paired``: steered vs baseline per prompt — Wilcoxon signed-rank p (two-sided), the mean
  difference with a bootstrap 95% CI, Cohen's d_z (mean / sd of the differences) with a bootstrap
  CI, and the matched-pairs rank-biserial correlation.
* ``dose_response``: Spearman ρ of strength vs score, over the per-strength means (the dose-response
  curve) and over all samples.
* ``passes_bar``: the issue's bar for a feature (direction at strength 1 vs 0 with p < 0.01,
  ρ over doses > 0.8, median perplexity at strength 1 ≤ 2× the baseline's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

BOOTSTRAP = 4000
ALPHA = 0.01
RHO_MIN = 0.8
PPL_RATIO_MAX = 2.0


def _num(x: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def per_prompt_means(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """{prompt: mean over its samples} (prompts with no finite sample are dropped)."""
    out = {}
    for pid, vals in samples.items():
        v = [x for x in vals if x is not None and math.isfinite(x)]
        if v:
            out[pid] = float(np.mean(v))
    return out


def wilcoxon_p(diffs: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences; 1.0 when every difference is 0."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0 or not np.any(d != 0):
        return 1.0
    return float(sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def rank_biserial(diffs: Sequence[float]) -> float:
    """Matched-pairs rank-biserial correlation in [-1, 1]: (R+ − R−) / (R+ + R−) over non-zero diffs."""
    d = np.asarray(diffs, dtype=float)
    d = d[d != 0]
    if len(d) == 0:
        return 0.0
    ranks = sps.rankdata(np.abs(d))
    pos, neg = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((pos - neg) / (pos + neg))


def cohen_dz(diffs: Sequence[float]) -> float | None:
    """Mean / sd of paired differences (None when sd is 0 and the mean is 0; ±inf is reported as None)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return None
    sd = d.std(ddof=1)
    if sd == 0:
        return 0.0 if d.mean() == 0 else None
    return float(d.mean() / sd)


def _rows_mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=1)


def _rows_dz(x: np.ndarray) -> np.ndarray:
    """Cohen's d_z per row (NaN where the sd is 0, except 0 where the row is all zeros)."""
    sd = x.std(axis=1, ddof=1)
    m = x.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(sd > 0, m / np.where(sd > 0, sd, 1.0), np.where(m == 0, 0.0, np.nan))
    return out


def bootstrap_ci(diffs: Sequence[float], stat=_rows_mean, seed: int = 0, n: int = BOOTSTRAP,
                 level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI over resampled prompts (seeded); ``stat`` maps an [n, k] array of
    resamples to n values (row means by default; ``_rows_dz`` for Cohen's d_z)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n, len(d)))
    vals = np.asarray(stat(d[idx]), dtype=float)
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return None, None
    lo, hi = np.percentile(vals, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return _num(lo), _num(hi)


def paired(steered: Mapping[str, float], baseline: Mapping[str, float], seed: int = 0) -> dict[str, Any]:
    """Steered vs baseline over the prompts both have: n, means, Δ with CI, p, d_z with CI, r_rb."""
    common = sorted(set(steered) & set(baseline))
    d = np.asarray([steered[p] - baseline[p] for p in common], dtype=float)
    if len(d) == 0:
        return {"n": 0}
    dlo, dhi = bootstrap_ci(d, _rows_mean, seed)
    zlo, zhi = bootstrap_ci(d, _rows_dz, seed + 1)
    return {
        "n": len(common),
        "mean": _num(np.mean([steered[p] for p in common])),
        "baseline_mean": _num(np.mean([baseline[p] for p in common])),
        "diff": _num(d.mean()), "diff_ci95": [dlo, dhi],
        "p_wilcoxon": _num(wilcoxon_p(d)),
        "cohen_dz": _num(cohen_dz(d)), "cohen_dz_ci95": [zlo, zhi],
        "rank_biserial": _num(rank_biserial(d)),
    }


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
    """Spearman ρ and its p (None when a side is constant or there are < 3 points)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"rho": None, "p": None}
    res = sps.spearmanr(x, y)
    return {"rho": _num(res.statistic), "p": _num(res.pvalue)}


def dose_response(scores: Mapping[float, Mapping[str, Sequence[float]]]) -> dict[str, Any]:
    """Spearman ρ of strength vs score: over per-strength means (``over_means``) and all samples."""
    strengths = sorted(scores)
    means = []
    for s in strengths:
        vals = [v for vs in scores[s].values() for v in vs if v is not None and math.isfinite(v)]
        means.append(float(np.mean(vals)) if vals else float("nan"))
    xs, ys = [], []
    for s in strengths:
        for vs in scores[s].values():
            for v in vs:
                if v is not None and math.isfinite(v):
                    xs.append(s)
                    ys.append(v)
    ok = [(s, m) for s, m in zip(strengths, means) if math.isfinite(m)]
    return {
        "over_means": spearman([s for s, _ in ok], [m for _, m in ok]),
        "over_samples": spearman(xs, ys),
    }


def passes_bar(at_one: Mapping[str, Any] | None, rho_means: float | None,
               ppl_ratio_at_one: float | None) -> dict[str, Any]:
    """The issue's bar: Δ > 0 at strength 1 vs 0 with Wilcoxon p < 0.01, ρ over doses > 0.8,
    median perplexity at strength 1 ≤ 2 × baseline. Each check is True, False or None (not run)."""
    direction = None
    if at_one and at_one.get("n"):
        p, diff = at_one.get("p_wilcoxon"), at_one.get("diff")
        direction = bool(diff is not None and diff > 0 and p is not None and p < ALPHA)
    rho = None if rho_means is None else bool(rho_means > RHO_MIN)
    ppl = None if ppl_ratio_at_one is None else bool(ppl_ratio_at_one <= PPL_RATIO_MAX)
    checks = {"direction_p<0.01": direction, "spearman>0.8": rho, "ppl_ratio<=2": ppl}
    return {**checks, "pass": all(v is True for v in checks.values())}
