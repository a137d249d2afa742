"""The steering op on N distinct equalizers, timed: this checkout's ``SteeringRuntime.apply``
and, with ``--before REV``, the op of an earlier commit (read with ``git show``), alternating.

    python -m clients.bench.bank_op                       # this op, N = 256, SmolLM2 sizes, bf16
    python -m clients.bench.bank_op --before 98f5c6f~1    # and the slot-stacked op before the bank

The equalizers are ``steer bench``'s EQ requests (4 named features added, 1 clamped, strengths
of their own), admitted through ``SteeringRuntime.admit`` as a worker admits them, one slot each;
each step has every one of them scheduled with ``--tokens-per-seq`` tokens (1: a decode step).
Printed: median ms per step over all layers, per round, and the bank rows the slots share.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clients.bench.engine import equalizer_requests
from steering.wire import WireRecord


def _runtime_at(rev: str):
    """``steering/worker/runtime.py`` of ``rev`` as a module, without its op registration (the
    current module owns ``torch.ops.steering``; only ``SteeringRuntime.apply`` is timed)."""
    root = Path(__file__).resolve().parents[2]
    src = subprocess.run(["git", "show", f"{rev}:steering/worker/runtime.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    src = src[: src.index("_LIB = torch.library.Library")]
    path = Path(tempfile.mkdtemp()) / "runtime_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("runtime_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["runtime_before"] = mod
    spec.loader.exec_module(mod)
    return mod


def time_op(mod, n: int, d: int, layers: int, per_seq: int, repeats: int) -> tuple[float, int]:
    """(median ms per step over all layers, most bank rows a layer holds or -1 without a bank)."""
    cfg, eas = equalizer_requests(n, d, layers, batch=n)
    rt = mod.SteeringRuntime(cfg, num_layers=layers, hidden_size=d, max_tokens=n * per_seq + 1,
                             dtype=torch.bfloat16, device=torch.device("cpu"), host_gating=True)
    slots = [rt.admit(f"r{i}", WireRecord.from_extra_args(ea)).slot for i, ea in enumerate(eas)]
    rt.begin_step(np.array(slots), np.zeros(n, np.int64), np.full(n, per_seq), np.full(n, 100),
                  np.full(n, 10), [])
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n * per_seq, d, generator=g).bfloat16()
    r = (torch.randn(n * per_seq, d, generator=g) * 5).bfloat16()

    def step() -> None:
        for layer in range(layers):
            rt.apply(h, r, layer)

    step()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        out.append((time.perf_counter() - t) * 1e3)
    rt.end_step()
    banks = getattr(rt, "banks", None)
    return statistics.median(out), max((b.used for b in banks.values()), default=0) if banks else -1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="distinct equalizers, one slot each")
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--tokens-per-seq", default="1,8", help="tokens per sequence in the step (list)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before", default=None, help="also time the op of this git revision")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import steering.worker.runtime as current

    ops = {"this": current}
    if a.before:
        ops["before"] = _runtime_at(a.before)
    rows = []
    with torch.inference_mode():
        for per in (int(x) for x in a.tokens_per_seq.split(",")):
            for _ in range(a.rounds):
                for name, mod in ops.items():
                    ms, rows_used = time_op(mod, a.n, a.d, a.layers, per, a.repeats)
                    rows.append({"op": name, "tokens": a.n * per, "ms_per_step": ms, "bank_rows": rows_used})
                    print(f"{name:6s} T={a.n * per:5d}: {ms:8.1f} ms per step ({a.layers} layers)"
                          + (f", bank rows per layer ≤ {rows_used}" if rows_used >= 0 else ""))
    if a.json:
        Path(a.json).write_text(json.dumps({"n": a.n, "d": a.d, "layers": a.layers, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
