"""TopK SAE training and evaluation (steps 2 and 3 of the SAE builder, :mod:`steering.builders.sae`).

:class:`TopKSAE` (Gao et al. 2024) is fitted by :func:`train_topk_sae` with unit-norm decoder rows
and an AuxK loss against dead latents; :func:`reconstruction_metrics` reports normalized MSE,
fraction of variance explained, L0 and dead-latent fraction, and :func:`downstream_loss` the
next-token CE increase when the reconstruction replaces the stream.

Semantics: acts = TopK_k(ReLU((x − b_dec)·W_enc + b_enc)), x̂ = acts·W_dec + b_dec. In a pack the
SAE is stored with activation "topk" (see :class:`steering.packs.format.SAE`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from steering.builders import collect
from steering.packs.format import SAE


# ---------------------------------------------------------------------------------------------
# 2. training
# ---------------------------------------------------------------------------------------------
class TopKSAE(torch.nn.Module):
    """TopK SAE (Gao et al. 2024): acts = TopK_k(ReLU((x − b_dec)·W_enc + b_enc)), x̂ = acts·W_dec + b_dec,
    with unit-norm decoder rows (renormalized after every step)."""

    def __init__(self, d_in: int, d_sae: int, k: int, generator: torch.Generator | None = None):
        super().__init__()
        W = torch.randn(d_sae, d_in, generator=generator)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W.clone())
        self.W_enc = torch.nn.Parameter(W.T.clone().contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.k = k

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = self.pre(x)
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.relu(vals), idx, pre

    def decode_sparse(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # Σ_j vals_j · W_dec[idx_j]  (gather instead of a dense [B, d_sae] matmul)
        return torch.einsum("bk,bkd->bd", vals, self.W_dec[idx]) + self.b_dec

    def forward(self, x: torch.Tensor):
        vals, idx, pre = self.encode_sparse(x)
        return self.decode_sparse(vals, idx), vals, idx, pre

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def to_sae(self, sae_id: str, layer: int) -> SAE:
        """The pack-side SAE (numpy weights, activation "topk")."""
        return SAE(id=sae_id, layer=layer, activation="topk", k=self.k,
                   W_enc=self.W_enc.detach().numpy().copy(), b_enc=self.b_enc.detach().numpy().copy(),
                   W_dec=self.W_dec.detach().numpy().copy(), b_dec=self.b_dec.detach().numpy().copy())


def train_topk_sae(acts: np.ndarray, d_sae: int = 4608, k: int = 32, epochs: float = 2.0,
                   batch_size: int = 4096, lr: float = 5e-4, aux_k: int = 512,
                   aux_coef: float = 1 / 32, dead_after_tokens: int = 200_000, seed: int = 0,
                   progress: bool = True, log: list | None = None) -> TopKSAE:
    """Fit a TopK SAE on ``acts`` [N, d] (any float dtype; batches are cast to float32)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    N, d = acts.shape
    model = TopKSAE(d, d_sae, k, g)
    with torch.no_grad():
        sub = torch.from_numpy(acts[rng.choice(N, min(N, 65536), replace=False)].astype(np.float32))
        model.b_dec.copy_(sub.median(0).values)  # cheap stand-in for the geometric median
        # scale the encoder so initial pre-activations are O(residual size)
        scale = float((sub - model.b_dec).norm(dim=1).median())
        model.W_enc.mul_(1.0 / max(scale, 1e-6) * math.sqrt(d))
        var = float(((sub - sub.mean(0)) ** 2).sum(1).mean())
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
    steps = max(1, int(epochs * N / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (steps - s) / (0.2 * steps)))
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    order = rng.permutation(N)
    pos = 0
    bar = tqdm(range(steps), desc="train SAE", disable=not progress)
    for step in bar:
        if pos + batch_size > N:
            order = rng.permutation(N)
            pos = 0
        idx_b = np.sort(order[pos:pos + batch_size])
        pos += batch_size
        x = torch.from_numpy(acts[idx_b].astype(np.float32))
        x_hat, vals, idx, pre = model(x)
        err = x - x_hat
        mse = (err ** 2).sum(1).mean()
        loss = mse / var
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[idx[vals > 0]] = True
        since_fired += len(x)
        since_fired[fired] = 0
        dead = since_fired > dead_after_tokens
        aux = torch.zeros(())
        if aux_k and dead.any():
            pre_dead = pre.masked_fill(~dead, float("-inf"))
            kk = min(aux_k, int(dead.sum()))
            v, i = pre_dead.topk(kk, dim=-1)
            e_hat = torch.einsum("bk,bkd->bd", torch.relu(v), model.W_dec[i])
            aux = ((err.detach() - e_hat) ** 2).sum(1).mean() / var
            loss = loss + aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.normalize_decoder()
        if step % 20 == 0 or step == steps - 1:
            rec = {"step": step, "fvu": (mse / var).item(), "aux": aux.item(), "dead_frac": dead.float().mean().item()}
            bar.set_postfix(fvu=f"{rec['fvu']:.3f}", dead=f"{rec['dead_frac']:.3f}")
            if log is not None:
                log.append(rec)
    return model


# ---------------------------------------------------------------------------------------------
# 3. evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruction_metrics(sae, acts: np.ndarray, batch: int = 8192) -> dict[str, float]:
    """nMSE (Σ‖x−x̂‖²/Σ‖x‖²), FVU (Σ‖x−x̂‖²/Σ‖x−μ‖²), FVE = 1−FVU, L0, dead-latent fraction."""
    x_all = acts
    mu = x_all.astype(np.float64).mean(0)
    se = tot = cen = l0 = 0.0
    fired = None
    for s in range(0, len(x_all), batch):
        x = torch.from_numpy(x_all[s:s + batch].astype(np.float32))
        a = torch.from_numpy(sae.encode(x.numpy())) if not isinstance(sae, TopKSAE) else None
        if isinstance(sae, TopKSAE):
            vals, idx, _ = sae.encode_sparse(x)
            x_hat = sae.decode_sparse(vals, idx)
            f = torch.zeros(sae.W_dec.shape[0], dtype=torch.bool)
            f[idx[vals > 0]] = True
            l0 += float((vals > 0).sum())
        else:
            x_hat = torch.from_numpy(sae.decode(a.numpy()))
            f = (a > 0).any(0)
            l0 += float((a > 0).sum())
        fired = f if fired is None else fired | f
        se += float(((x - x_hat) ** 2).sum())
        tot += float((x ** 2).sum())
        cen += float(((x.double() - torch.from_numpy(mu)) ** 2).sum())
    n = len(x_all)
    return {"nmse": se / tot, "fvu": se / cen, "fve": 1 - se / cen, "l0": l0 / n,
            "dead_frac": float(1 - fired.float().mean()), "eval_tokens": n}


@torch.no_grad()
def downstream_loss(model, encoded: Sequence[collect.Encoded], layer: int, sae) -> dict[str, float]:
    """Next-token CE on ``encoded`` (content targets only) clean, with the layer's stream replaced
    by the SAE reconstruction at content positions, and zero-ablated there (for "loss recovered")."""
    import torch.nn.functional as F

    base = collect._base(model)
    mode = {"v": "clean"}
    cur_mask = {}

    def hook(_m, _i, o):
        if mode["v"] == "clean":
            return o
        hs = o[0] if isinstance(o, tuple) else o
        m = cur_mask["m"]
        if mode["v"] == "sae":
            rec = torch.from_numpy(sae.decode(sae.encode(hs[m].float().numpy()))).to(hs.dtype)
        else:
            rec = torch.zeros_like(hs[m])
        hs = hs.clone()
        hs[m] = rec
        return (hs, *o[1:]) if isinstance(o, tuple) else hs

    h = base.layers[layer].register_forward_hook(hook)
    tot = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n = 0
    try:
        for idx in collect.batches_by_length(encoded, 2048):
            batch = [encoded[i] for i in idx]
            T = max(len(e) for e in batch)
            ids = torch.zeros((len(batch), T), dtype=torch.long)
            att = torch.zeros((len(batch), T), dtype=torch.long)
            msk = torch.zeros((len(batch), T), dtype=torch.bool)
            for j, e in enumerate(batch):
                ids[j, :len(e)] = torch.tensor(e.ids)
                att[j, :len(e)] = 1
                msk[j, :len(e)] = torch.tensor(e.mask)
            cur_mask["m"] = msk
            tgt = msk[:, 1:]
            for k in tot:
                mode["v"] = k
                logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1]
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
                tot[k] += float(ce.reshape(tgt.shape)[tgt].sum())
            n += int(tgt.sum())
    finally:
        h.remove()
    clean, s, z = (tot[k] / n for k in ("clean", "sae", "zero"))
    return {"ce_clean": clean, "ce_sae": s, "ce_zero_ablation": z, "ce_increase": s - clean,
            "loss_recovered": (z - s) / (z - clean) if z > clean else float("nan"), "ce_tokens": n}


