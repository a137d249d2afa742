"""Latent labels and concept matching (steps 4 and 5 of the SAE builder, :mod:`steering.builders.sae`).

:func:`label_latents` keeps each latent's top-activating contexts (top tokens, snippets with the
activating token in «») for the labels sidecar, with per-latent p50/p99/max/frequency;
:func:`match_concepts` finds, for each concept of a contrastive recipe, the latents whose decoder
row and activations best match the concept's contrastive direction.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from steering.builders import collect, contrastive
from steering.builders.sae_train import TopKSAE


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


