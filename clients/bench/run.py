"""``steer bench``: every steering benchmark in one command; prints a table, writes JSON and PNG.

    steer bench --out docs/benchmarks/results/cpu            # the full run (~22 min on the 2-core CPU)
    steer bench --tiny --out /tmp/b                # 2 requests × 8 tokens: checks the harness only

Parts (``--only`` picks some):
  engine  S1–S4 tok/s ratios against a vLLM engine without the plugin (clients/bench/engine.py)
  hf      transformers generate() + hooks with S2's steering at the same batch (clients/bench/hf_baseline.py)
  server  TTFT / inter-token latency p50/p99 of S1–S3 vs a ``--no-steering`` server at several
          concurrencies, and S5: TTFT of inline base64 vectors vs named features (clients/bench/server.py)
  openmp  the plugin-free engine with vLLM's GNU OpenMP vs Intel's libiomp5 (STEER_CPU_OPENMP=intel)
  monitor M1: a batch with half its requests monitored vs the same requests unmonitored, same
          server, alternated rounds, ratio of medians (clients/bench/monitors.py; not in the default
          set: ``--only monitor``)
  equalizers  EQ: N distinct equalizers (N = 16, 64, 256, 1024; each request its own mix of 4
          added and 1 clamped named feature) vs the same requests unsteered, with slots = the
          engine's batch, and the bytes one slot costs (clients/bench/engine.py; not in the default
          set: ``--only equalizers``, ~1 h on the 2-core CPU at 128 tokens)

Each part runs in a child process (engines are torn down completely before the next part); only
one engine runs at a time. ``--url``/``--api-key`` point the server part at a running steering
server instead; its unsteered requests are then the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from server import vllm_env  # noqa: F401,E402  (the CPU defaults steer serve runs with)

TARGETS = {"S1": 0.99, "S2": 0.97, "S3": 0.97, "S3R": 0.97, "S4": 0.97, "S5_ms": 5.0, "hf_ratio": 2.5,
           "EQ": 0.97, "EQ_1024": 0.95}
# The folder holding the packages (a checkout's root, or site-packages when installed): the
# working directory of each part's ``python -m clients.bench.run`` child, never a data location.
REPO = Path(__file__).resolve().parents[2]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _scenario_list(s: str) -> list[str]:
    names = [x.strip().upper() for x in s.split(",") if x.strip()]
    bad = sorted(set(names) - {"S1", "S2", "S3", "S3R", "S4"})
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown scenarios {bad or s!r}; choose from S1,S2,S3,S3R,S4")
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="steering benchmarks: ratios vs the same engine without steering",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/benchmarks/results/latest", help="folder for bench.json and bench.png")
    p.add_argument("--tiny", action="store_true", help="2 requests × 8 tokens, 1 repeat (harness check)")
    p.add_argument("--only", default="engine,hf,server,openmp", help="comma list of parts")
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=None, help="engine batch (default 16)")
    p.add_argument("--tokens", type=int, default=None, help="generated tokens per request (default 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per scenario (default 5)")
    p.add_argument("--sweep", default=None, help="S3 distinct-config counts (default 1,4,16)")
    p.add_argument("--clamp-k", default=None, help="S4 clamp sizes (default 8,32)")
    p.add_argument("--max-slots", type=int, default=16,
                   help="the S1-S4 steering engine's slot limit (default 16; steer serve's default "
                        "is the engine's batch); S3 sweeps up to it, e.g. --max-slots 256 --sweep 16,64,256")
    p.add_argument("--scenarios", default=None, type=_scenario_list,
                   help="engine scenarios to run, comma list of S1,S2,S3,S3R,S4 (default: all)")
    p.add_argument("--equalizers", default=None,
                   help="EQ's numbers of distinct equalizers (default 16,64,256,1024)")
    p.add_argument("--equalizer-batch", type=int, default=None,
                   help="EQ's engine batch (max_num_seqs) and steering slots (default 256)")
    p.add_argument("--concurrency", default=None, help="server part concurrencies (default 1,8,16)")
    p.add_argument("--hf-dtype", default=None,
                   help="dtypes of the transformers baseline, comma list (default float32,bfloat16; "
                        "the faster one is the baseline)")
    p.add_argument("--hf-paired-dtype", default=None,
                   help="dtype of the transformers baseline timed next to each S2 repeat in the engine "
                        "part (default bfloat16, the faster on CPUs with bf16 support; 'none' skips it)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--url", default=None, help="use this running steering server for the server part")
    p.add_argument("--api-key", default=None)
    p.set_defaults(func=main)


def settings(a: argparse.Namespace) -> dict[str, Any]:
    tiny = a.tiny
    return {
        "batch": a.batch or (2 if tiny else 16), "tokens": a.tokens or (8 if tiny else 128),
        "repeats": a.repeats or (1 if tiny else 5),
        "sweep": _ints(a.sweep) if a.sweep else ([1] if tiny else [1, 4, 16]),
        "clamp_k": _ints(a.clamp_k) if a.clamp_k else ([8] if tiny else [8, 32]),
        "max_slots": a.max_slots, "scenarios": a.scenarios,
        "equalizers": _ints(a.equalizers) if a.equalizers else ([2] if tiny else [16, 64, 256, 1024]),
        "equalizer_batch": a.equalizer_batch or (2 if tiny else 256),
        "concurrency": _ints(a.concurrency) if a.concurrency else ([1, 2] if tiny else [1, 8, 16]),
        "server_tokens": a.tokens or (8 if tiny else 64),
        "server_requests": 2 if tiny else None,  # None: 2 × concurrency per level
        "server_rounds": 1 if tiny else 3,
        "s5_requests": 2 if tiny else 20,
        "enforce_eager": a.enforce_eager or tiny,
        "dtype": a.dtype,
        "hf_paired_dtype": None if (a.hf_paired_dtype or "").lower() == "none"
        else a.hf_paired_dtype or ("float32" if tiny else "bfloat16"),
        "hf_dtypes": (a.hf_dtype or ("float32" if tiny else "float32,bfloat16")).split(","), "idle_s": 0.2 if tiny else 2.0,
    }


# -- parts (each runs in a child process) ----------------------------------------------------
def _phase_engine(spec: dict) -> dict:
    s, model = spec["settings"], spec["model"]
    from clients.bench.engine import EngineBenchConfig, run_engine_scenarios

    c = EngineBenchConfig(model=model, dtype=s["dtype"], batch=s["batch"], tokens=s["tokens"],
                          repeats=s["repeats"], sweep=s["sweep"], clamp_k=s["clamp_k"],
                          max_slots=s["max_slots"], only=s["scenarios"],
                          enforce_eager=s["enforce_eager"], idle_s=s["idle_s"],
                          hf_dtype=s["hf_paired_dtype"])
    res = run_engine_scenarios(c, log=_log)
    return {"config": asdict(c), **res}


def _phase_equalizers(spec: dict) -> dict:
    s, model = spec["settings"], spec["model"]
    from clients.bench.engine import EngineBenchConfig, run_equalizer_scenarios

    c = EngineBenchConfig(model=model, dtype=s["dtype"], tokens=s["tokens"], repeats=s["repeats"],
                          equalizers=s["equalizers"], equalizer_batch=s["equalizer_batch"],
                          enforce_eager=s["enforce_eager"], idle_s=s["idle_s"], hf_dtype=None)
    res = run_equalizer_scenarios(c, log=_log)
    return {"config": asdict(c), **res}


def _phase_hf(spec: dict) -> dict:
    s, model = spec["settings"], spec["model"]
    from clients.bench.hf_baseline import run_hf_baseline

    runs = [run_hf_baseline(model, s["batch"], s["tokens"], s["repeats"], dt, log=_log) for dt in s["hf_dtypes"]]
    best = max(runs, key=lambda r: r["tok_s"])  # the alternative at its best
    return {**best, "runs": runs}


def _phase_server(spec: dict) -> dict:
    s, model, url, api_key = spec["settings"], spec["model"], spec["url"], spec["api_key"]
    from clients.bench.server import run_latency, run_s5
    from clients.launch import local_server

    lat = dict(concurrencies=s["concurrency"], tokens=s["server_tokens"],
               requests_per_level=s["server_requests"], log=_log)
    flags = ["--model", model, "--dtype", s["dtype"], "--max-model-len", "1024"]
    if s["enforce_eager"]:
        flags.append("--enforce-eager")
    out: dict[str, Any] = {}
    scen = ["S1", "S2", "S3"]
    if url:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        out["baseline_kind"] = "unsteered requests on the same steering server"
        out["latency"] = run_latency({sc: (url, headers) for sc in ["base", *scen]}, **lat)
        out["s5"] = run_s5(url, headers, s["s5_requests"], "formality", log=_log)
        return out
    # Both servers stay up and take turns (base, S1, S2, S3, base, …), so a slow minute of the
    # machine hits every scenario alike; idle_s of quiet before each run lets the other's workers sleep.
    out["baseline_kind"] = "a --no-steering server (no plugin), same flags, alternating with the steering server"
    with local_server([*flags, "--no-steering"]) as base, local_server(flags) as srv:
        servers = {"base": (base.url, base.headers), **{sc: (srv.url, srv.headers) for sc in scen}}
        out["latency"] = run_latency(servers, rounds=s["server_rounds"], idle_s=s["idle_s"], **lat)
        out["s5"] = run_s5(srv.url, srv.headers, s["s5_requests"], "formality", log=_log)
    return out


def _phase_openmp(spec: dict) -> dict:
    s, model = spec["settings"], spec["model"]
    from clients.bench.engine import EngineBenchConfig, run_openmp_comparison

    c = EngineBenchConfig(model=model, dtype=s["dtype"], batch=s["batch"], tokens=s["tokens"],
                          repeats=s["repeats"], enforce_eager=s["enforce_eager"], idle_s=s["idle_s"])
    return run_openmp_comparison(c, log=_log)


def _phase_monitor(spec: dict) -> dict:
    s, model, url, api_key = spec["settings"], spec["model"], spec["url"], spec["api_key"]
    from clients.bench.monitors import run_monitor_scenario
    from clients.launch import local_server

    kw = dict(batch=s["batch"], tokens=s["server_tokens"], rounds=s["repeats"], log=_log)
    if url:
        return run_monitor_scenario(url, {"Authorization": f"Bearer {api_key}"} if api_key else {}, **kw)
    flags = ["--model", model, "--dtype", s["dtype"], "--max-model-len", "1024"]
    if s["enforce_eager"]:
        flags.append("--enforce-eager")
    with local_server(flags) as srv:
        return run_monitor_scenario(srv.url, srv.headers, **kw)


PHASES = {"engine": _phase_engine, "hf": _phase_hf, "server": _phase_server, "openmp": _phase_openmp,
          "monitor": _phase_monitor, "equalizers": _phase_equalizers}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_phase_child(name: str, spec: dict) -> dict:
    """Run one part in ``python -m clients.bench.run PART SPEC OUT`` and return its JSON result."""
    tmp = Path(tempfile.mkdtemp(prefix="steer-bench-"))
    (tmp / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "clients.bench.run", name, str(tmp / "spec.json"), str(tmp / "out.json")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"bench part {name!r} failed with exit code {proc.returncode}")
    res = json.loads((tmp / "out.json").read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


# -- summary ---------------------------------------------------------------------------------
def summarize(result: dict) -> list[dict]:
    """One row per claim: name, measured value, target, met."""
    rows = []
    eng = result.get("engine")
    if eng:
        for r in eng["scenarios"]:
            tgt = TARGETS[r["scenario"].split("_")[0]]
            rows.append({"claim": f"{r['scenario']} tok/s ÷ no-plugin engine (batch {r['batch']})",
                         "value": r["paired_ratio"], "ratio_of_medians": r["ratio"], "target": f">= {tgt}",
                         "met": r["paired_ratio"] >= tgt})
            if r.get("same_engine_ratio") is not None:
                rows.append({"claim": f"{r['scenario']} tok/s ÷ same requests unsteered, same engine",
                             "value": r["same_engine_ratio"], "target": "report", "met": None})
        by_name = {r["scenario"]: r for r in eng["scenarios"]}
        for name, r in by_name.items():
            add = by_name.get(name.replace("S3R_", "S3_")) if name.startswith("S3R_") else None
            if add is not None:
                rows.append({"claim": f"{name} (lowrank) tok/s ÷ {add['scenario']} (add), each ÷ its paired "
                                      "no-plugin run", "value": r["paired_ratio"] / add["paired_ratio"],
                             "target": "within noise of 1", "met": None})
    eq = result.get("equalizers")
    for r in eq["scenarios"] if eq else ():
        tgt = TARGETS.get(r["scenario"], TARGETS["EQ"])
        rows.append({"claim": f"{r['scenario']}: {r['distinct_configs']} distinct equalizers, tok/s ÷ "
                              f"the same requests unsteered, same engine ({r['slots']} slots)",
                     "value": r["same_engine_ratio"], "target": f">= {tgt}",
                     "met": r["same_engine_ratio"] >= tgt})
        rows.append({"claim": f"{r['scenario']} tok/s ÷ no-plugin engine", "value": r["paired_ratio"],
                     "target": "report", "met": None})
    if eq:
        rows.append({"claim": "EQ: KiB of worker tables per steering slot", "value": eq["slot_bytes"] / 2**10,
                     "target": "report", "met": None})
        rows.append({"claim": "EQ: MiB of the workers' feature bank (all layers)",
                     "value": eq["bank_bytes"] / 2**20, "target": "report", "met": None})
    hf = result.get("hf")
    s2 = next((r for r in eng["scenarios"] if r["scenario"] == "S2"), None) if eng else None
    if s2 and s2.get("hf"):
        h = s2["hf"]
        rows.append({"claim": f"S2 steered tok/s ÷ transformers+hooks ({h['dtype']}, batch {s2['batch']}), "
                              "paired runs",
                     "value": h["paired_ratio"], "target": f">= {TARGETS['hf_ratio']}",
                     "met": h["paired_ratio"] >= TARGETS["hf_ratio"]})
    if s2 and hf:  # judged against the target only when there is no paired measurement
        ratio = s2["tok_s"] / hf["tok_s"]
        judged = not s2.get("hf")
        rows.append({"claim": f"S2 steered tok/s over transformers+hooks ({hf['dtype']}, batch {hf['batch']}), "
                              "separate part",
                     "value": ratio, "target": f">= {TARGETS['hf_ratio']}" if judged else "report",
                     "met": ratio >= TARGETS["hf_ratio"] if judged else None})
    mon = result.get("monitor")
    if mon:
        rows.append({"claim": f"M1 tok/s, half the batch monitored ÷ same requests unmonitored "
                              f"(batch {mon['batch']})", "value": mon["tok_s_ratio"], "target": "report",
                     "met": None})
        rows.append({"claim": "M1 monitored requests' ITL p50 ÷ same requests unmonitored",
                     "value": mon["itl_p50_ratio"], "target": "report", "met": None})
        rows.append({"claim": "M1 tok/s, median of per-round paired ratios",
                     "value": mon["paired_tok_s_ratio"], "target": "report", "met": None})
    srv = result.get("server")
    if srv:
        s5 = srv["s5"]
        rows.append({"claim": "S5 TTFT inline base64 vector − named feature (ms)",
                     "value": s5["inline_minus_named_ms"], "target": f"<= {TARGETS['S5_ms']}",
                     "met": s5["inline_minus_named_ms"] <= TARGETS["S5_ms"]})
        base = {r["concurrency"]: r for r in srv["latency"] if r["scenario"] == "base"}
        for r in srv["latency"]:
            if r["scenario"] == "base":
                continue
            b = base[r["concurrency"]]
            rows.append({"claim": f"{r['scenario']} c={r['concurrency']} ITL p50 / baseline",
                         "value": r["itl_s"]["p50"] / b["itl_s"]["p50"], "target": "report", "met": None})
    omp = result.get("openmp")
    if omp and "paired_ratio" in omp:
        rows.append({"claim": f"no-plugin engine tok/s, Intel OpenMP (STEER_CPU_OPENMP=intel) ÷ GNU OpenMP "
                              f"(batch {omp['batch']})",
                     "value": omp["paired_ratio"], "target": "report", "met": None})
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="steering benchmarks")
    for col in ("claim", "value", "target", "met"):
        t.add_column(col)
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        t.add_row(r["claim"], f"{r['value']:.3f}", r["target"], met)
    Console(stderr=False).print(t)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    eng = result.get("engine")
    ax = axes[0]
    if eng:
        names = [r["scenario"] for r in eng["scenarios"]]
        ax.bar(names, [r["paired_ratio"] for r in eng["scenarios"]], color="#4c72b0", label="paired median")
        same_label = "÷ unsteered, same engine"  # legend entry on the first marker only
        for i, r in enumerate(eng["scenarios"]):
            ax.scatter([i] * len(r["paired"]), r["paired"], color="k", s=10, zorder=3)
            if r.get("same_engine_ratio") is not None:
                ax.scatter([i + 0.25], [r["same_engine_ratio"]], marker="D", color="#dd8452", s=22, zorder=4,
                           label=same_label)
                same_label = None
        ax.axhline(1.0, color="gray", lw=1)
        ax.axhline(0.97, color="red", lw=1, ls="--", label="0.97 target")
        ax.set_ylabel("steered tok/s ÷ no-plugin tok/s")
        ax.set_title("engine: throughput ratio (dots = repeats)")
        ax.legend(loc="lower right")
    ax = axes[1]
    srv = result.get("server")
    if srv:
        for sc, color in (("base", "gray"), ("S1", "#4c72b0"), ("S2", "#dd8452"), ("S3", "#55a868")):
            pts = [(r["concurrency"], r["itl_s"]["p50"] * 1e3) for r in srv["latency"] if r["scenario"] == sc]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=sc)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("inter-token latency p50 (ms)")
        ax.set_title("server: ITL p50 vs concurrency")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(a: argparse.Namespace) -> int:
    s = settings(a)
    from steering.model_store import resolve_model

    model = str(resolve_model(a.model))
    parts = [p for p in a.only.split(",") if p]
    bad = set(parts) - set(PHASES)
    if bad:
        raise SystemExit(f"unknown parts {sorted(bad)}; choose from {sorted(PHASES)}")
    spec = {"settings": s, "model": model, "url": a.url, "api_key": a.api_key}
    result: dict[str, Any] = {
        "command": "steer bench " + " ".join(sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else []), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "model": model, "settings": s, "targets": TARGETS,
    }
    for part in parts:
        _log(f"== {part} ==")
        result[part] = _run_phase_child(part, spec)
    result["summary"] = summarize(result)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "bench.png")
    print_table(result["summary"])
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":  # child-process entry: python -m clients.bench.run PART SPEC.json OUT.json
    _part, _spec, _out = sys.argv[1:4]
    Path(_out).write_text(json.dumps(PHASES[_part](json.loads(Path(_spec).read_text()))))
