"""A fused Triton kernel for the steering op (CUDA only; a candidate measured by clients/bench/gpu_op.py).

Semantics (the same as :mod:`steering.worker.runtime`; token t, slot s = slots[t], x = hidden + residual):
    x ← x + add[s]
    f_k = col[s,k];  pre_k = enc[f_k]·x + bias[f_k];  act_k = 0 if pre_k <= cut[f_k] else pre_k
    hidden[t] ← hidden[t] + add[s] + Σ_k (alpha[s,k]·act_k + beta[s,k])·dec[f_k]

One program per token: pass 1 streams x and the token's K bank rows of enc in d-chunks to get
the K pre-activations, pass 2 streams their dec rows to write the delta. Unsteered tokens (slot
0) are skipped. Compared to the torch path this is one kernel launch instead of ~15, and it reads
only the rows of the token's own entries instead of every used bank row.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _steer_kernel(hidden, residual, slots, add, enc, dec, bias, cut, col, alpha, beta,
                      D: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, BD: tl.constexpr,
                      HAS_ENTRIES: tl.constexpr):
        t = tl.program_id(0)
        s = tl.load(slots + t)
        if s != 0:  # unsteered tokens (slot 0) are left alone
            row = t.to(tl.int64) * D
            srow = s.to(tl.int64) * D
            if HAS_ENTRIES:
                ks = tl.arange(0, K_PAD)
                kmask = ks < K
                ent = s.to(tl.int64) * K + ks  # [K_PAD] the slot's entries
                row_of = tl.load(col + ent, mask=kmask, other=0).to(tl.int64)  # [K_PAD] bank rows
                pre = tl.zeros([K_PAD], dtype=tl.float32)
                for d0 in range(0, D, BD):
                    offs = d0 + tl.arange(0, BD)
                    x = (tl.load(hidden + row + offs).to(tl.float32)
                         + tl.load(residual + row + offs).to(tl.float32)
                         + tl.load(add + srow + offs).to(tl.float32))  # [BD]
                    e = tl.load(enc + row_of[:, None] * D + offs[None, :], mask=kmask[:, None], other=0.0)
                    pre += tl.sum(e.to(tl.float32) * x[None, :], axis=1)
                pre += tl.load(bias + row_of, mask=kmask, other=0.0).to(tl.float32)
                ct = tl.load(cut + row_of, mask=kmask, other=0.0).to(tl.float32)
                act = tl.where(pre <= ct, 0.0, pre)
                coef = (tl.load(alpha + ent, mask=kmask, other=0.0).to(tl.float32) * act
                        + tl.load(beta + ent, mask=kmask, other=0.0).to(tl.float32))  # [K_PAD]
                coef = tl.where(kmask, coef, 0.0)
            for d0 in range(0, D, BD):
                offs = d0 + tl.arange(0, BD)
                h = tl.load(hidden + row + offs).to(tl.float32) + tl.load(add + srow + offs).to(tl.float32)
                if HAS_ENTRIES:
                    w = tl.load(dec + row_of[:, None] * D + offs[None, :], mask=kmask[:, None], other=0.0)
                    h += tl.sum(coef[:, None] * w.to(tl.float32), axis=0)
                tl.store(hidden + row + offs, h.to(hidden.dtype.element_ty))


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def steer_fused(hidden: torch.Tensor, residual: torch.Tensor, token_slots: torch.Tensor, tab,
                k: int) -> None:
    """Apply one site's tables (:class:`steering.worker.runtime.SiteTables`) to ``hidden`` [T, d] in place."""
    T, d = hidden.shape
    k_pad = max(triton.next_power_of_2(max(k, 1)), 2)
    # d-chunk: ~8K elements per [K_PAD, BD] tile, at most d; fewer, longer steps than BD = 64.
    bd = min(triton.next_power_of_2(d), max(64, 8192 // k_pad if k else 2048))
    while d % bd:
        bd //= 2
    _steer_kernel[(T,)](hidden, residual, token_slots, tab.add, tab.enc, tab.dec, tab.bias,
                        tab.cut, tab.col, tab.alpha, tab.beta,
                        D=d, K=max(k, 1), K_PAD=k_pad, BD=bd, HAS_ENTRIES=k > 0,
                        num_warps=8 if k_pad * bd >= 4096 else 4)
