"""Trained features: a steering vector (one or several layers) or a rank-r intervention fitted by
a preference objective on the served model's own weights (transformers, float32, CPU).

Semantics of what is trained (at each layer L of the feature, on the stream h = hook_resid_post,
for every position, as ``apply_to: all`` serves it), with σ ∈ {+1, −1} the direction of a step:
    vector:   h ← h + σ·v_L                                   v_L [d]
    lowrank:  h ← h + σ·Rᵀ(W h + b − R h)                     R [r, d] orthonormal rows, W [r, d], b [r]
(LoReFT; at serve time σ is the request's strength times the calibration scale.)

Objective, per pair (x, y⁺, y⁻) of a prompt and a completion with and without the concept
(BiPO, Cao et al. 2024; RePS, Wu et al. 2025): with r(y) = log π_σ(y|x) − log π_0(y|x), the
steered model's log-likelihood ratio to the unsteered one (summed over the completion's tokens),

    pref = −log sigmoid(β·(r(y_w) − r(y_l)))        (y_w, y_l) = (y⁺, y⁻) for σ = +1, swapped for −1
    sft  = −mean log π_σ(y_w|x)                     the preferred completion made likely, not only likelier
    kl   = mean over neutral text tokens of KL(π_0 ‖ π_σ)    fluency is optimised, not only checked
    loss = pref + sft_weight·sft + kl_weight·kl

σ is drawn per step (``bidirectional``) so a negative strength means the opposite concept. A
vector's per-layer norm is projected back under ``max_norm`` × the layer's median residual norm
after each step. Reference log-probabilities of the pairs are computed once; the neutral text's
reference distribution is computed per step (no gradient).

Cost: a step runs B pairs (2B sequences) and ``kl_batch`` neutral texts forward and backward
(only the layers from the first steered one on carry gradients); the LM head is applied only to
completion positions. ``time_budget_s`` stops training early (the log says so).

Over 400 lines because the two trained kinds share one loop: batching, the three loss terms,
the norm projection and the held-out check are the same code for a vector and a rank-r edit.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from steering.hf import hf_decoder_layers
from steering.builders import collect

Method = Literal["vector", "lowrank"]
METHODS: tuple[str, ...] = ("vector", "lowrank")


@dataclass
class TrainConfig:
    """How one feature is trained."""

    method: Method = "vector"
    """``vector`` (an added vector per layer) or ``lowrank`` (a LoReFT edit per layer)."""
    layers: list[int] = field(default_factory=lambda: [6])
    """Decoder layers the feature acts on (one strength for all)."""
    rank: int = 4
    """r of a ``lowrank`` feature (1…8)."""
    steps: int = 120
    """Optimizer steps (each over ``batch_size`` pairs)."""
    batch_size: int = 4
    """Pairs per step."""
    lr: float = 0.02
    """Adam learning rate."""
    beta: float = 0.1
    """Preference temperature β (DPO/BiPO)."""
    sft_weight: float = 0.2
    """Weight of the preferred completion's mean token NLL under the steered model."""
    kl_weight: float = 1.0
    """Weight of KL(unsteered ‖ steered) on neutral text (per token, mean)."""
    kl_batch: int = 2
    """Neutral texts per step for the KL term."""
    bidirectional: bool = True
    """Draw σ = ±1 per step (negative strengths steer to the opposite concept)."""
    max_norm: float = 0.75
    """Vectors: per-layer ‖v_L‖ is kept ≤ this × the layer's median residual norm."""
    max_completion_tokens: int = 64
    """Completions are cut to this many tokens."""
    heldout: float = 0.2
    """Share of pairs kept out of training to measure preference accuracy."""
    seed: int = 0
    time_budget_s: float | None = 600.0
    """Stop after this many seconds of training (None: run all steps)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        self.layers = sorted(set(int(x) for x in self.layers))
        if not 1 <= self.rank <= 8:
            raise ValueError("rank must be in 1..8")


@dataclass
class Pair:
    """A prompt with a completion that shows the concept and one that does not."""

    prompt: str
    positive: str
    negative: str


@dataclass
class TrainedFeature:
    """What training produced, as numpy float32 (see the module docstring)."""

    method: str
    layers: list[int]
    directions: np.ndarray | None = None  # [n, d] vector method
    R: np.ndarray | None = None  # [n, r, d] lowrank
    W: np.ndarray | None = None  # [n, r, d]
    b: np.ndarray | None = None  # [n, r]
    readout: np.ndarray | None = None  # [d] direction read at layers[0] (inspect, monitors)
    resid_norm_p50: dict[int, float] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# the intervention
# ---------------------------------------------------------------------------------------------
class Intervention(torch.nn.Module):
    """The trainable edit at each of ``layers``; ``sign`` is σ of the current step."""

    def __init__(self, cfg: TrainConfig, d: int, init: dict[int, np.ndarray] | None = None) -> None:
        super().__init__()
        self.cfg, self.d = cfg, d
        self.sign = 1.0
        n = len(cfg.layers)
        g = torch.Generator().manual_seed(cfg.seed)
        if cfg.method == "vector":
            v = torch.zeros(n, d)
            for i, L in enumerate(cfg.layers):
                if init and L in init:
                    v[i] = torch.as_tensor(np.asarray(init[L], np.float32))
            self.v = torch.nn.Parameter(v)  # [n, d]
        else:
            r = cfg.rank
            a = torch.randn(n, d, r, generator=g)
            self.A = torch.nn.Parameter(a)  # [n, d, r]: R = qr(A).Q.T (orthonormal rows)
            R0 = self.R().detach()
            self.W = torch.nn.Parameter(R0.clone())  # [n, r, d]: W = R starts as "no edit"
            self.b = torch.nn.Parameter(torch.zeros(n, r))  # [n, r]

    def R(self) -> torch.Tensor:
        """[n, r, d] with orthonormal rows per layer."""
        q, _ = torch.linalg.qr(self.A)  # [n, d, r]
        return q.transpose(1, 2)

    def delta(self, i: int, h: torch.Tensor, R: torch.Tensor | None) -> torch.Tensor:
        """The edit at the i-th layer for stream h [..., d] (before σ).

        Semantics: v_i, or R_iᵀ(W_i h + b_i − R_i h)."""
        if self.cfg.method == "vector":
            return self.v[i]
        Ri = R[i]  # [r, d]
        return (h @ (self.W[i] - Ri).T + self.b[i]) @ Ri  # [..., d]

    def hooks(self, model) -> list:
        layers = hf_decoder_layers(model)
        state: dict[str, Any] = {}
        handles = []

        def pre(_m, _a):  # R is computed once per forward (at the first steered layer)
            state["R"] = self.R() if self.cfg.method == "lowrank" else None

        handles.append(layers[self.cfg.layers[0]].register_forward_pre_hook(pre))
        for i, L in enumerate(self.cfg.layers):
            def hook(_m, _inp, out, i=i):
                hs = out[0] if isinstance(out, tuple) else out
                hs = hs + self.sign * self.delta(i, hs, state["R"])
                return (hs, *out[1:]) if isinstance(out, tuple) else hs
            handles.append(layers[L].register_forward_hook(hook))
        return handles

    @torch.no_grad()
    def project(self, norms: torch.Tensor) -> None:
        """Vectors: ‖v_i‖ ≤ max_norm·norms[i]."""
        if self.cfg.method == "vector":
            cap = self.cfg.max_norm * norms  # [n]
            n = self.v.norm(dim=1).clamp_min(1e-12)
            self.v.mul_(torch.clamp(cap / n, max=1.0)[:, None])


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class _Seq:
    ids: list[int]
    start: int  # first completion token's position


def _encode_pair(tok, prompt: str, completion: str, max_tokens: int) -> _Seq:
    head = collect.encode_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    body = tok.encode(completion, add_special_tokens=False)[:max_tokens]
    end = tok.encode("<|im_end|>", add_special_tokens=False) if collect.has_chat_template(tok) else []
    if len(body) < max_tokens:
        body = body + end
    return _Seq(head.ids + body, len(head.ids))


def _batch(seqs: Sequence[_Seq], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids [B, T], attention [B, T], completion-target mask [B, T])."""
    T = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    tgt = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids)
        att[i, :n] = 1
        tgt[i, s.start:n] = True
    return ids, att, tgt


def _token_logprobs(model, ids: torch.Tensor, att: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of log p(token) over target positions [B] (the LM head only where needed)."""
    hs = model.get_decoder()(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
    pred = tgt[:, 1:]  # the token at t+1 is predicted at t
    h = hs[:, :-1][pred]  # [N, d]
    logits = model.get_output_embeddings()(h).float()  # [N, V]
    lp = torch.log_softmax(logits, -1).gather(1, ids[:, 1:][pred][:, None]).squeeze(1)  # [N]
    rows = torch.arange(ids.shape[0])[:, None].expand_as(pred)[pred]  # [N]
    return torch.zeros(ids.shape[0], dtype=lp.dtype).index_add(0, rows, lp)


def _full_logprobs(model, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """log p over the vocabulary at every attended position but the last: [N, V]."""
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1].float()
    return torch.log_softmax(logits[att[:, 1:].bool()], -1)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def layer_norms(model, tok, texts: Sequence[str], layers: Sequence[int]) -> dict[int, float]:
    """Median residual norm per layer over content tokens of ``texts`` (position 0 skipped)."""
    enc = [collect.encode_chat(tok, [{"role": "assistant", "content": t}], max_tokens=128) for t in texts]
    acts = collect.token_activations(model, enc, layers)
    return {L: float(np.median(np.linalg.norm(a, axis=1))) for L, a in acts.items()}


def train_feature(model, tok, pairs: Sequence[Pair], neutral: Sequence[str], cfg: TrainConfig,
                  init: dict[int, np.ndarray] | None = None, progress: bool = True,
                  desc: str = "train", on_step: Callable[[int, int], None] | None = None
                  ) -> TrainedFeature:
    """Fit one feature on ``pairs`` with the KL term on ``neutral`` texts (see the module doc).
    ``on_step(done, total)`` is called after every optimizer step (the workshop's progress)."""
    from tqdm.auto import tqdm

    if len(pairs) < 4:
        raise ValueError(f"{desc}: training needs at least 4 pairs (has {len(pairs)})")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    d = model.config.hidden_size
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_held = max(1, int(round(len(pairs) * cfg.heldout))) if len(pairs) >= 8 else 0
    held, train = order[:n_held], order[n_held:]
    seqs = [(_encode_pair(tok, p.prompt, p.positive, cfg.max_completion_tokens),
             _encode_pair(tok, p.prompt, p.negative, cfg.max_completion_tokens)) for p in pairs]
    with torch.no_grad():  # reference log-likelihoods, once
        ref = torch.zeros(len(pairs), 2)
        for a in range(0, len(pairs), 8):
            chunk = [s for pr in seqs[a:a + 8] for s in pr]
            ref[a:a + 8] = _token_logprobs(model, *_batch(chunk, pad)).view(-1, 2)
    neutral_enc = [collect.encode_chat(tok, [{"role": "assistant", "content": t}], max_tokens=64).ids
                   for t in neutral]
    norms_map = layer_norms(model, tok, list(neutral)[:64] or [p.negative for p in pairs], cfg.layers)
    norms = torch.tensor([norms_map[L] for L in cfg.layers])

    iv = Intervention(cfg, d, init)
    opt = torch.optim.Adam(iv.parameters(), lr=cfg.lr)
    handles = iv.hooks(model)
    hist: list[dict[str, float]] = []
    t0 = time.monotonic()
    stopped = None
    try:
        bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
        for step in bar:
            idx = rng.sample(train, min(cfg.batch_size, len(train)))
            sign = rng.choice((1.0, -1.0)) if cfg.bidirectional else 1.0
            iv.sign = sign
            chunk = [s for i in idx for s in seqs[i]]
            lp = _token_logprobs(model, *_batch(chunk, pad)).view(-1, 2)  # [B, 2] (pos, neg)
            r = lp - ref[idx]  # log-ratio to the unsteered model
            win, lose = (0, 1) if sign > 0 else (1, 0)
            pref = -F.logsigmoid(cfg.beta * (r[:, win] - r[:, lose])).mean()
            n_win = torch.tensor([len(seqs[i][win].ids) - seqs[i][win].start for i in idx], dtype=lp.dtype)
            sft = -(lp[:, win] / n_win).mean()
            loss = pref + cfg.sft_weight * sft
            kl = torch.zeros(())
            if cfg.kl_weight and neutral_enc:
                texts = [_Seq(ids, 0) for ids in rng.sample(neutral_enc, min(cfg.kl_batch, len(neutral_enc)))]
                ids, att, _ = _batch(texts, pad)
                with torch.no_grad():
                    iv.sign = 0.0
                    p0 = _full_logprobs(model, ids, att)
                    iv.sign = sign
                ps = _full_logprobs(model, ids, att)
                kl = F.kl_div(ps, p0, log_target=True, reduction="batchmean")
                loss = loss + cfg.kl_weight * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            iv.project(norms)
            row = {"step": step, "sign": sign, "loss": loss.item(), "pref": pref.item(),
                   "sft": sft.item(), "kl": kl.item(),
                   "margin": (r[:, win] - r[:, lose]).mean().item()}
            hist.append(row)
            bar.set_postfix(pref=f"{row['pref']:.3f}", kl=f"{row['kl']:.3f}")
            if on_step is not None:
                on_step(step + 1, cfg.steps)
            if cfg.time_budget_s is not None and time.monotonic() - t0 > cfg.time_budget_s:
                stopped = f"time budget {cfg.time_budget_s:g} s reached after {step + 1} steps"
                break
    finally:
        for h in handles:
            h.remove()
    elapsed = time.monotonic() - t0

    out = TrainedFeature(method=cfg.method, layers=list(cfg.layers),
                         resid_norm_p50={L: norms_map[L] for L in cfg.layers})
    with torch.no_grad():
        if cfg.method == "vector":
            out.directions = iv.v.detach().numpy().astype(np.float32).copy()
            out.readout = out.directions[0].copy()
        else:
            R = iv.R().detach()
            out.R = R.numpy().astype(np.float32).copy()
            out.W = iv.W.detach().numpy().astype(np.float32).copy()
            out.b = iv.b.detach().numpy().astype(np.float32).copy()
            out.readout = _lowrank_readout(model, tok, iv, pairs, train, cfg)
        held_acc = _preference_accuracy(model, iv, seqs, ref, held, pad) if held else None
    first = _mean(hist[: max(1, len(hist) // 5)])
    last = _mean(hist[-max(1, len(hist) // 5):])
    out.log = {"config": asdict(cfg), "pairs": len(pairs), "train_pairs": len(train),
               "heldout_pairs": len(held), "neutral_texts": len(neutral), "steps_run": len(hist),
               "seconds": round(elapsed, 1), "stopped_early": stopped,
               "loss_first": first, "loss_last": last, "heldout_preference_accuracy": held_acc,
               "norms": ([round(float(x), 3) for x in np.linalg.norm(out.directions, axis=1)]
                         if out.directions is not None else None)}
    return out


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = ("loss", "pref", "sft", "kl", "margin")
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys} if rows else {}


@torch.no_grad()
def _preference_accuracy(model, iv: Intervention, seqs, ref: torch.Tensor, held: list[int],
                         pad: int) -> dict[str, float]:
    """Share of held-out pairs the steered model prefers the right way, for σ = +1 and −1."""
    handles = iv.hooks(model)
    try:
        out = {}
        for sign, name in ((1.0, "plus"), (-1.0, "minus")):
            iv.sign = sign
            lp = _token_logprobs(model, *_batch([s for i in held for s in seqs[i]], pad)).view(-1, 2)
            r = lp - ref[held]
            ok = (r[:, 0] > r[:, 1]) if sign > 0 else (r[:, 1] > r[:, 0])
            out[name] = round(float(ok.float().mean()), 4)
        return out
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _lowrank_readout(model, tok, iv: Intervention, pairs: Sequence[Pair], train: list[int],
                     cfg: TrainConfig) -> np.ndarray:
    """The readout direction of a lowrank feature: the mean edit it makes at its first layer on
    the training positives' tokens (unit norm), so inspect and monitors read along what it adds."""
    L = cfg.layers[0]
    enc = [collect.encode_chat(tok, [{"role": "user", "content": pairs[i].prompt},
                                     {"role": "assistant", "content": pairs[i].positive}],
                               content_roles=("assistant",)) for i in train]
    acts = collect.token_activations(model, enc, [L])[L]
    h = torch.as_tensor(acts)
    edit = iv.delta(0, h, iv.R()).mean(0).numpy().astype(np.float64)
    n = np.linalg.norm(edit)
    if not n > 0:
        edit, n = iv.R()[0, 0].numpy().astype(np.float64), 1.0
    return (edit / n).astype(np.float32)


def mean_diff_init(model, tok, pairs: Sequence[Pair], layers: Sequence[int], fraction: float,
                   norms: dict[int, float]) -> dict[int, np.ndarray]:
    """Difference of means of the pairs' completions per layer, scaled to ``fraction`` × the
    layer's median residual norm: a starting point for a trained vector."""
    enc = [collect.encode_chat(tok, [{"role": "user", "content": p.prompt},
                                     {"role": "assistant", "content": t}], content_roles=("assistant",))
           for p in pairs for t in (p.positive, p.negative)]
    acts = collect.sample_activations(model, enc, list(layers), reduce="mean")
    out = {}
    for L, a in acts.items():
        md = a[0::2].mean(0) - a[1::2].mean(0)
        out[L] = (md / (np.linalg.norm(md) + 1e-12) * fraction * norms[L]).astype(np.float32)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


__all__ = ["METHODS", "Intervention", "Pair", "TrainConfig", "TrainedFeature", "cosine",
           "layer_norms", "mean_diff_init", "train_feature"]
