"""SAE builder: collect residual activations, train a TopK SAE, label latents, write a pack.

Pipeline (``train_sae``): (1) :func:`collect_activations` streams chat-formatted samples from the
offline corpora through the model and stores content-token activations at
``blocks.{L}.hook_resid_post`` in float16 shards (resumable: rerunning continues where it
stopped); (2) :func:`train_topk_sae` fits a TopK SAE (Gao et al. 2024) with unit-norm decoder
rows and an AuxK loss against dead latents; (3) :func:`evaluate_sae` reports normalized MSE,
fraction of variance explained, L0, dead-latent % and the downstream CE-loss increase when the
reconstruction replaces the stream; (4) :func:`label_latents` keeps each latent's top-activating
contexts (top tokens + snippets) in a JSON sidecar; (5) named features are matched to contrastive
concept directions by cosine and activation correlation; (6) everything is written as a pack.

Activation of latent i in the pack (a "topk" SAE is stored as a ReLU SAE with threshold 0 plus
its k; steering uses the per-latent ReLU form act = ReLU(e·h + b), which is what the latent
computes whenever it is among the top k):  act_i(h) = ReLU(W_enc[:, i]·(h − b_dec) + b_enc[i]).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from steering.packs import collect, corpora

SHARD_TOKENS = 32768


# ---------------------------------------------------------------------------------------------
# 1. collection
# ---------------------------------------------------------------------------------------------
def corpus_conversations(names: Sequence[str] = ("chitchat", "wiki"), split: str = "train"
                         ) -> list[list[dict[str, str]]]:
    """The deterministic list of conversations activations are collected from."""
    return [conv for _, conv in corpora.interleave(list(names), split)]


def corpus_samples(tok, names: Sequence[str] = ("chitchat", "wiki"), split: str = "train",
                   max_tokens: int = 256, limit: int | None = None) -> list[collect.Encoded]:
    """The first ``limit`` encoded samples (all when None), in collection order."""
    convs = corpus_conversations(names, split)[:limit]
    return [collect.encode_chat(tok, conv, max_tokens=max_tokens) for conv in convs]


def collect_activations(model_dir: str | Path, layer: int, tokens: int, out_dir: str | Path,
                        names: Sequence[str] = ("chitchat", "wiki"), max_tokens: int = 256,
                        batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """Store ≥ ``tokens`` content-token activations at ``layer`` into ``out_dir`` shards.

    Each shard ``acts_{k:05d}.npy`` [n, d] float16 has ``where_{k:05d}.npy`` [n, 3] int32
    (sample index, position, token id). Resumable; returns the index (``index.json``).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "layer": layer, "corpora": list(names), "max_tokens": max_tokens, "shards": [],
        "next_sample": 0, "tokens": 0}
    if index["layer"] != layer or index["corpora"] != list(names):
        raise ValueError(f"{out} holds activations of another layer/corpus")
    if index["tokens"] >= tokens:
        return index
    model, tok = collect.load_model(model_dir)
    convs = corpus_conversations(names, "train")
    start = index["next_sample"]
    bar = tqdm(total=tokens, initial=index["tokens"], desc=f"collect L{layer}", unit="tok",
               disable=not progress)
    buf_a: list[np.ndarray] = []
    buf_w: list[np.ndarray] = []
    n_buf = 0
    t0 = time.time()

    def flush(next_sample: int) -> None:
        nonlocal buf_a, buf_w, n_buf
        if not n_buf:
            return
        k = len(index["shards"])
        np.save(out / f"acts_{k:05d}.npy", np.concatenate(buf_a).astype(np.float16))
        np.save(out / f"where_{k:05d}.npy", np.concatenate(buf_w).astype(np.int32))
        index["shards"].append({"file": f"acts_{k:05d}.npy", "tokens": n_buf})
        index["tokens"] += n_buf
        index["next_sample"] = next_sample
        index["tokens_per_s"] = round(n_buf / max(time.time() - t0, 1e-9), 1)
        index_path.write_text(json.dumps(index, indent=1))
        buf_a, buf_w, n_buf = [], [], 0

    i = start
    while i < len(convs) and index["tokens"] + n_buf < tokens:
        room = max(1, (tokens - index["tokens"] - n_buf) // 64)  # don't overshoot small requests
        chunk = [collect.encode_chat(tok, c, max_tokens=max_tokens) for c in convs[i:i + min(batch_size, room)]]
        t0 = t0 if n_buf else time.time()
        for acts, where in collect.iter_token_activations(model, chunk, layer, len(chunk)):
            w = np.asarray(where, dtype=np.int64)
            ids = np.array([chunk[s].ids[p] for s, p in where], dtype=np.int64)
            buf_a.append(acts)
            buf_w.append(np.stack([w[:, 0] + i, w[:, 1], ids], 1))
            n_buf += len(acts)
            bar.update(len(acts))
        i += len(chunk)
        if n_buf >= SHARD_TOKENS:
            flush(i)
    flush(i)
    bar.close()
    return index


def load_activations(out_dir: str | Path, max_tokens: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(acts [n, d] float16, where [n, 3] int32) from collected shards."""
    out = Path(out_dir)
    index = json.loads((out / "index.json").read_text())
    acts, where, n = [], [], 0
    for s in index["shards"]:
        a = np.load(out / s["file"])
        w = np.load(out / s["file"].replace("acts_", "where_"))
        acts.append(a)
        where.append(w)
        n += len(a)
        if max_tokens is not None and n >= max_tokens:
            break
    a, w = np.concatenate(acts), np.concatenate(where)
    if max_tokens is not None:
        a, w = a[:max_tokens], w[:max_tokens]
    return a, w


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

    def to_sae(self, sae_id: str, layer: int) -> "SAE":
        from steering.packs.format import SAE

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


# ---------------------------------------------------------------------------------------------
# 4. labels and per-latent calibration
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sparse_codes(sae: TopKSAE, acts: np.ndarray, batch: int = 8192, progress: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(values [N, k] float32, latent ids [N, k] int32) of every token."""
    from tqdm.auto import tqdm

    V = np.zeros((len(acts), sae.k), np.float32)
    I = np.zeros((len(acts), sae.k), np.int32)
    for s in tqdm(range(0, len(acts), batch), desc="encode", disable=not progress):
        v, i, _ = sae.encode_sparse(torch.from_numpy(acts[s:s + batch].astype(np.float32)))
        V[s:s + batch], I[s:s + batch] = v.numpy(), i.numpy()
    return V, I


def label_latents(V: np.ndarray, I: np.ndarray, where: np.ndarray, samples: Sequence[collect.Encoded],
                  tok, d_sae: int, top_n: int = 5, window: int = 10
                  ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Per latent: label (its most frequent top-activating tokens), top tokens, example snippets
    (the activating token in «»), firing frequency; plus per-latent p50/p99/max where active."""
    flat_v, flat_i = V.reshape(-1), I.reshape(-1)
    tok_of = np.repeat(np.arange(len(V)), V.shape[1])
    keep = flat_v > 0
    flat_v, flat_i, tok_of = flat_v[keep], flat_i[keep], tok_of[keep]
    order = np.lexsort((-flat_v, flat_i))  # by latent, then descending value
    flat_v, flat_i, tok_of = flat_v[order], flat_i[order], tok_of[order]
    starts = np.searchsorted(flat_i, np.arange(d_sae + 1))
    stats = {k: np.zeros(d_sae, np.float32) for k in ("latent_p50", "latent_p99", "latent_max", "latent_freq")}
    labels: list[dict[str, Any]] = []
    cache: dict[int, str] = {}

    def piece(t: int) -> str:
        if t not in cache:
            cache[t] = tok.decode([int(t)])
        return cache[t]

    for j in range(d_sae):
        a, b = starts[j], starts[j + 1]
        if a == b:
            labels.append({"label": "(dead)", "frequency": 0.0, "top_tokens": [], "examples": []})
            continue
        vals, toks = flat_v[a:b], tok_of[a:b]
        stats["latent_max"][j] = vals[0]
        stats["latent_p50"][j], stats["latent_p99"][j] = np.percentile(vals, [50, 99])
        stats["latent_freq"][j] = (b - a) / len(V)
        top = toks[:50]
        counts: dict[str, float] = {}
        for t_i, v in zip(top, vals[:50]):
            s = piece(int(where[t_i, 2])).strip() or repr(piece(int(where[t_i, 2])))
            counts[s] = counts.get(s, 0.0) + float(v)
        top_tokens = [[s, round(float(c) / max(float(vals[0]), 1e-6), 2)] for s, c in
                      sorted(counts.items(), key=lambda kv: -kv[1])[:8]]
        examples = []
        seen_samples = set()
        for t_i, v in zip(top, vals[:50]):
            si, p = int(where[t_i, 0]), int(where[t_i, 1])
            if si in seen_samples or si >= len(samples):
                continue
            seen_samples.add(si)
            ids = samples[si].ids
            left = tok.decode(ids[max(0, p - window):p])
            right = tok.decode(ids[p + 1:p + 4])
            examples.append({"text": (left + "«" + piece(ids[p]) + "»" + right).replace("\n", " "),
                             "act": round(float(v), 3)})
            if len(examples) >= top_n:
                break
        labels.append({"label": " / ".join(t for t, _ in top_tokens[:3]),
                       "frequency": round(float(stats["latent_freq"][j]), 6),
                       "top_tokens": top_tokens, "examples": examples})
    return labels, stats


# ---------------------------------------------------------------------------------------------
# 5. concept matching
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def match_concepts(model, tok, sae: TopKSAE, recipe, layer: int, min_corr: float = 0.5,
                   min_cos: float = 0.15, candidates: int = 3) -> dict[str, dict[str, Any]]:
    """For each recipe concept: the latents best matching its contrastive direction at ``layer``.

    Score per latent: cosine(W_dec[i], concept direction) and the point-biserial correlation of
    the latent's mean activation per example with the example's label (positive 1 / negative 0).
    The best latent (by corr + cos) is ``chosen`` when corr ≥ min_corr and cos ≥ min_cos."""
    from steering.packs import contrastive

    r = contrastive.load_recipe(recipe)
    out = {}
    for c in r["concepts"]:
        fmt = c.get("format", r.get("format", "assistant"))
        pairs = contrastive.concept_pairs(r, c)
        enc = [contrastive._encode(tok, fmt, pr, t) for pr, a, b in pairs for t in (a, b)]
        labels = np.array([1.0, 0.0] * len(pairs))
        means = np.zeros((len(enc), sae.W_dec.shape[0]), np.float32)
        hmeans = np.zeros((len(enc), sae.W_dec.shape[1]), np.float32)
        for idx in collect.batches_by_length(enc, 4096):
            acts, msk = collect.residuals(model, [enc[i] for i in idx], [layer])
            for j, i in enumerate(idx):
                h = acts[layer][j][msk[j]]
                v, ii, _ = sae.encode_sparse(h)
                dense = torch.zeros(len(h), sae.W_dec.shape[0]).scatter_(1, ii.long(), v)
                means[i] = dense.mean(0).numpy()
                hmeans[i] = h.mean(0).numpy()
        direction = hmeans[labels == 1].mean(0) - hmeans[labels == 0].mean(0)
        u = direction / np.linalg.norm(direction)
        Wd = sae.W_dec.detach().numpy()
        cos = Wd @ u / np.linalg.norm(Wd, axis=1)
        m = means - means.mean(0)
        y = labels - labels.mean()
        corr = (m * y[:, None]).sum(0) / (np.sqrt((m ** 2).sum(0) * (y ** 2).sum()) + 1e-12)
        score = corr + cos
        best = np.argsort(-score)[:candidates]
        cands = [{"latent": int(i), "cosine": round(float(cos[i]), 4), "activation_corr": round(float(corr[i]), 4)}
                 for i in best]
        top = cands[0]
        out[c["name"]] = {
            "candidates": cands, "direction": direction, "concept": c,
            "chosen": top if top["activation_corr"] >= min_corr and top["cosine"] >= min_cos else None,
        }
    return out


# ---------------------------------------------------------------------------------------------
# 6. the whole pipeline
# ---------------------------------------------------------------------------------------------
DEFAULTS: dict[str, Any] = {
    "name": None, "version": "1.0.0", "model": None, "layer": 12, "d_sae": 4608, "k": 32,
    "tokens": 1_000_000, "corpora": ["chitchat", "wiki"], "max_tokens_per_sample": 256,
    "epochs": 2.0, "batch_size": 4096, "lr": 5e-4, "seed": 0, "eval_tokens": 50_000,
    "ce_samples": 48, "concepts_recipe": None, "min_corr": 0.5, "min_cos": 0.15,
    "activations_dir": None, "license": "Apache-2.0",
}


def load_sae_recipe(path: str | Path) -> dict[str, Any]:
    import yaml

    r = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(r) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    if r.get("concepts_recipe") and not Path(r["concepts_recipe"]).is_absolute():
        r["concepts_recipe"] = str(Path(path).resolve().parent / r["concepts_recipe"])
    return r


def train_sae(out: str | Path | None = None, progress: bool = True, **kw: Any) -> Path:
    """Collect → train → evaluate → label → match concepts → write the SAE pack (see DEFAULTS)."""
    unknown = set(kw) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    o = {**DEFAULTS, **{k: v for k, v in kw.items() if v is not None}}
    from steering.packs import calibration as cal
    from steering.packs.format import PackWriter, model_fingerprint
    from steering.packs.contrastive import _git_rev

    torch.manual_seed(o["seed"])
    np.random.seed(o["seed"])
    model_dir = o["model"]
    if model_dir is None:
        from steering.model_store import cache_root, resolve_model

        model_dir = resolve_model(None)
    else:
        from steering.model_store import cache_root
    layer = int(o["layer"])
    name = o["name"] or f"{Path(str(model_dir)).name.lower()}-sae-l{layer}"
    act_dir = Path(o["activations_dir"] or cache_root() / "activations" / f"{Path(str(model_dir)).name}-L{layer}")
    t0 = time.time()
    index = collect_activations(model_dir, layer, int(o["tokens"]), act_dir, o["corpora"],
                                o["max_tokens_per_sample"], progress=progress)
    acts, where = load_activations(act_dir, int(o["tokens"]))
    n_eval = min(int(o["eval_tokens"]), len(acts) // 10)
    train_acts, eval_acts = acts[:-n_eval], acts[-n_eval:]
    t1 = time.time()
    log: list[dict[str, Any]] = []
    # a checkpoint per training configuration, so a failure after training does not cost a rerun
    ckpt = act_dir / ("sae_d{d_sae}_k{k}_e{epochs}_lr{lr}_b{batch_size}_s{seed}_n{n}.safetensors".format(
        n=len(train_acts), **{k_: o[k_] for k_ in ("d_sae", "k", "epochs", "lr", "batch_size", "seed")}))
    if ckpt.exists():
        from safetensors.torch import load_file

        sae_t = TopKSAE(acts.shape[1], int(o["d_sae"]), int(o["k"]))
        sae_t.load_state_dict(load_file(str(ckpt)))
        saved = json.loads(ckpt.with_suffix(".log.json").read_text()) if ckpt.with_suffix(".log.json").exists() else []
        # {"log", "train_seconds"}; a bare list from before the time was kept
        log, train_seconds = (saved, None) if isinstance(saved, list) else (saved["log"], saved["train_seconds"])
    else:
        from safetensors.torch import save_file

        sae_t = train_topk_sae(train_acts, int(o["d_sae"]), int(o["k"]), float(o["epochs"]),
                               int(o["batch_size"]), float(o["lr"]), seed=int(o["seed"]),
                               progress=progress, log=log)
        save_file({k_: v.detach().contiguous() for k_, v in sae_t.state_dict().items()}, str(ckpt))
        train_seconds = round(time.time() - t1, 1)
        ckpt.with_suffix(".log.json").write_text(json.dumps({"log": log, "train_seconds": train_seconds}))
    t2 = time.time()
    sae_t.eval()
    metrics = reconstruction_metrics(sae_t, eval_acts)
    model, tok = collect.load_model(model_dir)
    sae_np = sae_t.to_sae(f"L{layer}", layer)
    enc_cal, cal_info = cal.calibration_samples(tok, {"corpus": list(o["corpora"]),
                                                      "samples": max(1, int(o["ce_samples"]) // 2)})
    if int(o["ce_samples"]) > 0:  # 0 skips the (full-model) downstream-loss evaluation
        metrics.update(downstream_loss(model, enc_cal, layer, sae_np))
    V, I = sparse_codes(sae_t, acts, progress=progress)
    samples = corpus_samples(tok, o["corpora"], "train", o["max_tokens_per_sample"],
                             limit=int(where[:, 0].max()) + 1)
    labels, stats = label_latents(V, I, where, samples, tok, int(o["d_sae"]))
    for k_, v in stats.items():
        setattr(sae_np, k_, v)
    resid_norm = float(np.median(np.linalg.norm(eval_acts.astype(np.float32), axis=1)))
    t3 = time.time()
    info = {
        "metrics": {k_: (round(v, 5) if isinstance(v, float) else v) for k_, v in metrics.items()},
        "calibration": {"resid_norm_p50": resid_norm, "scale": cal.dose_scale(resid_norm)},
        "training": {"architecture": "topk", "k": int(o["k"]), "d_sae": int(o["d_sae"]),
                     "tokens": int(len(acts)), "train_tokens": int(len(train_acts)),
                     "eval_tokens": int(n_eval), "epochs": float(o["epochs"]),
                     "batch_size": int(o["batch_size"]), "lr": float(o["lr"]), "seed": int(o["seed"]),
                     "aux_k": 512, "decoder": "unit-norm rows",
                     "collection_tokens_per_s": index.get("tokens_per_s"),
                     "train_seconds": train_seconds, "checkpoint": ckpt.name,
                     "label_eval_seconds": round(t3 - t2, 1),
                     "log": log[-5:]},
    }
    fp = model_fingerprint(model_dir)
    w = PackWriter(name, str(o["version"]), fp, model_id="HuggingFaceTB/SmolLM2-135M-Instruct"
                   if "SmolLM2-135M-Instruct" in str(model_dir) else Path(str(model_dir)).name,
                   description=f"TopK SAE (k={o['k']}, d_sae={o['d_sae']}) on blocks.{layer}.hook_resid_post, "
                               "trained by steering.packs.sae, latents labelled by top-activating contexts",
                   license=str(o["license"]),
                   provenance={"builder": "steering.packs.sae/1", "git": _git_rev(),
                               "corpus": {"corpora": index["corpora"], "split": "train",
                                          "tokens": int(len(acts)),
                                          "max_tokens_per_sample": o["max_tokens_per_sample"],
                                          "skipped": "position 0, chat-template tokens, default system prompt"},
                               "recipe": {k_: (Path(v).name if k_ == "concepts_recipe" and isinstance(v, (str, Path))
                                               else "inline" if k_ == "concepts_recipe" and isinstance(v, dict)
                                               else str(v) if isinstance(v, Path) else v)
                                          for k_, v in o.items() if k_ not in ("activations_dir", "model")}},
                   calibration={"unit": cal.CALIBRATION_UNIT, **cal_info})
    matches = {}
    if o["concepts_recipe"]:
        matches = match_concepts(model, tok, sae_t, o["concepts_recipe"], layer,
                                 float(o["min_corr"]), float(o["min_cos"]))
        info["concept_matches"] = {c: {"candidates": m["candidates"], "chosen": m["chosen"]}
                                   for c, m in matches.items()}
    w.add_sae(sae_np, info=info, labels={"latents": labels, "source": "top-activating contexts"})
    if matches:
        for cname, m in matches.items():
            if not m["chosen"]:
                continue
            i = m["chosen"]["latent"]
            f = sae_np.latent_feature(i, f"{cname}_latent")
            f_scale = cal.dose_scale(resid_norm)
            w.add_feature(
                f"{cname}_latent", layer, "sae", f.direction, encoder=f.encoder, bias=f.bias,
                threshold=f.threshold,
                calibration={"scale": f_scale, "p50": float(stats["latent_p50"][i]),
                             "p99": float(stats["latent_p99"][i]), "max": float(stats["latent_max"][i]),
                             "frequency": float(stats["latent_freq"][i]), "direction_norm": 1.0,
                             "resid_norm_p50": resid_norm, "strength_range": [-1.5, 1.5]},
                description=f"SAE latent {i} matching the contrastive '{cname}' direction: {labels[i]['label']}",
                tags=list(m["concept"].get("tags", [])) + ["sae"],
                evidence={"contrastive_concept": cname, "cosine_with_contrastive": m["chosen"]["cosine"],
                          "activation_corr": m["chosen"]["activation_corr"],
                          "candidates": m["candidates"],
                          "recipe": Path(o["concepts_recipe"]).name
                          if isinstance(o["concepts_recipe"], (str, Path)) else "inline"},
                source={"sae": sae_np.id, "latent": i})
    if out is None:
        from steering.packs.registry import bundled_packs_dir

        out = bundled_packs_dir() / name
    return w.write(out)
