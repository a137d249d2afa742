"""Pure statistics (numpy + scipy), each defined once; used by the server's experiment results and
by the client tools (``steer eval``, ``steer ab run``).

Conventions: inputs are plain sequences of numbers (or mappings prompt → value for the paired
tests); a result that is undefined — too few points, zero variance, a non-finite value — is
``None``, never NaN, so every result is JSON-ready.

* ``finite`` / ``finite_values``: one number or a list of numbers, without None and ±inf/NaN.
* ``mean_ci`` (t-based CI of a mean), ``percentile``, ``per_prompt_means``.
* Two independent groups: ``welch_p`` (scores), ``two_proportion_p`` and ``wilson_ci`` (rates).
* ``srm_check``: chi-square of an observed split against its weights (sample-ratio mismatch).
* Paired by prompt: ``paired_t`` (mean difference, paired t-test) and ``paired_wilcoxon``
  (Wilcoxon signed-rank p, bootstrap CIs, Cohen's d_z, rank-biserial), built on ``wilcoxon_p``,
  ``rank_biserial``, ``cohen_dz`` and ``bootstrap_ci``.
* ``spearman``: rank correlation with its p.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

#: Resamples of a bootstrap CI.
BOOTSTRAP = 4000
#: A sample-ratio mismatch is flagged below this chi-square p.
SRM_ALPHA = 0.001


# --- numbers ------------------------------------------------------------------------------------


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite number, else None (JSON has no NaN or infinity)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def finite_values(xs: Sequence[Any]) -> list[float]:
    """The finite numbers of ``xs`` as floats (None, NaN and ±inf dropped), in order."""
    return [float(x) for x in xs if x is not None and math.isfinite(x)]


# --- one sample ---------------------------------------------------------------------------------


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """(mean, CI low, CI high): the mean with its t-based confidence interval.

    Values are used as given (a NaN makes the mean NaN; filter with ``finite_values`` first when
    that matters). No values: (None, None, None); one value: (mean, None, None).
    """
    n = len(values)
    if n == 0:
        return None, None, None
    a = np.asarray(values, dtype=float)
    mean = float(a.mean())
    if n < 2:
        return mean, None, None
    half = float(sps.t.ppf(0.5 + level / 2, n - 1) * a.std(ddof=1) / math.sqrt(n))
    return mean, finite(mean - half), finite(mean + half)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100, numpy's linear interpolation); None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


def per_prompt_means(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """{prompt: mean of its finite samples}; prompts without a finite sample are dropped."""
    out = {}
    for pid, vals in samples.items():
        v = finite_values(vals)
        if v:
            out[pid] = float(np.mean(v))
    return out


# --- two independent groups ---------------------------------------------------------------------


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p of Welch's t-test (unequal variances); None with fewer than 2 values a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    return finite(sps.ttest_ind(a, b, equal_var=False).pvalue)


def two_proportion_p(good_a: int, n_a: int, good_b: int, n_b: int) -> float | None:
    """Two-sided p of the pooled two-proportion z-test of good_a / n_a vs good_b / n_b."""
    if n_a == 0 or n_b == 0:
        return None
    pooled = (good_a + good_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 1.0 if good_a / n_a == good_b / n_b else None
    z = (good_a / n_a - good_b / n_b) / se
    return float(2 * sps.norm.sf(abs(z)))


def wilson_ci(good: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Wilson score interval of the proportion good / n, clipped to [0, 1]; (None, None) when n = 0."""
    if n == 0:
        return None, None
    z = float(sps.norm.ppf(0.5 + level / 2))
    p = good / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def srm_check(counts: Sequence[int], weights: Sequence[float], alpha: float = SRM_ALPHA) -> dict[str, Any]:
    """Chi-square of observed counts against the split the weights expect:
    ``{"p_value": p or None, "mismatch": p < alpha}`` (no mismatch with < 2 groups or no counts)."""
    total = sum(counts)
    if total == 0 or len(counts) < 2:
        return {"p_value": None, "mismatch": False}
    w = np.asarray(weights, dtype=float)
    expected = total * w / w.sum()
    p = finite(sps.chisquare(np.asarray(counts, dtype=float), expected).pvalue)
    return {"p_value": p, "mismatch": p is not None and p < alpha}


# --- paired differences -------------------------------------------------------------------------


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
    """Mean / sd of paired differences; None with < 2 differences or an infinite effect
    (sd 0, mean ≠ 0), 0.0 when every difference is 0."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return None
    sd = d.std(ddof=1)
    if sd == 0:
        return 0.0 if d.mean() == 0 else None
    return float(d.mean() / sd)


def rows_mean(x: np.ndarray) -> np.ndarray:
    """Mean of each row of an [n, k] array: n values."""
    return x.mean(axis=1)


def rows_dz(x: np.ndarray) -> np.ndarray:
    """Cohen's d_z of each row of an [n, k] array (NaN where the sd is 0, except 0 for an all-zero row)."""
    sd = x.std(axis=1, ddof=1)
    m = x.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(sd > 0, m / np.where(sd > 0, sd, 1.0), np.where(m == 0, 0.0, np.nan))
    return out


def bootstrap_ci(diffs: Sequence[float], stat: Callable[[np.ndarray], np.ndarray] = rows_mean, seed: int = 0,
                 n: int = BOOTSTRAP, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of ``stat`` over ``n`` seeded resamples of the differences.

    ``stat`` maps an [n, k] array of resamples to n values (``rows_mean``: the mean difference;
    ``rows_dz``: Cohen's d_z); non-finite values are dropped. (None, None) with < 2 differences.
    """
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
    return finite(lo), finite(hi)


def paired_wilcoxon(steered: Mapping[str, float], baseline: Mapping[str, float], seed: int = 0) -> dict[str, Any]:
    """Steered vs baseline over the prompts both have (one value per prompt, e.g. per_prompt_means).

    ``{"n", "mean", "baseline_mean", "diff", "diff_ci95", "p_wilcoxon", "cohen_dz", "cohen_dz_ci95",
    "rank_biserial"}``: the mean difference with a bootstrap 95% CI (seed ``seed``), the two-sided
    Wilcoxon signed-rank p, d_z with a bootstrap CI (seed ``seed + 1``) and the matched-pairs
    rank-biserial correlation. No common prompt: ``{"n": 0}``.
    """
    common = sorted(set(steered) & set(baseline))
    d = np.asarray([steered[p] - baseline[p] for p in common], dtype=float)
    if len(d) == 0:
        return {"n": 0}
    dlo, dhi = bootstrap_ci(d, rows_mean, seed)
    zlo, zhi = bootstrap_ci(d, rows_dz, seed + 1)
    return {
        "n": len(common),
        "mean": finite(np.mean([steered[p] for p in common])),
        "baseline_mean": finite(np.mean([baseline[p] for p in common])),
        "diff": finite(d.mean()), "diff_ci95": [dlo, dhi],
        "p_wilcoxon": finite(wilcoxon_p(d)),
        "cohen_dz": finite(cohen_dz(d)), "cohen_dz_ci95": [zlo, zhi],
        "rank_biserial": finite(rank_biserial(d)),
    }


def paired_t(variant: Mapping[str, Sequence[float]], control: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Variant vs control over the prompts both have, each side a list of samples per prompt.

    ``{"diff", "p_value"}``: the mean over prompts of (variant mean − control mean) and the paired
    t-test p over the per-prompt means (None with < 2 prompts or when undefined, e.g. all
    differences equal). Samples are used as given — plain ``sum / len``, no finite filtering —
    unlike ``per_prompt_means`` (``steer ab run``'s numbers stay what they were).
    """
    keys = sorted(set(variant) & set(control))
    diffs = [sum(variant[k]) / len(variant[k]) - sum(control[k]) / len(control[k]) for k in keys]
    if not diffs:
        return {"diff": None, "p_value": None}
    p = None
    if len(diffs) >= 2:
        a = [sum(variant[k]) / len(variant[k]) for k in keys]
        b = [sum(control[k]) / len(control[k]) for k in keys]
        with warnings.catch_warnings():  # all-equal differences: scipy warns, p is nan or 0
            warnings.simplefilter("ignore")
            p = float(sps.ttest_rel(a, b).pvalue)
        p = p if math.isfinite(p) else None
    return {"diff": sum(diffs) / len(diffs), "p_value": p}


# --- correlation --------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
    """``{"rho", "p"}``: Spearman ρ and its p (both None when a side is constant or < 3 points)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"rho": None, "p": None}
    res = sps.spearmanr(x, y)
    return {"rho": finite(res.statistic), "p": finite(res.pvalue)}
