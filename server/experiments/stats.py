"""Per-variant results of an experiment and the comparisons against its control.

* score: mean with a t-based 95% CI; difference vs control with Welch's t-test.
* labels: good-rate (good / labelled); difference vs control with a two-proportion z-test.
* generated tokens and latency: p50 / p95.
* sample-ratio mismatch: chi-square of the observed split against the weights; warns at p < 0.001.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

SRM_ALPHA = 0.001


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """Mean and its t-based confidence interval (None where undefined)."""
    n = len(values)
    if n == 0:
        return None, None, None
    a = np.asarray(values, dtype=float)
    mean = float(a.mean())
    if n < 2:
        return mean, None, None
    half = float(sps.t.ppf(0.5 + level / 2, n - 1) * a.std(ddof=1) / math.sqrt(n))
    return mean, _num(mean - half), _num(mean + half)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 2 or len(b) < 2:
        return None
    return _num(sps.ttest_ind(a, b, equal_var=False).pvalue)


def two_proportion_p(good_a: int, n_a: int, good_b: int, n_b: int) -> float | None:
    """Two-sided pooled two-proportion z-test."""
    if n_a == 0 or n_b == 0:
        return None
    pooled = (good_a + good_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 1.0 if good_a / n_a == good_b / n_b else None
    z = (good_a / n_a - good_b / n_b) / se
    return float(2 * sps.norm.sf(abs(z)))


def wilson_ci(good: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Wilson score interval of the proportion good / n (None, None when n = 0)."""
    if n == 0:
        return None, None
    z = float(sps.norm.ppf(0.5 + level / 2))
    p = good / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def srm_check(counts: Sequence[int], weights: Sequence[float]) -> dict[str, Any]:
    """Chi-square of observed counts against the weights' expected split."""
    total = sum(counts)
    if total == 0 or len(counts) < 2:
        return {"p_value": None, "mismatch": False}
    w = np.asarray(weights, dtype=float)
    expected = total * w / w.sum()
    p = _num(sps.chisquare(np.asarray(counts, dtype=float), expected).pvalue)
    return {"p_value": p, "mismatch": p is not None and p < SRM_ALPHA}


def results(experiment: dict[str, Any], observations: list[dict[str, Any]]) -> dict[str, Any]:
    """The results body for ``experiment`` (its spec) from the store's observations."""
    variants = experiment["variants"]
    by: dict[str, list[dict[str, Any]]] = {v["name"]: [] for v in variants}
    for o in observations:
        if o["variant"] in by:
            by[o["variant"]].append(o)
    control = next(v["name"] for v in variants if v.get("control"))

    def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        scores = [float(r["score"]) for r in rows if r["score"] is not None]
        labels = [r["label"] for r in rows if r["label"] is not None]
        good = sum(1 for x in labels if x == "good")
        tokens = [float(r["generated_tokens"]) for r in rows]
        latency = [float(r["latency_s"]) for r in rows]
        mean, lo, hi = mean_ci(scores)
        return {
            "n": len(rows),
            "feedback": sum(1 for r in rows if r["score"] is not None or r["label"] is not None),
            "score": {"n": len(scores), "mean": mean, "ci95": [lo, hi]},
            "labels": {"n": len(labels), "good": good,
                       "good_rate": good / len(labels) if labels else None},
            "generated_tokens": {"p50": _pct(tokens, 50), "p95": _pct(tokens, 95)},
            "latency_s": {"p50": _pct(latency, 50), "p95": _pct(latency, 95)},
            "_scores": scores,
        }

    sums = {name: summary(rows) for name, rows in by.items()}
    c = sums[control]
    out_variants = []
    for v in variants:
        s = sums[v["name"]]
        item = {"name": v["name"], "control": bool(v.get("control")), "weight": v["weight"],
                **{k: val for k, val in s.items() if not k.startswith("_")}}
        if v["name"] != control:
            ds = (s["score"]["mean"] - c["score"]["mean"]
                  if s["score"]["mean"] is not None and c["score"]["mean"] is not None else None)
            gs, gc = s["labels"]["good_rate"], c["labels"]["good_rate"]
            item["vs_control"] = {
                "score_diff": ds,
                "score_p_value": welch_p(s["_scores"], c["_scores"]),
                "good_rate_diff": gs - gc if gs is not None and gc is not None else None,
                "good_rate_p_value": two_proportion_p(s["labels"]["good"], s["labels"]["n"],
                                                      c["labels"]["good"], c["labels"]["n"]),
            }
        out_variants.append(item)
    srm = srm_check([sums[v["name"]]["n"] for v in variants], [v["weight"] for v in variants])
    warnings = []
    if srm["mismatch"]:
        warnings.append(f"sample ratio mismatch: the observed split departs from the weights "
                        f"(chi-square p = {srm['p_value']:.2g} < {SRM_ALPHA})")
    return {"object": "experiment.results", "experiment": experiment["name"],
            "status": experiment.get("status"), "control": control,
            "n": sum(s["n"] for s in sums.values()), "variants": out_variants,
            "sample_ratio": srm, "warnings": warnings}
