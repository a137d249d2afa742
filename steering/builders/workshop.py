"""The feature workshop's job: one custom feature from example pairs — fitted, calibrated and
written as a one-feature pack — in a process of its own.

The server (:mod:`server.workshop.jobs`) runs ``python -m steering.builders.workshop OUT_DIR``
with the job as one JSON object on stdin (:class:`JobSpec`) and reads JSON lines on stdout:
``{"stage": "train"|"calibrate", "progress": p}`` while it works, then ``{"done": OUT_DIR}`` or
``{"error": MESSAGE}``. The exit status is 0 only when ``OUT_DIR`` holds a complete pack (the
server loads it through the one pack loader, sha256 and all, before it keeps anything). Torch
uses ``STEER_WORKSHOP_THREADS`` threads (set before torch is imported), and with
``STEER_WORKSHOP_IDLE=1`` the process runs under ``SCHED_IDLE``, so a job leaves the engine the
cores it wants.

Semantics:
  fit        ``mean_diff`` (difference of means, layer scanned on held-out pairs), ``vector`` or
             ``lowrank`` (trained, :mod:`steering.builders.train`), through
             :func:`steering.builders.trained.build_trained` on a one-concept recipe — the same
             code and units as the bundled packs.
  calibrate  a dose curve on neutral prompts of the corpora's calibration split (none of them is
             in the feature's data): at each dose × the feature's unit, greedy ``CAL_TOKENS``
             tokens on each of ``CAL_PROMPTS`` prompts through :func:`steering.hf.hf_steering`
             with the program the server's compiler makes of ``{"features": {name: dose}}``;
             per dose
               score = the concept's presence in the generated text, read back by the unsteered
                       model: mean h·d̂ over its tokens at the readout layer, rescaled so that the
                       training negatives score 0 and the positives 1;
               ppl   = median perplexity of the generated text under the unsteered model.
             Strength 1 becomes the largest dose reached from the smallest up while ppl stays
             within ``MAX_PPL_RATIO`` × the unsteered one (the bundled packs' rule: the strongest
             fluent dose), else the smallest dose; the curve is kept in the feature's
             ``calibration.effect``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

WorkshopMethod = Literal["mean_diff", "vector", "lowrank"]

CUSTOM_PACK = "custom"
"""The catalog pack that holds every workshop feature (``custom/<name>``)."""
DOSES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
"""Calibration doses, in units of the feature's built scale (the norm unit: ``DOSE_FRACTION`` of
the median residual norm): the bundled packs' grid (``steer pack calibrate``), up to 1.5, in
quarter steps. (Up to 2, the eight example pairs' feature took 2 on the 0.5B, fluent on these
prompts and 2.4 × the perplexity on the eval's; see docs/workshop.md.)"""
CAL_PROMPTS = 24
"""Calibration prompts. (12 left the median perplexity ratio at one dose 1.74 here and 1.25 on
the eval's held-out prompts for the same feature; see docs/workshop.md.)"""
CAL_TOKENS = 40
MAX_PPL_RATIO = 1.5


@dataclass
class JobSpec:
    """What one workshop job builds (the server fills every field; see server/workshop/models.py)."""

    name: str
    """Local feature name (the catalog shows ``custom/<name>``)."""
    description: str
    pairs: list[dict[str, str]]
    """``{"prompt", "positive", "negative"}`` each; ``prompt`` may be empty (a default is used)."""
    method: WorkshopMethod
    layers: list[int]
    """Trained methods: the layers written; mean_diff: the candidate layers scanned."""
    model_dir: str
    calibrate: bool = True
    seed: int = 0
    steps: int = 120
    time_budget_s: float = 600.0
    threads: int = 1
    data: dict[str, Any] = field(default_factory=dict)
    """Where the pairs came from (``{"source": "examples"|"generated", ...}``), kept in the pack."""


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def recipe_for(spec: JobSpec) -> dict[str, Any]:
    """The one-concept recipe the bundled builders run for ``spec``."""
    concept: dict[str, Any] = {
        "name": spec.name, "description": spec.description, "tags": ["custom", "workshop"],
        "pairs": [{"prompt": p.get("prompt") or "Tell me about your day.", "pos": p["positive"],
                   "neg": p["negative"]} for p in spec.pairs]}
    train: dict[str, Any] = {"method": spec.method, "data": "recipe"}
    if spec.method != "mean_diff":
        train.update(layers=list(spec.layers), steps=spec.steps, time_budget_s=spec.time_budget_s,
                     seed=spec.seed)
    concept["train"] = train
    return {"pack": {"name": f"{CUSTOM_PACK}-{spec.name}", "version": "1.0.0",
                     "description": f"Workshop feature {spec.name}: {spec.description}",
                     "license": "Apache-2.0"},
            "model": spec.model_dir, "seed": spec.seed, "layers": list(spec.layers),
            "method": "mean_diff", "heldout": 0.25, "format": "assistant",
            "calibration": {"corpus": ["chitchat", "wiki"], "samples": 60},
            "strength_range": [-1.5, 1.5], "concepts": [concept]}


def neutral_prompts(n: int = CAL_PROMPTS) -> list[str]:
    """User turns of the corpora's calibration split (never training data), round-robin."""
    from steering.builders import corpora

    out: list[str] = []
    for _, conv in corpora.interleave(["chitchat", "wiki"], "calibration"):
        text = next((m["content"] for m in conv if m["role"] == "user" and m["content"].strip()), None)
        if text:
            out.append(text[:300])
        if len(out) >= n:
            break
    return out


def dose_curve(pack_dir: Path, spec: JobSpec, on_dose: Callable[[int, int], None] | None = None
               ) -> dict[str, Any]:
    """The calibration record of the pack's one feature (see the module docstring)."""
    import numpy as np
    import torch

    from steering.builders import collect
    from steering.config import SteeringConfig
    from steering.hf import hf_steering
    from steering.packs.registry import PackRegistry
    from steering.request import build_compiler

    model, tok = collect.load_model(spec.model_dir)
    n_layers = collect.num_layers(model)
    reg = PackRegistry.from_paths([pack_dir], spec.model_dir)
    feature = reg.resolve(spec.name)
    compiler = build_compiler(SteeringConfig(), model.config.hidden_size, n_layers, packs=reg)
    layer = feature.layer
    unit = np.asarray(feature.direction, np.float64)
    unit = unit / np.linalg.norm(unit)

    def readout(texts: list[str], prompts: list[str] | None = None) -> np.ndarray:
        """Mean h·d̂ over each text's assistant tokens at the readout layer (unsteered model)."""
        enc = [collect.encode_chat(tok, ([{"role": "user", "content": p}] if p else [])
                                   + [{"role": "assistant", "content": t if t.strip() else "..."}],
                                   content_roles=("assistant",), max_tokens=128)
               for p, t in zip(prompts or [""] * len(texts), texts)]
        acts = collect.sample_activations(model, enc, [layer])[layer]  # [n, d]
        return acts.astype(np.float64) @ unit

    pos = readout([p["positive"] for p in spec.pairs], [p.get("prompt", "") for p in spec.pairs])
    neg = readout([p["negative"] for p in spec.pairs], [p.get("prompt", "") for p in spec.pairs])
    lo, hi = float(np.mean(neg)), float(np.mean(pos))
    span = hi - lo if abs(hi - lo) > 1e-6 else 1.0

    prompts = neutral_prompts()
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    batch = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)

    def generate(dose: float) -> list[str]:
        steering = {"features": {spec.name: dose}} if dose else None
        comp = compiler.compile(steering) if steering else None
        kwargs = dict(max_new_tokens=CAL_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            if comp is None:
                out = model.generate(**batch, **kwargs)
            else:
                with hf_steering(model, comp.program):
                    out = model.generate(**batch, **kwargs)
        return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def perplexity(texts: list[str]) -> float:
        vals = []
        with torch.no_grad():
            for p, t in zip(prompts, texts):
                if not t.strip():
                    vals.append(float("inf"))
                    continue
                e = collect.encode_chat(tok, [{"role": "user", "content": p},
                                              {"role": "assistant", "content": t}],
                                        content_roles=("assistant",))
                ids = torch.tensor([e.ids])
                logits = model(ids).logits[0, :-1].float()
                lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
                mask = torch.tensor(e.mask[1:], dtype=torch.bool)  # predicted content tokens
                vals.append(float(torch.exp(-lp[mask].mean())) if mask.any() else float("inf"))
        return float(np.median(vals))

    curve = []
    doses = (0.0, *DOSES)
    for i, dose in enumerate(doses):
        texts = generate(dose)
        score = float(np.mean((readout(texts, prompts) - lo) / span))
        curve.append({"dose": dose, "score": round(score, 4), "ppl_median": round(perplexity(texts), 4),
                      "sample": texts[0][:160]})
        if on_dose is not None:
            on_dose(i + 1, len(doses))
    base = curve[0]["ppl_median"]
    for row in curve:
        row["ppl_ratio"] = round(row["ppl_median"] / base, 4) if base > 0 else None
    chosen, fluent = strongest_fluent(curve[1:])
    return {"scorer": "readout (unsteered model, negatives 0, positives 1)", "chosen": chosen,
            "curve": curve, "fluent": fluent,
            "run": {"method": "effect: strength 1 = the largest fluent dose (steering/builders/workshop.py)",
                    "prompts": "corpora calibration split (user turns)", "n_prompts": len(prompts),
                    "max_tokens": CAL_TOKENS, "doses": list(DOSES), "max_ppl_ratio": MAX_PPL_RATIO,
                    "greedy": True}}


def strongest_fluent(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(the chosen row, whether it is fluent) of dose rows in ascending order: the last one
    reached from the first while ``ppl_ratio`` ≤ ``MAX_PPL_RATIO`` (a fluent dose past a
    non-fluent one is noise, not a licence), else the first."""
    chosen = None
    for row in rows:
        if row["ppl_ratio"] is None or row["ppl_ratio"] > MAX_PPL_RATIO:
            break
        chosen = row
    return (chosen, True) if chosen is not None else (rows[0], False)


def apply_calibration(pack_dir: Path, name: str, effect: dict[str, Any]) -> None:
    """Strength 1 := the chosen dose: the feature's ``scale`` times it, the curve kept."""
    path = pack_dir / "pack.json"
    manifest = json.loads(path.read_text())
    for f in manifest["features"]:
        if f["name"] == name:
            cal = f["calibration"]
            built = float(cal["scale"])
            cal["built_scale"] = built
            cal["scale"] = built * float(effect["chosen"]["dose"])
            cal["method"] = "effect"
            for row in effect["curve"]:
                row["strength"] = round(row["dose"] / effect["chosen"]["dose"], 4)
            cal["effect"] = effect
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run(spec: JobSpec, out: Path) -> Path:
    """Build the feature's pack in ``out`` (see the module docstring); returns ``out``."""
    from steering.builders.trained import build_trained

    t0 = time.monotonic()
    _emit({"stage": "train", "progress": 0.0})
    recipe = recipe_for(spec)
    build_trained(recipe, out, spec.model_dir, progress=False,
                  on_step=lambda i, n: _emit({"stage": "train", "progress": i / n}))
    path = out / "pack.json"
    manifest = json.loads(path.read_text())
    for f in manifest["features"]:
        f["workshop"] = {"data": spec.data, "method": spec.method, "pairs": len(spec.pairs),
                         "examples": spec.pairs}
    manifest["provenance"]["workshop"] = {"seconds_train": round(time.monotonic() - t0, 1)}
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    _emit({"stage": "train", "progress": 1.0})
    if spec.calibrate:
        _emit({"stage": "calibrate", "progress": 0.0})
        t1 = time.monotonic()
        effect = dose_curve(out, spec, lambda i, n: _emit({"stage": "calibrate", "progress": i / n}))
        effect["run"]["seconds"] = round(time.monotonic() - t1, 1)
        apply_calibration(out, spec.name, effect)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m steering.builders.workshop OUT_DIR < job.json\n")
        return 2
    spec = JobSpec(**json.loads(sys.stdin.read()))
    try:
        import torch

        torch.set_num_threads(max(1, spec.threads))
        run(spec, Path(args[0]))
    except Exception as exc:  # noqa: BLE001  (the server shows the message to the job's owner)
        traceback.print_exc()  # to stderr: the server logs its tail
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _emit({"done": args[0]})
    return 0


if __name__ == "__main__":
    _threads = os.environ.get("STEER_WORKSHOP_THREADS")
    if _threads:  # before torch is imported anywhere
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = _threads
    if os.environ.get("STEER_WORKSHOP_IDLE") == "1":
        # SCHED_IDLE: run only on cycles the engine leaves; a niced process still takes whole
        # time slices from the engine's OpenMP threads, which then all wait at their barrier.
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            os.nice(19)
    sys.exit(main())
