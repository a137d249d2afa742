"""Self-contained HTML reports of the client tools, from the Jinja2 templates in ``clients/templates/``.

``render(template_name, **context) -> str`` renders one page. Autoescaping is on: every ``{{ x }}``
is HTML-escaped (model output can hold ``<script>``) unless it is markup made by a template macro.
Templates extend ``base.html.j2`` (head, shared CSS block) and use the filters below:

* ``num(x, digits=3)``: a float to ``digits`` significant figures, other values as ``str``; None → "–".
* ``fmt(x, spec)``: ``format(x, spec)`` (e.g. ``".1f"``, ``"+.3g"``); None → "–".
* ``pct(x)``: a share in [0, 1] as a whole percentage ("40%"); None → "–".
* ``json(x, **kw)``: ``json.dumps(x, **kw)`` (escaped like any other text).
* ``heat_color(act, scale)``: the CSS background of an activation in a token heatmap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
MISSING = "–"  # how a missing number reads


def num(x: Any, digits: int = 3) -> str:
    if x is None:
        return MISSING
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def fmt(x: Any, spec: str = ".1f") -> str:
    return MISSING if x is None else format(x, spec)


def pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.0f}%"


def heat_color(act: float, scale: float) -> str:
    """Background for an activation: orange-red above 0 (full at 2 × scale), blue below (full at −scale)."""
    x = act / scale if scale > 0 else act
    if x >= 0:
        a = min(x / 2.0, 1.0)
        return f"rgba(230,85,13,{0.85 * a:.2f})"
    a = min(-x, 1.0)
    return f"rgba(49,130,189,{0.45 * a:.2f})"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(num=num, fmt=fmt, pct=pct, json=json.dumps, heat_color=heat_color)
    return env


ENV = _environment()


def render(template_name: str, **context: Any) -> str:
    """The page ``template_name`` (a file of ``clients/templates/``) rendered with ``context``."""
    return ENV.get_template(template_name).render(**context)


def macro(template_name: str, name: str) -> Any:
    """Macro ``name`` of ``template_name``, callable from Python (returns escaped markup)."""
    return getattr(ENV.get_template(template_name).module, name)
