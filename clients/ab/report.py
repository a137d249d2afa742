"""The self-contained HTML of an offline A/B run (inline CSS, no script, no external resource).

Top: the run's settings and a summary table — one row per scorer, one column per variant with
the mean and its 95% CI, and for non-control variants the paired difference against the control
and its p-value. Below: one row per prompt, one column per variant, each cell the output text and
its scores. The page is ``clients/templates/ab_report.html.j2``, rendered by :mod:`clients.report`.
"""

from __future__ import annotations

from typing import Any

from clients.report import render


def outputs_by_cell(report: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{prompt id: {variant: [its outputs in index order]}} of the report's ``outputs``."""
    by: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for o in report["outputs"]:
        by.setdefault(o["prompt_id"], {}).setdefault(o["variant"], []).append(o)
    for cells in by.values():
        for outs in cells.values():
            outs.sort(key=lambda o: o["index"])
    return by


def render_html(report: dict[str, Any]) -> str:
    """The report body of :func:`clients.ab.offline.run` as one HTML page."""
    return render("ab_report.html.j2", report=report, outputs=outputs_by_cell(report))
