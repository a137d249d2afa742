"""``steer ab results NAME --plot out.png``: per-variant means with 95% CIs as a PNG.

Left panel: the mean feedback score of each variant with its t-based 95% CI (from the results
body). Right panel: the good-rate (good / labelled) with a Wilson 95% CI. The control is drawn in
grey, n is written under each variant; a variant without data says so instead of a bar.
Uses matplotlib's object API (no pyplot, no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.stats import wilson_ci

CONTROL_COLOR, VARIANT_COLOR = "#8c8c8c", "#1f77b4"


Point = tuple[float | None, float | None, float | None]  # mean, CI low, CI high


def _panel(ax: Any, names: list[str], controls: list[bool], points: list[Point], counts: list[int],
           title: str, ylabel: str) -> None:
    for i, ((mean, lo, hi), control) in enumerate(zip(points, controls)):
        color = CONTROL_COLOR if control else VARIANT_COLOR
        if mean is None:
            ax.text(i, 0.5, "no data", ha="center", va="center", transform=ax.get_xaxis_transform(),
                    color="#999999", fontsize=9)
            continue
        ax.bar(i, mean, color=color, alpha=0.35, width=0.6)
        if lo is not None and hi is not None:
            ax.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", color=color, capsize=6,
                        elinewidth=2, markersize=6)
        else:
            ax.plot(i, mean, "o", color=color, markersize=6)
    ax.set_xticks(range(len(names)),
                  [f"{n}{' (control)' if c and n != 'control' else ''}\nn = {k}"
                   for n, c, k in zip(names, controls, counts)], fontsize=9)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)


def plot_results(res: dict[str, Any], path: str | Path) -> Path:
    """Write the results body ``res`` (``GET /v1/experiments/{name}/results``) as a PNG."""
    from matplotlib.figure import Figure

    variants = res["variants"]
    names = [v["name"] for v in variants]
    controls = [bool(v.get("control")) for v in variants]
    scores = [(v["score"]["mean"], *v["score"]["ci95"]) for v in variants]
    rates = []
    for v in variants:
        lab = v["labels"]
        lo, hi = wilson_ci(lab["good"], lab["n"])
        rates.append((lab["good_rate"], lo, hi))
    fig = Figure(figsize=(max(6.0, 2.2 * len(variants) + 2), 4.2), dpi=110, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    _panel(ax1, names, controls, scores, [v["score"]["n"] for v in variants],
           "mean score (95% CI)", "score")
    _panel(ax2, names, controls, rates, [v["labels"]["n"] for v in variants],
           "good-rate (95% Wilson CI)", "good / labelled")
    ax2.set_ylim(0, 1.05)
    fig.suptitle(f"experiment {res['experiment']} ({res.get('status')}), n = {res['n']}", fontsize=12)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
