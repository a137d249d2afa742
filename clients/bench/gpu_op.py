"""Op-level check: the steering op's time against one Llama-3-8B-sized decoder layer.

vLLM itself cannot run on the lent GPU machines, but torch can, so this times the very op the
engine calls (``torch.ops.steering.steer_`` over a :class:`steering.worker.runtime.SteeringRuntime`) next
to a decoder layer of Llama-3-8B's shape (d = 4096, 32 query / 8 KV heads, MLP 14336, random
weights, bf16) doing one decode step for T sequences with ``--context`` cached positions each.

Scenarios: ``add`` (one additive vector per slot) and ``clamp K`` for K in ``--clamp-k`` (K clamp
entries per slot, plus the additive vector). The tables hold ``--slots`` configurations; tokens
are spread over slots 1..S, 0 (slot 0 = unsteered), as in a mixed batch. The runtime runs in
graph-safe mode (``host_gating=False``): every site computes over the whole feature bank
(S·K distinct rows here, the worst case), which is what a captured CUDA graph replays.

Timing: CUDA events (``time.perf_counter`` on CPU) around ``--iters`` calls, median of
``--repeats``; on CUDA also inside captured CUDA graphs. Printed per row: layer time, op time,
op / layer, and the measured cost of layer+op over layer alone.

    python clients/bench/gpu_op.py                      # GPU, full sizes (a few minutes)
    python clients/bench/gpu_op.py --device cpu --tiny  # small sizes, runs anywhere (the test suite)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from steering.worker import runtime as rt_mod  # noqa: E402
from clients.bench import fused  # noqa: E402
from steering.config import SteeringConfig  # noqa: E402


@dataclass
class LayerShape:
    d: int = 4096
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 14336
    context: int = 1024

    @property
    def head_dim(self) -> int:
        return self.d // self.heads


TINY = LayerShape(d=256, heads=4, kv_heads=2, ffn=512, context=32)


class DecoderLayer(torch.nn.Module):
    """A Llama decoder layer (RMSNorm, GQA attention with RoPE, SwiGLU MLP) for one decode step.

    forward(hidden [T, d], residual [T, d]) -> (hidden, residual), vLLM's convention: the layer
    sums its input into the residual and returns its output separately."""

    def __init__(self, s: LayerShape, tokens: int, dtype, device) -> None:
        super().__init__()
        self.s = s
        hd = s.head_dim
        g = torch.Generator(device="cpu").manual_seed(0)

        def w(o: int, i: int) -> torch.Tensor:
            return (torch.randn(o, i, generator=g) / i**0.5).to(dtype=dtype, device=device)

        self.qkv = w((s.heads + 2 * s.kv_heads) * hd, s.d)
        self.o = w(s.d, s.heads * hd)
        self.gate_up = w(2 * s.ffn, s.d)
        self.down = w(s.d, s.ffn)
        self.n1 = torch.ones(s.d, dtype=dtype, device=device)
        self.n2 = torch.ones(s.d, dtype=dtype, device=device)
        # Per-sequence KV cache of `context` positions; the new token is written at the end.
        kv = torch.randn(2, tokens, s.kv_heads, s.context, hd, generator=g) * 0.5
        self.k_cache, self.v_cache = kv.to(dtype=dtype, device=device).unbind(0)  # [T, kvh, C, hd]
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = (s.context - 1) * inv
        self.cos = ang.cos().to(dtype=dtype, device=device)  # [hd/2]
        self.sin = ang.sin().to(dtype=dtype, device=device)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:  # [T, h, hd]
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * self.cos - b * self.sin, b * self.cos + a * self.sin), dim=-1)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor):
        s, hd = self.s, self.s.head_dim
        T = hidden.shape[0]
        residual = hidden + residual  # [T, d]
        h = F.rms_norm(residual, (s.d,), self.n1)
        q, k, v = (h @ self.qkv.T).split([s.heads * hd, s.kv_heads * hd, s.kv_heads * hd], dim=-1)
        q = self._rope(q.view(T, s.heads, hd))
        k = self._rope(k.view(T, s.kv_heads, hd))
        self.k_cache[:, :, -1].copy_(k)
        self.v_cache[:, :, -1].copy_(v.view(T, s.kv_heads, hd))
        att = F.scaled_dot_product_attention(q.unsqueeze(2), self.k_cache, self.v_cache,
                                             enable_gqa=True)  # [T, h, 1, hd]
        residual = att.reshape(T, s.heads * hd) @ self.o.T + residual
        h = F.rms_norm(residual, (s.d,), self.n2)
        gate, up = (h @ self.gate_up.T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down.T, residual


def make_runtime(d: int, tokens: int, slots: int, k: int, dtype, device,
                 host_gating: bool = False) -> rt_mod.SteeringRuntime:
    """A one-site runtime with every slot filled and tokens spread over slots 0..S: each slot an
    additive vector and k clamp entries of its own (distinct bank rows, half of them rectified:
    the worst case for the bank, which shares the rows of named features). With ``host_gating``
    only the clamp entries run."""
    cfg = SteeringConfig(max_slots=slots, max_features=k, layers=[0], bank_features=max(slots * k, 1))
    rt = rt_mod.SteeringRuntime(cfg, num_layers=1, hidden_size=d, max_tokens=max(tokens, 1),
                                dtype=dtype, device=device, host_gating=host_gating)
    if host_gating:
        rt.site_entries[0] = k > 0
    g = torch.Generator(device="cpu").manual_seed(1)
    tab = rt.tables[0]
    s1 = slots + 1

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    tab.add[1:].copy_(rnd(slots, d) * 0.1)
    if k:
        n = slots * k  # bank columns 1..n: slot s's entry j is column (s - 1)·k + j + 1
        enc = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
        tab.enc[1 : n + 1].copy_(enc.to(dtype=dtype, device=device))
        tab.dec[1 : n + 1].copy_(tab.enc[1 : n + 1])
        rect = (torch.arange(n) % k) < k // 2
        tab.cut[1 : n + 1].copy_(torch.where(rect, 0.0, float("-inf")).to(dtype=dtype, device=device))
        tab.col[1:].copy_(torch.arange(1, n + 1, device=device).view(slots, k))
        tab.alpha[1:].fill_(-1.0)  # clamp: act -> target
        tab.beta[1:].copy_(rnd(slots, k).abs() * 4)
        if host_gating:
            rt.banks[0].hi = n + 1
            rt.site_k[0] = k
    rt.token_slots[:tokens].copy_((torch.arange(tokens, device=device) + 1) % s1)  # T=1: slot 1
    rt.num_tokens = tokens
    return rt


def check_fused(rt, x0, r0, T: int, k: int) -> tuple[float, float]:
    """Max |error| of the fused kernel and of the torch op against a float32 torch reference."""
    ref_rt = make_runtime(x0.shape[1], T, rt.cfg.max_slots, k, torch.float32, x0.device)
    for name in ("add", "enc", "dec", "bias", "cut", "col", "alpha", "beta"):
        getattr(ref_rt.tables[0], name).copy_(getattr(rt.tables[0], name))
    h32 = x0.float().clone()
    ref_rt.apply(h32, r0.float(), 0)
    h_t = x0.clone()
    rt.apply(h_t, r0, 0)
    h_f = x0.clone()
    fused.steer_fused(h_f, r0, rt.token_slots[:T], rt.tables[0], k)
    return ((h_f.float() - h32).abs().max().item(), (h_t.float() - h32).abs().max().item())


def _time(fn, iters: int, repeats: int, device: torch.device) -> float:
    """Median milliseconds per call of ``fn`` over ``repeats`` blocks of ``iters`` calls."""
    for _ in range(3):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(out)


def _graph(fn):
    """Capture ``fn`` in a CUDA graph; returns its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench(shape: LayerShape, tokens_list, clamp_ks, slots: int, dtype, device: torch.device,
          iters: int, repeats: int, graphs: bool) -> list[dict]:
    rows = []
    for T in tokens_list:
        layer = DecoderLayer(shape, T, dtype, device)
        g = torch.Generator(device="cpu").manual_seed(2)
        x0 = (torch.randn(T, shape.d, generator=g) * 2).to(dtype=dtype, device=device)
        r0 = (torch.randn(T, shape.d, generator=g) * 20).to(dtype=dtype, device=device)
        hidden, residual = x0.clone(), r0.clone()

        def run_layer() -> None:
            h, r = layer(x0, r0)
            hidden.copy_(h)
            residual.copy_(r)

        for k in [0, *clamp_ks]:
            rt = make_runtime(shape.d, T, slots, k, dtype, device)
            rt_mod.set_runtime(rt)

            def run_op() -> None:
                torch.ops.steering.steer_(hidden, residual, 0)

            def run_both() -> None:
                run_layer()
                run_op()

            row = {"tokens": T, "op": "add" if k == 0 else f"clamp K={k}", "slots": slots}
            lt, ot, bt = (_time(f, iters, repeats, device) for f in (run_layer, run_op, run_both))
            row.update(layer_ms=lt, op_ms=ot, op_over_layer=ot / lt, layer_plus_op_ms=bt,
                       added_cost=(bt - lt) / lt)
            if graphs:
                gl, go, gb = _graph(run_layer), _graph(run_op), _graph(run_both)
                lt, ot, bt = (_time(f, iters, repeats, device) for f in (gl, go, gb))
                row.update(graph_layer_ms=lt, graph_op_ms=ot, graph_op_over_layer=ot / lt,
                           graph_layer_plus_op_ms=bt, graph_added_cost=(bt - lt) / lt)
            if fused.available(device):
                try:
                    row["fused_max_err"], row["torch_max_err"] = check_fused(rt, x0, r0, T, k)
                except Exception as e:  # a candidate kernel must not cost the op's numbers
                    row["fused_error"] = repr(e)[:500]
                    print(f"fused kernel failed: {e!r}", file=sys.stderr)
            if "fused_max_err" in row:

                def run_fused() -> None:
                    fused.steer_fused(hidden, residual, rt.token_slots[:T], rt.tables[0], k)

                ft = _time(run_fused, iters, repeats, device)
                row.update(fused_op_ms=ft, fused_op_over_layer=ft / row["layer_ms"])
                if graphs:
                    ft = _time(_graph(run_fused), iters, repeats, device)
                    row.update(graph_fused_op_ms=ft, graph_fused_op_over_layer=ft / row["graph_layer_ms"])
            rt_mod.set_runtime(None)
            rows.append(row)
        del layer
    return rows


def print_table(rows: list[dict]) -> None:
    graphs = "graph_op_ms" in rows[0]
    head = f"{'T':>4} {'op':>12} {'layer ms':>9} {'op ms':>8} {'op/layer':>9} {'layer+op':>9}"
    if graphs:
        head += f" | {'graph layer':>11} {'graph op':>9} {'op/layer':>9} {'layer+op':>9}"
    print(head)
    for r in rows:
        line = (f"{r['tokens']:>4} {r['op']:>12} {r['layer_ms']:>9.4f} {r['op_ms']:>8.4f} "
                f"{r['op_over_layer']:>8.2%} {r['added_cost']:>+8.2%}")
        if graphs:
            line += (f" | {r['graph_layer_ms']:>11.4f} {r['graph_op_ms']:>9.4f} "
                     f"{r['graph_op_over_layer']:>8.2%} {r['graph_added_cost']:>+8.2%}")
        if "fused_op_ms" in r:
            line += f" | fused {r['fused_op_ms']:.4f} ms {r['fused_op_over_layer']:.2%}"
            if "graph_fused_op_ms" in r:
                line += f" graph {r['graph_fused_op_ms']:.4f} ms {r['graph_fused_op_over_layer']:.2%}"
            line += f" err {r['fused_max_err']:.2e} (torch {r['torch_max_err']:.2e})"
        print(line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small layer and sizes (CPU, test suite)")
    p.add_argument("--tokens", default=None, help="comma list of batch tokens (default 1,64,256)")
    p.add_argument("--clamp-k", default=None, help="comma list of K (default 8,32,128)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    shape = TINY if a.tiny else LayerShape()
    tokens = [int(x) for x in (a.tokens or ("1,8" if a.tiny else "1,64,256")).split(",")]
    ks = [int(x) for x in (a.clamp_k or ("8" if a.tiny else "8,32,128")).split(",")]
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    iters = a.iters or (5 if a.tiny else 100)
    graphs = device.type == "cuda" and not a.no_graphs
    rows = bench(shape, tokens, ks, a.slots, dtype, device, iters, a.repeats, graphs)
    print_table(rows)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
        "layer": shape.__dict__, "slots": a.slots, "iters": iters, "repeats": a.repeats,
        "graphs": graphs, "rows": rows,
    }
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
