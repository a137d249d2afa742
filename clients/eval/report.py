"""Write an evaluation: ``eval.json`` (everything), ``eval.md`` (the table) and ``<feature>.png``
(dose-response: score and perplexity vs strength)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
            return f"{x:.1e}"
        return f"{x:.{digits}g}"
    return str(x)


def _ci(pair: list[Any] | None) -> str:
    if not pair or pair[0] is None:
        return ""
    return f" [{_f(pair[0], 2)}, {_f(pair[1], 2)}]"


def _fluent(m: dict[str, Any] | None) -> str:
    if not m:
        return "–"
    return f"{m['strength']:g} ({_f(m.get('diff'))}, p {_f(m.get('p_wilcoxon'), 2)})"


def _unit(cal: dict[str, Any] | None) -> str:
    """Strength 1 of the run in norm units: ``0.75 (effect)``; ``1 (norm)``."""
    return "–" if not cal else f"{_f(cal['dose'], 2)} ({cal['method']})"


def safe_name(feature: str) -> str:
    """A file name for a feature (``pack/L12:5`` → ``pack_L12_5``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", feature)


def markdown(result: dict[str, Any], png_prefix: str = "") -> str:
    """The results table (one row per feature) and a per-strength table of score means."""
    cfg = result["config"]
    strengths = [float(s) for s in cfg["strengths"]]
    feats = result["features"]
    lines = [
        "| feature | layer | 1 = (norm units) | scorer (unit) | Δ at 1 [95% CI] | p (Wilcoxon) | d_z at 1 [95% CI] | ρ over doses "
        "| ρ over samples | ppl ×, at 1 | rep. at 0 → 1 | bar | fluent up to (Δ, p) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in feats.items():
        st = f["strengths"]
        one, zero = st.get("1", {}), st.get("0", {})
        vs = one.get("vs_baseline") or {}
        bar = f["bar"]
        failed = [k for k, v in bar.items() if k != "pass" and v is False]
        verdict = "**pass**" if bar["pass"] else ("weak: " + ", ".join(failed) if failed else "–")
        lines.append(
            f"| {name} | {_f(f.get('layer'))} | {_unit(f.get('calibration'))} | {f['scorer']} ({f['unit']}) | {_f(vs.get('diff'))}{_ci(vs.get('diff_ci95'))} "
            f"| {_f(vs.get('p_wilcoxon'), 2)} | {_f(vs.get('cohen_dz'), 2)}{_ci(vs.get('cohen_dz_ci95'))} "
            f"| {_f(f['spearman']['over_means']['rho'], 2)} | {_f(f['spearman']['over_samples']['rho'], 2)} "
            f"| {_f(one.get('ppl_ratio'), 2)} | {_f(zero.get('repetition_mean'), 2)} → {_f(one.get('repetition_mean'), 2)} "
            f"| {verdict} | {_fluent(f.get('max_fluent'))} |")
    lines += ["", "Score mean per strength (and median perplexity under the unsteered model):", "",
              "| feature | " + " | ".join(f"{s:g}" for s in strengths) + " |",
              "| --- | " + " | ".join("---" for _ in strengths) + " |"]
    for name, f in feats.items():
        cells = []
        for s in strengths:
            row = f["strengths"].get(f"{s:g}", {})
            cells.append(f"{_f(row.get('score_mean'))} (ppl {_f(row.get('ppl_median'), 3)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += prompting_table(feats)
    if png_prefix is not None:
        lines += ["", "Dose-response plots: " + ", ".join(
            f"[{n}]({png_prefix}{safe_name(n)}.png)" for n in feats)]
    return "\n".join(lines) + "\n"


def prompting_table(feats: dict[str, Any]) -> list[str]:
    """Steering vs prompting vs both (``--baseline prompt``): per feature and condition the score's
    Δ vs unsteered (p), the perplexity ratio, and concept / fluency / harmonic mean; [] without it."""
    rows = {name: f["prompting"] for name, f in feats.items() if f.get("prompting")}
    if not rows:
        return []
    strength = next(iter(rows.values()))["strength"]
    lines = ["", f"Steering (strength {strength:g}) vs prompting (a system message asking for the concept) "
             "vs both — concept: share of prompts whose score rose; fluency: share of outputs within 2× "
             "the unsteered perplexity; H: their harmonic mean:", "",
             "| feature | condition | Δ score (p) | ppl × | concept | fluency | H |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, cmp in rows.items():
        for cond, c in cmp["conditions"].items():
            vs = c.get("vs_baseline") or {}
            best = " **best**" if cmp.get("best") == cond else ""
            lines.append(f"| {name} | {cond}{best} | {_f(vs.get('diff'))} ({_f(vs.get('p_wilcoxon'), 2)}) "
                         f"| {_f(c.get('ppl_ratio'), 2)} | {_f(c.get('concept'), 2)} | {_f(c.get('fluency'), 2)} "
                         f"| {_f(c.get('harmonic'), 2)} |")
    return lines


def plot(feature: dict[str, Any], path: Path) -> None:
    """Two panels: score mean ± 95% CI vs strength; perplexity median (IQR) vs strength, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(feature["strengths"].values(), key=lambda r: r["strength"])
    xs = [r["strength"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(7.5, 2.8), dpi=80)
    m = [r["score_mean"] for r in rows]
    lo = [r["score_ci95"][0] if r["score_ci95"][0] is not None else r["score_mean"] for r in rows]
    hi = [r["score_ci95"][1] if r["score_ci95"][1] is not None else r["score_mean"] for r in rows]
    a.fill_between(xs, lo, hi, alpha=0.25, color="tab:blue", linewidth=0)
    a.plot(xs, m, "o-", color="tab:blue")
    a.axvline(0, color="grey", linewidth=0.6)
    a.set_xlabel("strength")
    a.set_ylabel(f"{feature['scorer']} ({feature['unit']})", fontsize=8)
    a.set_title(f"{feature['feature']}: score (mean, 95% CI)", fontsize=9)
    med = [r["ppl_median"] for r in rows]
    if any(v is not None for v in med):
        pts = [(x, r) for x, r in zip(xs, rows) if r["ppl_median"] is not None]
        px = [x for x, _ in pts]
        b.fill_between(px, [r["ppl_q25"] for _, r in pts], [r["ppl_q75"] for _, r in pts], alpha=0.25,
                       color="tab:red", linewidth=0)
        b.plot(px, [r["ppl_median"] for _, r in pts], "o-", color="tab:red")
        b.set_yscale("log")
        base = next((r["ppl_median"] for r in rows if r["strength"] == 0), None)
        if base:
            b.axhline(2 * base, color="grey", linestyle="--", linewidth=0.8, label="2× baseline")
            b.legend(fontsize=7, loc="upper left")
    b.axvline(0, color="grey", linewidth=0.6)
    b.set_xlabel("strength")
    b.set_ylabel("perplexity (unsteered model)", fontsize=8)
    b.set_title("perplexity (median, IQR)", fontsize=9)
    for ax in (a, b):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write eval.json, eval.md and one PNG per feature into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "md": out / "eval.md"}
    paths["json"].write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(result), encoding="utf-8")
    for name, f in result["features"].items():
        p = out / f"{safe_name(name)}.png"
        plot(f, p)
        paths[name] = p
    return paths
