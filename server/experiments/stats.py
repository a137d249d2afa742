"""Per-variant results of an experiment and the comparisons against its control.

* score: mean with a t-based 95% CI; difference vs control with Welch's t-test.
* labels: good-rate (good / labelled); difference vs control with a two-proportion z-test.
* generated tokens and latency: p50 / p95.
* sample-ratio mismatch: chi-square of the observed split against the weights; warns at p < 0.001.

Only exposures whose outcome is ``ok`` are measured (``n`` and everything above). Those that
failed, were aborted by their client or were excluded (an admin overrode the variant's steering)
are counted per variant under ``outcomes``; the sample-ratio check counts every assignment.

The statistics themselves live in :mod:`server.stats`.
"""

from __future__ import annotations

from typing import Any

from server.stats import SRM_ALPHA, mean_ci, percentile, srm_check, two_proportion_p, welch_p

UNSCORED = ("failed", "aborted", "excluded")
"""Exposure outcomes counted per variant but never measured."""


def _variant_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's numbers from its observations (``_scores`` is internal: for the Welch test)."""
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
        "generated_tokens": {"p50": percentile(tokens, 50), "p95": percentile(tokens, 95)},
        "latency_s": {"p50": percentile(latency, 50), "p95": percentile(latency, 95)},
        "_scores": scores,
    }


def _vs_control(s: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """Differences of variant summary ``s`` against the control's ``c``, with their p-values."""
    ds = (s["score"]["mean"] - c["score"]["mean"]
          if s["score"]["mean"] is not None and c["score"]["mean"] is not None else None)
    gs, gc = s["labels"]["good_rate"], c["labels"]["good_rate"]
    return {
        "score_diff": ds,
        "score_p_value": welch_p(s["_scores"], c["_scores"]),
        "good_rate_diff": gs - gc if gs is not None and gc is not None else None,
        "good_rate_p_value": two_proportion_p(s["labels"]["good"], s["labels"]["n"],
                                              c["labels"]["good"], c["labels"]["n"]),
    }


def results(experiment: dict[str, Any], observations: list[dict[str, Any]]) -> dict[str, Any]:
    """The results body for ``experiment`` (its spec) from the store's observations."""
    variants = experiment["variants"]
    by: dict[str, list[dict[str, Any]]] = {v["name"]: [] for v in variants}
    others: dict[str, dict[str, int]] = {v["name"]: dict.fromkeys(UNSCORED, 0) for v in variants}
    for o in observations:
        if o["variant"] not in by:
            continue
        outcome = o.get("outcome") or "ok"
        if outcome == "ok":
            by[o["variant"]].append(o)
        else:
            counts = others[o["variant"]]
            counts[outcome] = counts.get(outcome, 0) + 1
    control = next(v["name"] for v in variants if v.get("control"))
    sums = {name: _variant_summary(rows) for name, rows in by.items()}
    out_variants = []
    for v in variants:
        s = sums[v["name"]]
        item = {"name": v["name"], "control": bool(v.get("control")), "weight": v["weight"],
                **{k: val for k, val in s.items() if not k.startswith("_")},
                "outcomes": others[v["name"]]}
        if v["name"] != control:
            item["vs_control"] = _vs_control(s, sums[control])
        out_variants.append(item)
    assigned = [sums[v["name"]]["n"] + sum(others[v["name"]].values()) for v in variants]
    srm = srm_check(assigned, [v["weight"] for v in variants])
    warnings = []
    if srm["mismatch"]:
        warnings.append(f"sample ratio mismatch: the observed split departs from the weights "
                        f"(chi-square p = {srm['p_value']:.2g} < {SRM_ALPHA})")
    return {"object": "experiment.results", "experiment": experiment["name"],
            "status": experiment.get("status"), "control": control,
            "n": sum(s["n"] for s in sums.values()), "variants": out_variants,
            "sample_ratio": srm, "warnings": warnings}
