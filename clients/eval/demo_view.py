"""What ``steer demo ablation`` shows: a rich table in the terminal, the HTML report, a PNG of it.

The report is ``clients/templates/ablation_demo.html.j2`` (rendered by :mod:`clients.report`):
self-contained (inline CSS, no scripts), with the three outputs per prompt as per-token heatmaps
and the summary numbers. The screenshot needs a headless Chromium on the PATH.
"""

from __future__ import annotations

import shutil
import sys
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from clients.report import macro, pct, render

# --- terminal -----------------------------------------------------------------------------------


def summary_line(result: dict[str, Any]) -> str:
    """"topic rate (golden_gate): baseline 100% · ablated 40% · amplified 100% | mean activation …"."""
    s = result["summary"]
    names = [v["name"] for v in result["variants"]]
    parts = []
    sc = result["scorer"]
    if sc is not None and sc["binary"]:
        parts.append(f"topic rate ({sc['name']}): " + " · ".join(
            f"{n} {s[n]['topic_hits']}/{s[n]['n']} ({pct(s[n]['topic_rate'])})" for n in names))
    elif sc is not None:
        parts.append(f"mean {sc['name']} ({sc['unit']}): " + " · ".join(f"{n} {s[n]['mean_score']:.3g}" for n in names))
    parts.append("mean activation: " + " · ".join(f"{n} {s[n]['mean_activation']:.1f}" for n in names))
    return " | ".join(parts)


def _clip(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def print_table(result: dict[str, Any], file=None) -> None:
    """The rows as a rich table (prompt, three truncated outputs with their topic hit) and the summary."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file)
    names = [v["name"] for v in result["variants"]]
    t = Table(title=f"{result['feature']['id']} (layer {result['feature']['layer']}) on {result['model']}",
              show_lines=True)
    t.add_column("prompt", ratio=2)
    for v in result["variants"]:
        t.add_column(v["title"], ratio=3)
    for row in result["rows"]:
        cells = []
        for n in names:
            o = row["outputs"][n]
            mark = "" if o["hit"] is None else ("[green]✓ topic[/] " if o["hit"] else "[red]✗ topic[/] ")
            cells.append(f"{mark}[dim]act {o['mean_activation']:.1f}[/]\n{escape(_clip(o['text']))}")
        t.add_row(escape(_clip(row["prompt"], 60)), *cells)
    console.print(t, width=max(console.width, 140))
    console.print(summary_line(result))


# --- HTML ---------------------------------------------------------------------------------------


def heatmap_html(tokens: list[tuple[str, float]], scale: float) -> str:
    """The tokens as ``<span class="tok">`` coloured by activation, the value in the title tooltip."""
    return str(macro("heatmap.html.j2", "heatmap")(tokens, scale))


def render_html(result: dict[str, Any]) -> str:
    """The report: summary table, legend, three heatmap columns per prompt, settings and command."""
    return render("ablation_demo.html.j2", result=result, scale=float(result["feature"].get("scale") or 1.0))


# --- PNG ----------------------------------------------------------------------------------------


def write_report(result: dict[str, Any], out: str | Path, json_out: str | None,
                 render_page=render_html, table=print_table) -> Path:
    """A demo's HTML page to ``out`` (and its JSON to ``json_out``), its table to stdout; the
    page's path. ``render_page``/``table`` default to the ablation demo's."""
    import json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(result), encoding="utf-8")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    table(result)
    print(f"report: {out}", file=sys.stderr)
    return out


def screenshot(html_path: Path, png_path: Path, width: int = 1400, height: int = 1800) -> bool:
    """Render the report to PNG with headless Chromium; False when no Chromium is installed."""
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        return False
    with tempfile.TemporaryDirectory(prefix="steer-chromium-") as profile:
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--screenshot={png_path.resolve()}",
                        f"--window-size={width},{height}", html_path.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    if not png_path.exists():
        return False
    _shrink_png(png_path)
    return True


def _shrink_png(path: Path) -> None:
    """Re-save as a 256-colour palette PNG (a third of the size; text stays crisp) when Pillow is present."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


__all__ = ["heatmap_html", "print_table", "render_html", "screenshot", "summary_line"]
