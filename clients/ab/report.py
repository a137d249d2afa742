"""The self-contained HTML of an offline A/B run (inline CSS, no script, no external resource).

Top: the run's settings and a summary table — one row per scorer, one column per variant with
the mean and its 95% CI, and for non-control variants the paired difference against the control
and its p-value. Below: one row per prompt, one column per variant, each cell the output text and
its scores.
"""

from __future__ import annotations

import html
import json
from typing import Any

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { border: 1px solid #ddd; padding: 6px 8px; vertical-align: top; text-align: left; }
th { background: #f5f5f5; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.summary th:first-child, .summary td:first-child { width: 16%; }
.side th:first-child, .side td:first-child { width: 18%; }
.out { white-space: pre-wrap; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px; }
.scores { color: #555; font-size: 11.5px; margin-top: 6px; }
.control { background: #fafafa; }
.meta { color: #555; }
.sig { color: #b00; font-weight: 600; }
code { font-size: 12px; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _variant_head(v: dict[str, Any]) -> str:
    tag = " (control)" if v["control"] and v["name"] != "control" else ""
    how = f"preset {v['preset']}" if v.get("preset") else (
        json.dumps(v["steering"], sort_keys=True) if v.get("steering") else "unsteered")
    return (f'<th class="variant" data-variant="{_e(v["name"])}">{_e(v["name"])}{tag}'
            f'<div class="meta"><code>{_e(how)}</code></div></th>')


def _summary(report: dict[str, Any]) -> str:
    variants = report["variants"]
    head = "".join(_variant_head(v) for v in variants)
    rows = [f"<tr><th>scorer</th>{head}</tr>"]
    for s in report["scorers"]:
        cells = []
        for v in variants:
            sc = v["scores"][s["name"]]
            lo, hi = sc["ci95"]
            text = f"{_num(sc['mean'])}"
            if lo is not None:
                text += f" <span class=meta>[{_num(lo)}, {_num(hi)}]</span>"
            vs = sc.get("vs_control")
            if vs and vs["diff"] is not None:
                p = vs["p_value"]
                cls = ' class="sig"' if p is not None and p < 0.05 else ""
                text += f"<br><span{cls}>Δ {vs['diff']:+.3g} (p = {_num(p, 2)})</span>"
            cells.append(f'<td class="num">{text}</td>')
        rows.append(f'<tr><td title="{_e(s["description"])}">{_e(s["name"])}'
                    f'<div class="meta">{_e(s["unit"])}</div></td>{"".join(cells)}</tr>')
    n_row = "".join(f'<td class="num">{v["n"]} outputs, {_num(v["mean_tokens"])} tok, '
                    f'{_num(v["mean_latency_s"])} s</td>' for v in variants)
    rows.append(f"<tr><td>outputs / mean tokens / latency</td>{n_row}</tr>")
    return '<table class="summary">' + "".join(rows) + "</table>"


def _side_by_side(report: dict[str, Any]) -> str:
    variants = report["variants"]
    scorer_names = [s["name"] for s in report["scorers"]]
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for o in report["outputs"]:
        by.setdefault((o["prompt_id"], o["variant"]), []).append(o)
    rows = [f"<tr><th>prompt</th>{''.join(_variant_head(v) for v in variants)}</tr>"]
    for i, p in enumerate(report["prompts"]):
        cells = []
        for v in variants:
            parts = []
            for o in sorted(by.get((p["id"], v["name"]), []), key=lambda o: o["index"]):
                scores = " · ".join(f"{n} {_num(o['scores'][n])}" for n in scorer_names)
                parts.append(f'<div class="out">{_e(o["text"])}</div>'
                             f'<div class="scores">{_e(scores)} · {o["tokens"]} tok · '
                             f'{_e(o["finish_reason"])}</div>')
            cls = ' class="control"' if v["control"] else ""
            cells.append(f"<td{cls}>{''.join(parts) or '–'}</td>")
        seed = report["config"]["seeds"][i]
        rows.append(f'<tr><td class="prompt" data-prompt="{_e(p["id"])}">{_e(p["prompt"])}'
                    f'<div class="meta">{_e(p["id"])} · seed {seed}</div></td>{"".join(cells)}</tr>')
    return '<table class="side">' + "".join(rows) + "</table>"


def render_html(report: dict[str, Any]) -> str:
    """The report body of :func:`clients.ab.offline.run` as one HTML page."""
    cfg = report["config"]
    settings = (f"model <code>{_e(report['model'])}</code> · {len(report['prompts'])} prompts × "
                f"{len(report['variants'])} variants × {cfg['samples']} sample(s) · "
                f"max_tokens {cfg['max_tokens']} · temperature {cfg['temperature']} · top_p {cfg['top_p']} · "
                f"seed {cfg['seed']} (prompt i: seed·100003 + i, the same in every variant) · "
                f"{report['wall_s']} s")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Offline A/B: {_e(report['experiment'])}</title><style>{CSS}</style></head><body>"
        f"<h1>Offline A/B run of experiment <code>{_e(report['experiment'])}</code></h1>"
        f"<p class=\"meta\">{settings}</p>"
        "<h2>Scores per variant</h2>"
        "<p class=\"meta\">Mean over outputs [95% CI]; Δ is the mean paired difference against the "
        "control over prompts, p from a paired t-test (red: p &lt; 0.05).</p>"
        f"{_summary(report)}<h2>Outputs side by side</h2>{_side_by_side(report)}</body></html>\n"
    )
