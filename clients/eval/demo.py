"""``steer demo ablation``: one feature, baseline vs ablated vs amplified, side by side.

For each on-topic prompt three chat completions run through the real engine with the same seed:

* **baseline**  — no steering;
* **ablated**   — ``{"mode": "ablate"}``: the feature's activation pinned to 0 at its layer, on every
  token (prompt and generated, ``apply_to: all``);
* **amplified** — ``{"mode": "clamp"}``: the activation pinned to S × the feature's norm unit u
  (0.25 × the median residual norm; S = ``--amplify``) on every token. In norm units, not in the
  feature's calibrated strength units, so ``steer pack calibrate`` does not change what the demo
  shows: the request's strength is S·u / scale.

Each output is scored by the shared text scorer of the feature (:func:`clients.eval.scorers.scorer_for`)
and read back with ``POST /v1/features/inspect``: the prompt and the output as one chat, run through
the UNSTEERED model, so the heatmap shows how strongly the model itself reads the feature in each
generated token. (``return_activations`` would not do: it reports act(h) *after* the clamp, which is
0 everywhere under ablation and the target everywhere under amplification.)

Writes a rich table to the terminal, a self-contained HTML report (inline CSS, no scripts) with the
three outputs per prompt as per-token heatmaps and the summary numbers, optionally the results as
JSON and a PNG screenshot of the report (headless Chromium, when installed).
"""

# This module is the run; clients.eval.demo_view shows it, clients.eval.demo_cli is the command.

from __future__ import annotations

import asyncio
import datetime as dt
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from clients.eval.harness import DEFAULT_SERVE_ARGS, PROMPTS_DIR, Client, EvalError, Prompt
from clients.eval.scorers import Scorer, scorer_for
from steering.packs.manifest import norm_unit

DEFAULT_FEATURE = "golden_gate"
DEFAULT_PROMPTS = PROMPTS_DIR / "demo_golden_gate.jsonl"
#: Clamp strength (calibration units) of "amplified". Measured on SmolLM2's golden_gate with the
#: shipped prompts (64 tokens, seed 0): 1.0, 1.25, 1.5 and 2.0 all reach a 9/10 topic rate; the
#: outputs' mean activation rises 10.7 → 13.4 → 14.5 and stays at 14.5 at 2.0, where the text
#: drifts into run-on capitalised phrases; 3.0 is gibberish.
DEFAULT_AMPLIFY = 1.5


class DemoError(EvalError):
    """The demo cannot run as asked (bad input, or the server refused a request)."""


@dataclass(frozen=True)
class Variant:
    """One column of the demo: a name, a heading and the request's ``steering`` (None: unsteered)."""

    name: str
    title: str
    steering: dict[str, Any] | None


def variants(feature: str, amplify: float, strength: float | None = None) -> list[Variant]:
    """baseline / ablated / amplified for ``feature`` (its qualified name); the clamp's request
    ``strength`` is ``amplify`` unless given (in the feature's units: S·u / scale)."""
    strength = amplify if strength is None else strength
    return [
        Variant("baseline", "Baseline (no steering)", None),
        Variant("ablated", "Ablated (clamp to 0)",
                {"features": {feature: {"mode": "ablate"}}, "apply_to": "all"}),
        Variant("amplified", f"Amplified (clamp to {amplify:g} u)",
                {"features": {feature: {"mode": "clamp", "strength": strength}}, "apply_to": "all"}),
    ]


# --- running ------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """What the demo runs; sampling is identical across the three variants of a prompt.

    The field defaults are the command's defaults (``clients.eval.demo_cli`` reads them).
    """

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


def summarize_demo(rows: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
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


async def demo_target(client: DemoClient, cfg: Any) -> tuple[str, dict[str, Any]]:
    """A demo's model (``cfg.model`` or the server's) and its feature's catalog entry
    (DemoError when there is no prompt or the server does not know the feature)."""
    if not cfg.prompts:
        raise DemoError("no prompts")
    model = cfg.model or await client.model()
    try:
        return model, await client.feature(cfg.feature)
    except EvalError as e:
        raise DemoError(f"feature {cfg.feature!r}: {e}") from None


async def run_demo(client: DemoClient, cfg: DemoConfig) -> dict[str, Any]:
    """Run the three variants for every prompt; the results as one JSON-ready dict."""
    if cfg.max_tokens < 1:
        raise DemoError("--max-tokens must be at least 1")
    model, info = await demo_target(client, cfg)
    feature = info["id"]
    cal = info.get("calibration") or {}
    scale = float(cal.get("scale") or 1.0)
    unit = norm_unit(cal) or scale  # u; = scale for a feature never calibrated
    scorer = scorer_for(feature)
    vs = variants(feature, cfg.amplify, cfg.amplify * unit / scale)
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
        "settings": {"amplify": cfg.amplify, "amplify_target": cfg.amplify * unit,
                     "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "repetition_penalty": cfg.repetition_penalty, "seed": cfg.seed},
        "variants": [{"name": v.name, "title": v.title, "steering": v.steering} for v in vs],
        "rows": rows,
        "summary": summarize_demo(rows, [v.name for v in vs]),
    }


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


__all__ = ["DemoClient", "DemoConfig", "DemoError", "Variant", "merge_split_chars", "response_span", "run_against",
           "run_demo", "summarize_demo", "variants"]
