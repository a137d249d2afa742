"""``steer demo ablation``: one feature, baseline vs ablated vs amplified, side by side.

For each on-topic prompt three chat completions run through the real engine with the same seed:

* **baseline**  — no steering;
* **ablated**   — ``{"mode": "ablate"}``: the feature's activation pinned to 0 at its layer, on every
  token (prompt and generated, ``apply_to: all``);
* **amplified** — ``{"mode": "clamp", "strength": S}``: the activation pinned to S × the feature's
  calibration scale on every token (S = ``--amplify``; 1.0 is a strong typical activation).

Each output is scored by the shared text scorer of the feature (:func:`clients.eval.scorers.scorer_for`)
and read back with ``POST /v1/features/inspect``: the prompt and the output as one chat, run through
the UNSTEERED model, so the heatmap shows how strongly the model itself reads the feature in each
generated token. (``return_activations`` would not do: it reports act(h) *after* the clamp, which is
0 everywhere under ablation and the target everywhere under amplification.)

Writes a rich table to the terminal, a self-contained HTML report (inline CSS, no scripts) with the
three outputs per prompt as per-token heatmaps and the summary numbers, optionally the results as
JSON and a PNG screenshot of the report (headless Chromium, when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import html
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.eval.harness import PROMPTS_DIR, Client, EvalError, Prompt, load_prompts
from clients.eval.scorers import Scorer, scorer_for

DEFAULT_FEATURE = "golden_gate"
DEFAULT_PROMPTS = PROMPTS_DIR / "demo_golden_gate.jsonl"
#: Clamp strength (calibration units) of "amplified". Measured on SmolLM2's golden_gate with the
#: shipped prompts (64 tokens, seed 0): 1.0, 1.25, 1.5 and 2.0 all reach a 9/10 topic rate; the
#: outputs' mean activation rises 10.7 → 13.4 → 14.5 and stays at 14.5 at 2.0, where the text
#: drifts into run-on capitalised phrases; 3.0 is gibberish.
DEFAULT_AMPLIFY = 1.5
#: The engine the demo starts without --url: float32, so a rerun reproduces every token on CPU.
DEFAULT_SERVE_ARGS = "--dtype float32 --max-model-len 2048"


class DemoError(EvalError):
    """The demo cannot run as asked (bad input, or the server refused a request)."""


@dataclass(frozen=True)
class Variant:
    """One column of the demo: a name, a heading and the request's ``steering`` (None: unsteered)."""

    name: str
    title: str
    steering: dict[str, Any] | None


def variants(feature: str, amplify: float) -> list[Variant]:
    """baseline / ablated / amplified for ``feature`` (its qualified name)."""
    return [
        Variant("baseline", "Baseline (no steering)", None),
        Variant("ablated", "Ablated (clamp to 0)",
                {"features": {feature: {"mode": "ablate"}}, "apply_to": "all"}),
        Variant("amplified", f"Amplified (clamp, strength {amplify:g})",
                {"features": {feature: {"mode": "clamp", "strength": amplify}}, "apply_to": "all"}),
    ]


# --- running ------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """What the demo runs; sampling is identical across the three variants of a prompt."""

    feature: str = DEFAULT_FEATURE
    prompts: tuple[Prompt, ...] = ()
    amplify: float = DEFAULT_AMPLIFY
    max_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    seed: int = 0
    concurrency: int = 12
    model: str | None = None


class DemoClient(Client):
    """The eval harness's client plus the inspect route."""

    async def inspect(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._json("POST", "/v1/features/inspect", json=body)


def response_span(inspected: list[dict[str, Any]], prompt_ids: list[int], token_ids: list[int],
                  finish_reason: str | None) -> list[dict[str, Any]]:
    """The inspected tokens that are the generated output, without the chat template around it.

    ``inspected`` is the inspection of [user prompt, assistant output] rendered by the chat
    template: it starts with the completion's ``prompt_ids`` (the same rendering with the
    generation prompt) and ends with the template's end-of-turn tokens. The output is the run of
    tokens after the prompt that re-tokenizes to the generated ``token_ids`` — minus the stop
    token the model emitted (not part of the text) when it stopped by itself.
    """
    ids = [t["token_id"] for t in inspected]
    if ids[: len(prompt_ids)] != list(prompt_ids):
        raise DemoError("inspect rendered the prompt differently from the chat completion")
    rest = inspected[len(prompt_ids):]
    k = 0
    while k < min(len(rest), len(token_ids)) and rest[k]["token_id"] == token_ids[k]:
        k += 1
    if k >= len(token_ids) - 1:  # the whole output re-tokenized identically (bar the stop token)
        if finish_reason == "stop" and k == len(token_ids) and k > 0:
            k -= 1
        return rest[:k]
    # The text re-tokenized differently somewhere: keep everything up to the template's closing
    # tokens (special tokens such as <|im_end|> and the whitespace after them).
    end = len(rest)
    while end > 0 and (rest[end - 1]["token"].strip() == "" or _is_special(rest[end - 1]["token"])):
        end -= 1
    return rest[:end]


def _is_special(token: str) -> bool:
    return token.startswith("<") and token.endswith(">") and ("|" in token or token in {"<s>", "</s>"})


def merge_split_chars(tokens: list[tuple[str, float]], text: str) -> list[tuple[str, float]]:
    """Merge runs of tokens that each decode to a piece of one multi-byte character.

    Decoded one by one, such tokens read as U+FFFD; a run of them becomes one span carrying the
    output text's real characters and the run's largest activation. If the tokens do not spell
    ``text`` the list is returned unchanged.
    """
    if not any("\ufffd" in t for t, _ in tokens):
        return tokens
    out: list[tuple[str, float]] = []
    pos, i = 0, 0
    while i < len(tokens):
        tok, act = tokens[i]
        if "\ufffd" not in tok:
            if not text.startswith(tok, pos):
                return tokens
            out.append((tok, act))
            pos += len(tok)
            i += 1
            continue
        j = i
        while j < len(tokens) and "\ufffd" in tokens[j][0]:
            j += 1
        end = text.find(tokens[j][0], pos) if j < len(tokens) else len(text)
        if end <= pos:
            return tokens
        out.append((text[pos:end], max(a for _, a in tokens[i:j])))
        pos, i = end, j
    return out


async def _one(client: DemoClient, cfg: DemoConfig, model: str, feature: str, prompt: Prompt, seed: int,
               variant: Variant, scorer: Scorer | None, sem: asyncio.Semaphore) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": prompt.prompt}],
        "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "repetition_penalty": cfg.repetition_penalty, "seed": seed, "return_token_ids": True,
    }
    if variant.steering is not None:
        body["steering"] = variant.steering
    async with sem:
        resp = await client.chat(body)
        choice = resp["choices"][0]
        text = choice["message"]["content"] or ""
        ins = await client.inspect({
            "model": model, "features": [feature], "layers": [], "top_k": 0,
            "messages": [{"role": "user", "content": prompt.prompt}, {"role": "assistant", "content": text}],
        })
    span = response_span(ins["tokens"], resp["prompt_token_ids"], choice["token_ids"], choice.get("finish_reason"))
    acts = [float(t["features"][feature]) for t in span]
    tokens = merge_split_chars([(t["token"], a) for t, a in zip(span, acts)], text)
    score = scorer(text) if scorer is not None else None
    return {
        "text": text, "finish_reason": choice.get("finish_reason"), "generated_tokens": len(choice["token_ids"]),
        "score": score, "hit": None if score is None or not scorer.binary else score >= 0.5,
        "tokens": tokens,
        "mean_activation": sum(acts) / len(acts) if acts else 0.0,
        "max_activation": max(acts) if acts else 0.0,
        "steering": resp.get("steering"),
    }


def summarize(rows: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: outputs, topic rate (binary scorers) or mean score, mean and peak activation."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        outs = [r["outputs"][name] for r in rows]
        n = len(outs)
        scores = [o["score"] for o in outs if o["score"] is not None]
        hits = [o["hit"] for o in outs if o["hit"] is not None]
        out[name] = {
            "n": n,
            "topic_hits": sum(hits) if hits else None,
            "topic_rate": sum(hits) / len(hits) if hits else None,
            "mean_score": sum(scores) / len(scores) if scores else None,
            "mean_activation": sum(o["mean_activation"] for o in outs) / n if n else None,
            "mean_peak_activation": sum(o["max_activation"] for o in outs) / n if n else None,
            "mean_generated_tokens": sum(o["generated_tokens"] for o in outs) / n if n else None,
        }
    return out


async def run_demo(client: DemoClient, cfg: DemoConfig) -> dict[str, Any]:
    """Run the three variants for every prompt; the results as one JSON-ready dict."""
    if not cfg.prompts:
        raise DemoError("no prompts")
    if cfg.max_tokens < 1:
        raise DemoError("--max-tokens must be at least 1")
    model = cfg.model or await client.model()
    try:
        info = await client.feature(cfg.feature)
    except EvalError as e:
        raise DemoError(f"feature {cfg.feature!r}: {e}") from None
    feature = info["id"]
    scale = float((info.get("calibration") or {}).get("scale") or 1.0)
    scorer = scorer_for(feature)
    vs = variants(feature, cfg.amplify)
    sem = asyncio.Semaphore(max(1, cfg.concurrency))
    jobs = [_one(client, cfg, model, feature, p, cfg.seed + i, v, scorer, sem)
            for i, p in enumerate(cfg.prompts) for v in vs]
    results = await asyncio.gather(*jobs)
    rows = []
    for i, p in enumerate(cfg.prompts):
        outs = results[i * len(vs):(i + 1) * len(vs)]
        rows.append({"id": p.id, "prompt": p.prompt, "seed": cfg.seed + i,
                     "outputs": {v.name: o for v, o in zip(vs, outs)}})
    return {
        "object": "steer.demo.ablation",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "feature": {"id": feature, "layer": info.get("layer"), "kind": info.get("kind"),
                    "description": info.get("description", ""), "scale": scale},
        "scorer": None if scorer is None else {"name": scorer.name, "description": scorer.description,
                                                "unit": scorer.unit, "binary": scorer.binary},
        "settings": {"amplify": cfg.amplify, "amplify_target": cfg.amplify * scale,
                     "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "repetition_penalty": cfg.repetition_penalty, "seed": cfg.seed},
        "variants": [{"name": v.name, "title": v.title, "steering": v.steering} for v in vs],
        "rows": rows,
        "summary": summarize(rows, [v.name for v in vs]),
    }


# --- terminal -----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def summary_line(result: dict[str, Any]) -> str:
    """"topic rate (golden_gate): baseline 100% · ablated 40% · amplified 100% | mean activation …"."""
    s = result["summary"]
    names = [v["name"] for v in result["variants"]]
    parts = []
    sc = result["scorer"]
    if sc is not None and sc["binary"]:
        parts.append(f"topic rate ({sc['name']}): " + " · ".join(
            f"{n} {s[n]['topic_hits']}/{s[n]['n']} ({_pct(s[n]['topic_rate'])})" for n in names))
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

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#555;margin:0 0 16px}
table.summary{border-collapse:collapse;margin:8px 0 4px}
table.summary th,table.summary td{border:1px solid #ddd;padding:5px 10px;text-align:right}
table.summary th:first-child,table.summary td:first-child{text-align:left}
table.summary thead th{background:#f4f4f6}
.legend{display:flex;align-items:center;gap:8px;margin:12px 0;font-size:12px;color:#444}
.legend .bar{display:flex}.legend .bar span{width:44px;height:18px;display:inline-block;text-align:center;
  font-size:10px;line-height:18px;border:1px solid #eee}
.prompt{border-top:1px solid #ddd;padding-top:10px;margin-top:18px}
.prompt h3{font-size:15px;margin:0 0 8px}.prompt h3 .seed{color:#888;font-weight:normal;font-size:12px}
.cols{display:grid;grid-template-columns:repeat(3,1fr);gap:12px}
.col{border:1px solid #e3e3e8;border-radius:6px;padding:8px 10px;background:#fcfcfd}
.col h4{margin:0 0 6px;font-size:13px;display:flex;justify-content:space-between;gap:6px}
.badge{font-size:11px;padding:1px 6px;border-radius:8px;font-weight:600}
.hit{background:#ffe1cc;color:#8a3300}.miss{background:#e4ecf7;color:#23466e}
.stats{font-size:11px;color:#666;margin-bottom:6px}
.heat{white-space:pre-wrap;word-wrap:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;margin:0}
.tok{border-radius:2px}
details{margin-top:6px;font-size:12px;color:#555}details pre{white-space:pre-wrap;margin:4px 0 0}
.settings{font-size:12px;color:#333}.settings code{background:#f4f4f6;padding:1px 4px;border-radius:3px}
pre.cmd{background:#f4f4f6;padding:8px 10px;border-radius:4px;white-space:pre-wrap;font-size:12px}
"""


def heat_color(act: float, scale: float) -> str:
    """Background for an activation: orange-red above 0 (full at 2 × scale), blue below (full at −scale)."""
    x = act / scale if scale > 0 else act
    if x >= 0:
        a = min(x / 2.0, 1.0)
        return f"rgba(230,85,13,{0.85 * a:.2f})"
    a = min(-x, 1.0)
    return f"rgba(49,130,189,{0.45 * a:.2f})"


def heatmap_html(tokens: list[tuple[str, float]], scale: float) -> str:
    """The tokens as ``<span class="tok">`` coloured by activation, the value in the title tooltip."""
    spans = []
    for tok, act in tokens:
        title = f"{act:.2f} ({act / scale:+.2f}× scale)" if scale > 0 else f"{act:.2f}"
        spans.append(f'<span class="tok" style="background:{heat_color(act, scale)}" '
                     f'title="{html.escape(title)}">{html.escape(tok)}</span>')
    return "".join(spans)


def _legend(scale: float) -> str:
    stops = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    cells = "".join(f'<span style="background:{heat_color(x * scale, scale)}" title="{x * scale:.1f}">'
                    f"{x:+g}×</span>" for x in stops)
    return (f'<div class="legend">activation (× calibration scale {scale:.1f}):<span class="bar">{cells}</span>'
            "hover a token for its value</div>")


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def render_html(result: dict[str, Any]) -> str:
    """The report: summary table, legend, three heatmap columns per prompt, settings and command."""
    e = html.escape
    command = result.get("command")
    feat, sc, s = result["feature"], result["scorer"], result["summary"]
    scale = float(feat.get("scale") or 1.0)
    vs = result["variants"]
    head = "".join(f"<th>{e(v['title'])}</th>" for v in vs)
    srows = []
    if sc is not None and sc["binary"]:
        srows.append("<tr><td>topic rate (" + e(sc["name"]) + ")</td>" + "".join(
            f"<td>{_pct(s[v['name']]['topic_rate'])} ({s[v['name']]['topic_hits']}/{s[v['name']]['n']})</td>"
            for v in vs) + "</tr>")
    elif sc is not None:
        srows.append(f"<tr><td>mean {e(sc['name'])} ({e(sc['unit'])})</td>" + "".join(
            f"<td>{_num(s[v['name']]['mean_score'], '.3g')}</td>" for v in vs) + "</tr>")
    for key, label in (("mean_activation", "mean feature activation per token"),
                       ("mean_peak_activation", "mean peak activation"),
                       ("mean_generated_tokens", "mean generated tokens")):
        srows.append(f"<tr><td>{label}</td>" + "".join(f"<td>{_num(s[v['name']][key])}</td>" for v in vs) + "</tr>")

    blocks = []
    for row in result["rows"]:
        cols = []
        for v in vs:
            o = row["outputs"][v["name"]]
            badge = "" if o["hit"] is None else (
                f'<span class="badge {"hit" if o["hit"] else "miss"}">{"topic ✓" if o["hit"] else "no topic"}</span>')
            score = "" if o["score"] is None or (sc and sc["binary"]) else f" · {e(sc['name'])} {o['score']:.3g}"
            cols.append(
                f'<div class="col variant-{e(v["name"])}"><h4><span>{e(v["title"])}</span>{badge}</h4>'
                f'<div class="stats">mean act {o["mean_activation"]:.1f} · peak {o["max_activation"]:.1f}'
                f' · {o["generated_tokens"]} tokens{score}</div>'
                f'<p class="heat">{heatmap_html(o["tokens"], scale)}</p>'
                f'<details><summary>plain text</summary><pre>{e(o["text"])}</pre></details></div>')
        blocks.append(f'<section class="prompt"><h3>{e(row["prompt"])} <span class="seed">seed {row["seed"]}'
                      f'</span></h3><div class="cols">{"".join(cols)}</div></section>')

    st = result["settings"]
    steering = "".join(f"<li>{e(v['name'])}: <code>{e(json.dumps(v['steering']))}</code></li>" for v in vs)
    cmd = f'<h2>Command</h2><pre class="cmd">{e(command)}</pre>' if command else ""
    scorer_txt = (f"{e(sc['name'])} — {e(sc['description'])} ({e(sc['unit'])})" if sc
                  else "none for this feature (activations only)")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Feature ablation demo: {e(feat['id'])}</title>
<style>{_CSS}</style></head><body>
<h1>Feature ablation demo: {e(feat['id'])}</h1>
<p class="sub">{e(feat.get('description') or '')} — layer {e(str(feat.get('layer')))}, model {e(result['model'])},
{len(result['rows'])} prompts, {e(result['created'])}</p>
<h2>Summary</h2>
<table class="summary"><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(srows)}</tbody></table>
<p class="settings">Topic scorer: {scorer_txt}. Activations are the unsteered model's reading of each output
(<code>POST /v1/features/inspect</code> over the prompt and the output as one chat), act(h) at
layer {e(str(feat.get('layer')))}; calibration scale {scale:.1f}.</p>
{_legend(scale)}
<h2>Outputs</h2>
{''.join(blocks)}
<h2>Settings</h2>
<ul class="settings"><li>amplify: clamp strength {st['amplify']:g} (act pinned to {st['amplify_target']:.1f})</li>
<li>max_tokens {st['max_tokens']}, temperature {st['temperature']:g}, top_p {st['top_p']:g},
repetition_penalty {st['repetition_penalty']:g}, seed {st['seed']} (prompt i uses seed + i in all three variants)</li>
{steering}</ul>
{cmd}
</body></html>
"""


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


# --- CLI ----------------------------------------------------------------------------------------


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    """``steer demo ablation``."""
    p = subparsers.add_parser("demo", help="demos of steering on the real engine")
    sub = p.add_subparsers(dest="demo_command", required=True, metavar="DEMO")
    a = sub.add_parser("ablation", help="baseline vs ablated vs amplified feature, as a table and an HTML report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--feature", default=DEFAULT_FEATURE,
                   help=f"feature to ablate and amplify, bare or pack/feature (default: {DEFAULT_FEATURE})")
    a.add_argument("--prompts", default=None,
                   help="JSONL of {id, prompt} or a text file, one prompt a line "
                        f"(default: the shipped {DEFAULT_PROMPTS.name} for {DEFAULT_FEATURE}; required for other features)")
    a.add_argument("--limit-prompts", type=int, default=None, help="use only the first N prompts")
    a.add_argument("--amplify", type=float, default=DEFAULT_AMPLIFY,
                   help=f"clamp strength of the amplified variant, in calibration units (default: {DEFAULT_AMPLIFY})")
    a.add_argument("--max-tokens", type=int, default=64, help="tokens per output (default: 64)")
    a.add_argument("--temperature", type=float, default=0.7, help="(default: 0.7)")
    a.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    a.add_argument("--repetition-penalty", type=float, default=1.1, help="(default: 1.1)")
    a.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i in all three variants")
    a.add_argument("--concurrency", type=int, default=12, help="requests in flight (default: 12)")
    a.add_argument("--model", default=None, help="model name (default: the server's first model)")
    a.add_argument("--url", default=os.environ.get("STEER_URL"),
                   help="a running server (env STEER_URL); default: start one")
    a.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"), help="(env STEER_API_KEY)")
    a.add_argument("--serve-args", default=DEFAULT_SERVE_ARGS,
                   help=f"flags for the server started without --url (default: '{DEFAULT_SERVE_ARGS}')")
    a.add_argument("--out", default="demo_ablation.html", help="HTML report (default: demo_ablation.html)")
    a.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the results as JSON")
    a.add_argument("--screenshot", default=None, metavar="PNG",
                   help="also render the report to PNG with headless Chromium (must be installed)")
    a.set_defaults(func=ablation_cmd)


def _config(args: argparse.Namespace) -> DemoConfig:
    bare = args.feature.rsplit("/", 1)[-1]
    if args.prompts is None and bare != DEFAULT_FEATURE:
        raise DemoError(f"--prompts is required for feature {args.feature!r} "
                        f"(the shipped prompts are about {DEFAULT_FEATURE})")
    path = Path(args.prompts) if args.prompts else DEFAULT_PROMPTS
    if not path.is_file():
        raise DemoError(f"--prompts: no such file {str(path)!r}")
    try:
        prompts = load_prompts(path, args.limit_prompts)
    except (ValueError, KeyError) as e:
        raise DemoError(f"--prompts {path}: {e}") from None
    if args.max_tokens < 1:
        raise DemoError("--max-tokens must be at least 1")
    return DemoConfig(feature=args.feature, prompts=tuple(prompts), amplify=args.amplify,
                      max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                      repetition_penalty=args.repetition_penalty, seed=args.seed,
                      concurrency=args.concurrency, model=args.model)


async def _run(url: str, api_key: str | None, cfg: DemoConfig) -> dict[str, Any]:
    client = DemoClient(url, api_key)
    try:
        return await run_demo(client, cfg)
    finally:
        await client.close()


def run_against(url: str | None, api_key: str | None, cfg: DemoConfig,
                serve_args: str = DEFAULT_SERVE_ARGS) -> dict[str, Any]:
    """Run the demo against ``url``, or against a server started for it when ``url`` is None
    (with ``--api-key api_key`` when a key is given, so an inherited $STEER_API_KEY cannot differ)."""
    if url:
        return asyncio.run(_run(url, api_key, cfg))
    from clients.launch import local_server

    print(f"steer demo: starting a server ({serve_args}) …", file=sys.stderr)
    extra = shlex.split(serve_args) + (["--api-key", api_key] if api_key else [])
    with local_server(extra, api_key=api_key) as srv:
        return asyncio.run(_run(srv.url, api_key, cfg))


def command_line(args: argparse.Namespace) -> str:
    """A ``steer demo ablation`` command that reproduces this run (every setting spelled out, no key)."""
    parts = ["steer", "demo", "ablation", "--feature", args.feature]
    if args.prompts:
        parts += ["--prompts", args.prompts]
    if args.limit_prompts:
        parts += ["--limit-prompts", str(args.limit_prompts)]
    parts += ["--amplify", f"{args.amplify:g}", "--max-tokens", str(args.max_tokens),
              "--temperature", f"{args.temperature:g}", "--top-p", f"{args.top_p:g}",
              "--repetition-penalty", f"{args.repetition_penalty:g}", "--seed", str(args.seed)]
    if args.model:
        parts += ["--model", args.model]
    if args.url:
        parts += ["--url", args.url]
    elif args.serve_args != DEFAULT_SERVE_ARGS:
        parts += ["--serve-args", args.serve_args]
    parts += ["--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)


def ablation_cmd(args: argparse.Namespace) -> int:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)
    command = command_line(args)
    try:
        cfg = _config(args)
        result = run_against(args.url, args.api_key, cfg, args.serve_args)
    except EvalError as e:
        print(f"steer demo: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"steer demo: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2
    result["command"] = command
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(result), encoding="utf-8")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    print_table(result)
    print(f"report: {out}", file=sys.stderr)
    if args.screenshot:
        try:
            ok = screenshot(out, Path(args.screenshot))
        except (subprocess.SubprocessError, OSError) as e:
            print(f"steer demo: screenshot failed: {e}", file=sys.stderr)
            return 1
        if not ok:
            print("steer demo: --screenshot needs chromium (apt-get install chromium)", file=sys.stderr)
            return 1
        print(f"screenshot: {args.screenshot}", file=sys.stderr)
    return 0


__all__ = ["DemoConfig", "DemoError", "Variant", "add_demo_parser", "heatmap_html", "render_html", "run_demo",
           "run_against", "command_line", "merge_split_chars", "response_span", "summarize", "variants"]
