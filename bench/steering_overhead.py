"""Steering overhead at the engine level: generated tok/s with steering ÷ the same model
served by a vLLM engine without the plugin, measured in one run, alternating, median of repeats.

Scenarios (batch B × N tokens, ignore_eos so every run generates B·N tokens):
  S1  plugin installed, no request steered
  S2  every request the same additive vector at all steered layers
  S3  B distinct configs in one batch (a different vector per request, all layers)
  S4  clamp of K features per request at one middle layer, distinct per request

    python bench/steering_overhead.py --repeats 3 --out bench/results/steering_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

import numpy as np  # noqa: E402

IDLE_S = 2.0
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rainbows form.",
    "Describe your ideal weekend.",
    "What makes a good cup of coffee?",
    "Tell me about the history of bicycles.",
    "Give advice to a new gardener.",
    "Why do cats purr?",
    "Describe a busy market in the morning.",
]


def build_engine(model: str, args, steering: bool, cfg=None):
    from vllm import LLM

    from steering.vllm_plugin import engine_kwargs

    kw = engine_kwargs(cfg) if steering else {}
    return LLM(
        model=model, dtype=args.dtype, enforce_eager=args.enforce_eager, seed=0,
        max_model_len=1024, max_num_seqs=max(args.batch, 16), enable_prefix_caching=False, **kw,
    )


def timed_generate(llm, prompts, extra_args_list, n_tokens: int) -> float:
    from vllm import SamplingParams

    params = [
        SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True, extra_args=ea)
        for ea in extra_args_list
    ]
    # vLLM's idle workers busy-poll their shared-memory queue for ~1 s after each step: let the
    # other engine go quiet before timing this one (two cores; a spinning reader halves speed).
    time.sleep(IDLE_S)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n == len(prompts) * n_tokens, n
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: the bundled SmolLM2)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clamp-features", type=int, default=32)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from server.model_store import resolve_model
    from steering.config import SteeringConfig
    from steering.request import SteeringCompiler

    model = str(resolve_model(args.model))
    cfg_json = json.load(open(os.path.join(model, "config.json")))
    d, n_layers = cfg_json["hidden_size"], cfg_json["num_hidden_layers"]
    cfg = SteeringConfig(max_slots=max(args.batch, 16), max_features=args.clamp_features)
    comp = SteeringCompiler(cfg, d, n_layers)
    rng = np.random.default_rng(0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]

    def vec_all_layers(v, scale=4.0):
        return {"vectors": [{"layer": L, "values": v.tolist(), "scale": scale / n_layers} for L in range(n_layers)]}

    v0 = rng.standard_normal(d)
    same = comp.compile(vec_all_layers(v0)).extra_args()
    distinct = [comp.compile(vec_all_layers(rng.standard_normal(d))).extra_args() for _ in range(args.batch)]
    mid = n_layers // 2
    clamps = []
    for _ in range(args.batch):
        vs = [{"layer": mid, "values": rng.standard_normal(d).tolist(), "mode": "clamp", "target": 1.0}
              for _ in range(args.clamp_features)]
        clamps.append(comp.compile({"vectors": vs}).extra_args())
    scenarios = {
        "S1_idle": [None] * args.batch,
        "S2_same_vector_all_layers": [same] * args.batch,
        "S3_distinct_configs": distinct,
        f"S4_clamp_K{args.clamp_features}": clamps,
    }

    t = time.perf_counter()
    base = build_engine(model, args, steering=False)
    steer = build_engine(model, args, steering=True, cfg=cfg)
    print(f"engines ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    # warm-up both
    timed_generate(base, prompts, [None] * args.batch, 8)
    for ea in scenarios.values():
        timed_generate(steer, prompts, ea, 8)

    samples: dict[str, list[float]] = {"baseline": []}
    samples.update({k: [] for k in scenarios})
    paired: dict[str, list[float]] = {k: [] for k in scenarios}
    for r in range(args.repeats):
        for name, ea in scenarios.items():  # alternate: baseline, scenario, baseline, ...
            b = timed_generate(base, prompts, [None] * args.batch, args.tokens)
            s = timed_generate(steer, prompts, ea, args.tokens)
            samples["baseline"].append(b)
            samples[name].append(s)
            paired[name].append(s / b)  # adjacent runs: robust to slow drift of the machine
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = []
    print(f"\nbatch {args.batch} × {args.tokens} tokens, dtype {args.dtype}, "
          f"{'eager' if args.enforce_eager else 'compiled'}, median of {args.repeats}")
    print(f"{'scenario':32s} {'tok/s':>9s} {'ratio':>7s} {'paired':>7s}  (paired = median of s/b "
          "over adjacent runs)")
    print(f"{'baseline (no plugin)':32s} {med['baseline']:9.1f} {1.0:7.3f}")
    for name in scenarios:
        ratio = med[name] / med["baseline"]
        pr = statistics.median(paired[name])
        rows.append({"scenario": name, "tok_s": med[name], "ratio": ratio, "paired_ratio": pr,
                     "samples": samples[name], "paired": paired[name]})
        print(f"{name:32s} {med[name]:9.1f} {ratio:7.3f} {pr:7.3f}")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "args": vars(args), "baseline_tok_s": med["baseline"], "baseline_samples": samples["baseline"],
        "scenarios": rows,
    }
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
