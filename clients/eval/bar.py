"""The eval's verdict on a feature: its dose-response and the bar it must clear.

Scores arrive as ``{strength: {prompt_id: [score per sample]}}``. The statistics themselves
(Spearman, the paired Wilcoxon test, bootstrap CIs) live in :mod:`server.stats`.

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

from server.stats import spearman

ALPHA = 0.01  # Wilcoxon p of the direction check
RHO_MIN = 0.8  # Spearman ρ over the per-strength means must exceed this
PPL_RATIO_MAX = 2.0  # median perplexity at strength 1 / the baseline's, at most


def dose_response(scores: Mapping[float, Mapping[str, Sequence[float]]]) -> dict[str, Any]:
    """Spearman ρ of strength vs score: over per-strength means (``over_means``) and all samples
    (``over_samples``); each ``{"rho", "p"}``. Non-finite scores are left out."""
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
    median perplexity at strength 1 ≤ 2 × baseline. Each check is True, False or None (not run);
    ``pass`` only when all three are True. ``at_one`` is :func:`server.stats.paired_wilcoxon`'s dict."""
    direction = None
    if at_one and at_one.get("n"):
        p, diff = at_one.get("p_wilcoxon"), at_one.get("diff")
        direction = bool(diff is not None and diff > 0 and p is not None and p < ALPHA)
    rho = None if rho_means is None else bool(rho_means > RHO_MIN)
    ppl = None if ppl_ratio_at_one is None else bool(ppl_ratio_at_one <= PPL_RATIO_MAX)
    checks = {"direction_p<0.01": direction, "spearman>0.8": rho, "ppl_ratio<=2": ppl}
    return {**checks, "pass": all(v is True for v in checks.values())}
