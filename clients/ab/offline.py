"""Offline A/B: ``steer ab run --experiment NAME --prompts FILE``.

Every prompt goes through every variant of the experiment with the same sampling seed (prompt
``i`` uses ``seed * 100003 + i`` in every variant, so the variant's steering is the only thing
that differs). The variant's steering (its preset snapshot or inline steering, as the server
stores it) is sent as the request's own ``steering``: an offline run is not routed through the
experiment, so it assigns no units and records no exposures. Each output is scored by the text
scorers of :mod:`clients.eval.scorers` (all, or a chosen subset); per variant and scorer the run
reports the mean with a t-based 95% CI and, against the control, the mean paired difference
with a paired t-test over prompts (:mod:`server.stats`). :mod:`clients.ab.report` renders the
side-by-side HTML.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from clients.eval.harness import Client, EvalError, Prompt
from clients.eval.scorers import SCORERS, Scorer
from server.stats import mean_ci, paired_t


@dataclass
class RunConfig:
    """What to run: sampling is identical in every variant."""

    experiment: str
    prompts: list[Prompt]
    scorers: list[str] = field(default_factory=lambda: list(SCORERS))
    samples: int = 1  # choices per (prompt, variant): n in the request
    max_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    concurrency: int = 8

    def seed_for(self, prompt_index: int) -> int:
        return self.seed * 100_003 + prompt_index


@dataclass
class Output:
    """One generated output of one variant for one prompt, with its scores."""

    variant: str
    prompt_id: str
    index: int
    seed: int
    text: str
    tokens: int
    finish_reason: str | None
    latency_s: float
    scores: dict[str, float]


def pick_scorers(names: str | None) -> list[str]:
    """``a,b,c`` → those scorer names (ValueError naming the unknown ones); None → all."""
    if not names:
        return list(SCORERS)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in SCORERS]
    if unknown or not chosen:
        raise ValueError(f"unknown scorer(s) {unknown or names!r}; known: {', '.join(SCORERS)}")
    return chosen


async def _generate(client: Client, cfg: RunConfig, model: str, variant: dict[str, Any],
                    prompt: Prompt, i: int, scorers: dict[str, Scorer]) -> list[Output]:
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": prompt.prompt}],
        "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "n": cfg.samples, "seed": cfg.seed_for(i), "return_token_ids": True,
    }
    if variant.get("steering"):
        body["steering"] = variant["steering"]
    t0 = time.monotonic()
    resp = await client.chat(body)
    latency = time.monotonic() - t0
    outs = []
    for ch in sorted(resp["choices"], key=lambda c: c["index"]):
        text = ch["message"]["content"] or ""
        outs.append(Output(variant=variant["name"], prompt_id=prompt.id, index=ch["index"],
                           seed=cfg.seed_for(i), text=text,
                           tokens=len(ch.get("token_ids") or []),
                           finish_reason=ch.get("finish_reason"), latency_s=latency,
                           scores={name: s(text) for name, s in scorers.items()}))
    return outs


def summarize_offline(variants: Sequence[dict[str, Any]], outputs: Sequence[Output],
              scorers: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant: n, mean tokens and latency, and per scorer mean, 95% CI and vs control."""
    control = next(v["name"] for v in variants if v.get("control"))

    def per_prompt(vname: str, scorer: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for o in outputs:
            if o.variant == vname:
                out.setdefault(o.prompt_id, []).append(o.scores[scorer])
        return out

    rows = []
    for v in variants:
        mine = [o for o in outputs if o.variant == v["name"]]
        scores = {}
        for s in scorers:
            # Scores as given, as before the merge into server.stats: unlike steer eval (which drops
            # non-finite scores first), a NaN score here makes the mean NaN.
            mean, lo, hi = mean_ci([o.scores[s] for o in mine])
            item: dict[str, Any] = {"mean": mean, "ci95": [lo, hi]}
            if v["name"] != control:
                item["vs_control"] = paired_t(per_prompt(v["name"], s), per_prompt(control, s))
            scores[s] = item
        rows.append({
            "name": v["name"], "control": bool(v.get("control")), "steering": v.get("steering"),
            "preset": v.get("preset"), "n": len(mine),
            "mean_tokens": sum(o.tokens for o in mine) / len(mine) if mine else None,
            "mean_latency_s": sum(o.latency_s for o in mine) / len(mine) if mine else None,
            "scores": scores,
        })
    return rows


async def run(client: Client, cfg: RunConfig, progress: Any = None) -> dict[str, Any]:
    """Run ``cfg`` against the server behind ``client``; the report body (JSON-ready)."""
    exp = await client._json("GET", f"/v1/experiments/{cfg.experiment}")
    variants = exp["variants"]
    models = exp.get("models") or []
    model = models[0].rsplit(":exp/", 1)[0] if models else await client.model()
    scorers = {n: SCORERS[n] for n in cfg.scorers}
    sem = asyncio.Semaphore(max(1, cfg.concurrency))
    jobs = [(v, p, i) for i, p in enumerate(cfg.prompts) for v in variants]
    done = 0
    t0 = time.monotonic()

    async def one(v: dict[str, Any], p: Prompt, i: int) -> list[Output]:
        nonlocal done
        async with sem:
            outs = await _generate(client, cfg, model, v, p, i, scorers)
        done += 1
        if progress is not None:
            progress(done, len(jobs))
        return outs

    results = await asyncio.gather(*(one(v, p, i) for v, p, i in jobs))
    outputs = [o for chunk in results for o in chunk]
    return {
        "object": "experiment.offline_run", "experiment": cfg.experiment, "model": model,
        "created": int(time.time()), "wall_s": round(time.monotonic() - t0, 3),
        "config": {"samples": cfg.samples, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                   "top_p": cfg.top_p, "seed": cfg.seed,
                   "seeds": [cfg.seed_for(i) for i in range(len(cfg.prompts))]},
        "scorers": [{"name": n, "description": s.description, "unit": s.unit} for n, s in scorers.items()],
        "prompts": [asdict(p) for p in cfg.prompts],
        "variants": summarize_offline(variants, outputs, cfg.scorers),
        "outputs": [asdict(o) for o in outputs],
    }


__all__ = ["RunConfig", "Output", "EvalError", "pick_scorers", "run", "summarize_offline"]
