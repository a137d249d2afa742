"""The two ways the worker computes clamp entries with host gating, timed against each other, to
place ``steering.worker.runtime.GATHER_COLUMNS_PER_ENTRY`` (where gathering each token's bank rows
starts to win over matmuls across the bank's used columns).

    python -m clients.bench.clamp_paths                     # the grid below, ~2 min on the 2-core CPU
    python -m clients.bench.clamp_paths --tokens 16 --slots 2,17 --k 8 --json out.json

"columns": two matmuls over the feature bank's used columns (every slot's K rows are distinct
here, so (n_hi - 1)·K columns: the worst case; named features share rows), each token's
coefficients gathered and scattered over them — work grows with the used columns. "gathered":
each token's own K bank rows gathered and applied with batched mat-vecs, in blocks of
``GATHER_CHUNK`` tokens — work independent of the bank. The runtime is
``clients.bench.gpu_op.make_runtime``'s with host gating: tokens spread over slots 0..n_hi-1,
every slot but 0 holding K random entries, half of them rectified. Times are medians of
``--repeats`` blocks, µs per call of the op at one layer; ``columns_per_entry`` is the bank's
used columns over K, the quantity the constant bounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from clients.bench.gpu_op import make_runtime
from steering.worker import runtime as rt_mod


def _time(fn, calls: int, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(out)


def run(d: int, tokens: list[int], slots: list[int], ks: list[int], dtype, repeats: int, log=print) -> list[dict]:
    rows = []
    saved = rt_mod.GATHER_COLUMNS_PER_ENTRY
    try:
        for k in ks:
            for t in tokens:
                for n_hi in slots:
                    rt = make_runtime(d, t, n_hi - 1, k, dtype, torch.device("cpu"), host_gating=True)
                    g = torch.Generator().manual_seed(1)
                    h = torch.randn(t, d, generator=g).to(dtype)
                    r = (torch.randn(t, d, generator=g) * 5).to(dtype)
                    out = {}
                    for path, above in (("columns", 1 << 30), ("gathered", 0)):
                        rt_mod.GATHER_COLUMNS_PER_ENTRY = above
                        work = h.clone()
                        calls = max(3, 4000 // (t * max(1, n_hi // 8)))
                        out[path] = _time(lambda: rt.apply(work, r, 0), calls, repeats)
                        res = h.clone()
                        rt.apply(res, r, 0)
                        out[path + "_result"] = res
                    err = (out.pop("gathered_result").float() - out.pop("columns_result").float()).abs().max().item()
                    row = {"k": k, "tokens": t, "n_hi": n_hi, "columns_per_entry": n_hi - 1,
                           "columns_us": out["columns"], "gathered_us": out["gathered"],
                           "gathered_over_columns": out["gathered"] / out["columns"], "max_abs_diff": err}
                    rows.append(row)
                    log(f"K={k:3d} T={t:5d} n_hi={n_hi:4d} ({(n_hi - 1) * k} columns): bank columns "
                        f"{row['columns_us']:9.1f} µs, gathered {row['gathered_us']:9.1f} µs  "
                        f"({row['gathered_over_columns']:.2f}×)")
    finally:
        rt_mod.GATHER_COLUMNS_PER_ENTRY = saved
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=576, help="hidden size (default: SmolLM2's 576)")
    p.add_argument("--tokens", default="1,16,256,2048")
    p.add_argument("--slots", default="2,3,5,9,17,65,257", help="n_hi values (slot 0 included)")
    p.add_argument("--k", default="8,32")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    with torch.inference_mode():
        rows = run(a.d, ints(a.tokens), ints(a.slots), ints(a.k), getattr(torch, a.dtype), a.repeats)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"d": a.d, "dtype": a.dtype, "threads": torch.get_num_threads(),
                       "gather_chunk": rt_mod.GATHER_CHUNK, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
