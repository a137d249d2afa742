"""Generate steered outputs through a running server and score them (HTTP only, the real engine).

For every (feature, strength, prompt) one chat completion asks for ``samples`` choices with the
prompt's fixed seed, so each strength sees the same random numbers (common random numbers: the
strength is the only thing that changes). Strength 0 is the unsteered request, shared by every
feature. Each output is then scored by every text scorer and, for fluency, by the UNSTEERED
model: its perplexity conditioned on the prompt, from ``prompt_logprobs`` of a
``/v1/completions`` request over prompt + output token ids.

With the prompting baseline (``EvalConfig.baseline = "prompt"``), each feature also runs two more
conditions at ``baseline_strength``: ``prompt`` (no steering; a system message from the scorer's
``instruction`` asks for the concept) and ``both`` (that instruction and the steering). Every
output's perplexity is conditioned on the *neutral* prompt, whatever condition produced it, so
the fluency numbers of steering and prompting compare like with like.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clients.eval.scorers import SCORERS

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPTS = PROMPTS_DIR / "neutral.jsonl"
#: The engine ``steer eval`` and ``steer demo ablation`` start when no --url is given: float32, so
#: batched outputs equal solo runs on CPU and a rerun reproduces every token.
DEFAULT_SERVE_ARGS = "--dtype float32 --max-model-len 2048"
STEER, PROMPT, BOTH = "steer", "prompt", "both"
"""Conditions: steering only (every strength); the concept asked for in a system message; both."""
BASELINES = ("none", PROMPT)


class EvalError(RuntimeError):
    """The server refused a request, or the evaluation cannot run as asked."""


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str


def load_prompts(path: str | Path = DEFAULT_PROMPTS, limit: int | None = None) -> list[Prompt]:
    """Prompts from a JSONL file of ``{"id": ..., "prompt": ...}`` (or a plain text file, one per line)."""
    path = Path(path)
    out: list[Prompt] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            obj = json.loads(line)
            out.append(Prompt(str(obj.get("id", f"p{i:03d}")), str(obj["prompt"])))
        else:
            out.append(Prompt(f"p{i:03d}", line))
    if len({p.id for p in out}) != len(out):
        raise EvalError(f"{path}: prompt ids are not unique")
    if not out:
        raise EvalError(f"{path}: no prompts")
    return out[:limit] if limit else out


@dataclass
class EvalConfig:
    """What to run. Sampling is identical at every strength; only ``steering`` changes."""

    features: dict[str, str]  # feature name → scorer name
    strengths: list[float]
    prompts: list[Prompt]
    samples: int = 1  # choices per (prompt, strength), n in the request
    max_tokens: int = 64
    long_max_tokens: int = 320  # for scorers that need the whole answer (verbosity)
    temperature: float = 0.7
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    seed: int = 0
    concurrency: int = 16
    mode: str | None = None  # steering mode for every feature (None: each feature's default)
    model: str | None = None  # None: the server's first model
    perplexity: bool = True
    baseline: str = "none"  # "prompt": also run the prompt and both conditions (see the module docstring)
    baseline_strength: float = 1.0  # the steering strength compared with prompting (one of ``strengths``)

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise EvalError(f"baseline must be one of {', '.join(BASELINES)}, not {self.baseline!r}")
        if self.baseline == PROMPT and self.baseline_strength not in self.strengths:
            raise EvalError(f"the baseline strength {self.baseline_strength:g} must be one of the strengths")
        if self.baseline == PROMPT:
            missing = [f for f, sc in self.features.items() if SCORERS[sc].instruction is None]
            if missing:
                raise EvalError(f"no prompting instruction for {', '.join(missing)} (scorer without a concept)")

    def max_tokens_for(self, feature: str) -> int:
        """Output budget of a feature's requests (its baseline uses the same)."""
        return self.long_max_tokens if SCORERS[self.features[feature]].needs_full_output else self.max_tokens

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompts"] = len(self.prompts)
        return d


@dataclass
class Sample:
    """One generated output and its scores."""

    feature: str | None  # None at strength 0 (unsteered, shared by features with this max_tokens)
    strength: float
    max_tokens: int
    prompt_id: str
    index: int
    text: str
    tokens: int
    finish_reason: str | None
    scores: dict[str, float] = field(default_factory=dict)
    perplexity: float | None = None
    condition: str = STEER  # steer | prompt | both (see the module docstring)
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    token_ids: list[int] = field(default_factory=list, repr=False)


class Client:
    """A thin async client for the server's OpenAI routes and catalog."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    async def close(self) -> None:
        await self.http.aclose()

    async def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        r = await self.http.request(method, path, **kw)
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - any non-OpenAI body
                msg = r.text[:500]
            raise EvalError(f"{method} {path} → {r.status_code}: {msg}")
        return r.json()

    async def model(self) -> str:
        data = (await self._json("GET", "/v1/models"))["data"]
        plain = [m["id"] for m in data if not m.get("parent")]
        if not plain:
            raise EvalError("the server lists no model")
        return plain[0]

    async def feature(self, name: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/features/{name}")

    async def pack_features(self, pack: str) -> list[dict[str, Any]]:
        return (await self._json("GET", "/v1/features", params={"pack": pack, "limit": 500}))["data"]

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._json("POST", "/v1/chat/completions", json=body)

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._json("POST", "/v1/completions", json=body)


def steering_body(feature: str, strength: float, mode: str | None) -> dict[str, Any] | None:
    """The request's ``steering`` (None at strength 0: the plain, unsteered request)."""
    if strength == 0:
        return None
    value: Any = strength if mode is None else {"strength": strength, "mode": mode}
    return {"features": {feature: value}}


async def generate(client: Client, cfg: EvalConfig, model: str, feature: str | None, strength: float,
                   max_tokens: int, prompt: Prompt, prompt_index: int, condition: str = STEER) -> list[Sample]:
    """The ``cfg.samples`` outputs of one prompt at one strength (one request, fixed seed); under
    the ``prompt``/``both`` conditions a system message asks for the feature's concept."""
    messages = [{"role": "user", "content": prompt.prompt}]
    if condition != STEER:
        messages.insert(0, {"role": "system", "content": SCORERS[cfg.features[feature]].instruction})
    body: dict[str, Any] = {
        "model": model, "messages": messages,
        "max_tokens": max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "repetition_penalty": cfg.repetition_penalty, "n": cfg.samples,
        "seed": cfg.seed * 100_003 + prompt_index, "return_token_ids": True,
    }
    steering = steering_body(feature, strength, cfg.mode) if feature and condition != PROMPT else None
    if steering is not None:
        body["steering"] = steering
    resp = await client.chat(body)
    out = []
    for ch in sorted(resp["choices"], key=lambda c: c["index"]):
        text = ch["message"]["content"] or ""
        out.append(Sample(feature=feature if strength != 0 or condition != STEER else None, strength=strength,
                          max_tokens=max_tokens, prompt_id=prompt.id, index=ch["index"], text=text,
                          condition=condition,
                          tokens=len(ch.get("token_ids") or []), finish_reason=ch.get("finish_reason"),
                          scores={name: s(text) for name, s in SCORERS.items()},
                          prompt_ids=list(resp.get("prompt_token_ids") or []),
                          token_ids=list(ch.get("token_ids") or [])))
    return out


async def perplexity(client: Client, model: str, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> float | None:
    """exp(mean NLL) of ``token_ids`` after ``prompt_ids`` under the unsteered model (None if empty)."""
    if not token_ids:
        return None
    body = {"model": model, "prompt": [*prompt_ids, *token_ids], "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": 0}
    resp = await client.completion(body)
    plp = resp.get("prompt_logprobs")
    if not plp:
        raise EvalError("the server returned no prompt_logprobs; it cannot score perplexity")
    start = len(prompt_ids)
    nll = []
    for pos, tid in enumerate(token_ids, start=start):
        entry = plp[pos] or {}
        lp = (entry.get(str(tid)) or {}).get("logprob")
        if lp is None:
            raise EvalError(f"prompt_logprobs lacks the token at position {pos}")
        nll.append(-float(lp))
    return float(math.exp(sum(nll) / len(nll)))


def _progress(done: int, total: int, t0: float, what: str) -> None:
    if done == total or done % 25 == 0:
        rate = done / max(time.monotonic() - t0, 1e-9)
        print(f"  {what}: {done}/{total} ({rate:.2f}/s)", file=sys.stderr, flush=True)


async def _gather(jobs: list, concurrency: int, what: str, progress: bool) -> list:
    """Run coroutine factories with at most ``concurrency`` in flight, results in order."""
    sem = asyncio.Semaphore(concurrency)
    done = 0
    t0 = time.monotonic()

    async def one(job):
        nonlocal done
        async with sem:
            res = await job()
        done += 1
        if progress:
            _progress(done, len(jobs), t0, what)
        return res

    return await asyncio.gather(*(one(j) for j in jobs))


async def run_samples(client: Client, cfg: EvalConfig, progress: bool = True) -> tuple[str, list[Sample]]:
    """Generate and score every (feature, strength, prompt); returns the model name and the samples."""
    model = cfg.model or await client.model()
    jobs = []
    budgets = sorted({cfg.max_tokens_for(f) for f in cfg.features})
    grid: list[tuple[str | None, float, int, str]] = (
        [(None, 0.0, m, STEER) for m in budgets] if 0 in cfg.strengths else [])
    grid += [(f, s, cfg.max_tokens_for(f), STEER) for f in cfg.features for s in cfg.strengths if s != 0]
    if cfg.baseline == PROMPT:
        grid += [(f, strength, cfg.max_tokens_for(f), c) for f in cfg.features
                 for c, strength in ((PROMPT, 0.0), (BOTH, cfg.baseline_strength))]
    for feature, strength, budget, condition in grid:
        for i, p in enumerate(cfg.prompts):
            jobs.append(lambda f=feature, s=strength, m=budget, p=p, i=i, c=condition:
                        generate(client, cfg, model, f, s, m, p, i, c))
    batches = await _gather(jobs, cfg.concurrency, "generate", progress)
    samples = [s for batch in batches for s in batch]
    if cfg.perplexity:
        # Prompted outputs are scored after the neutral prompt (the steered requests' own prompt).
        neutral = {s.prompt_id: s.prompt_ids for s in samples if s.condition == STEER}
        ppl_jobs = [lambda s=s: perplexity(client, model, neutral.get(s.prompt_id, s.prompt_ids), s.token_ids)
                    for s in samples]
        for s, ppl in zip(samples, await _gather(ppl_jobs, cfg.concurrency, "perplexity", progress)):
            s.perplexity = ppl
    return model, samples
