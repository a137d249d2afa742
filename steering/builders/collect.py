"""Residual-stream collection on a transformers model (the builders' shared engine).

Activations are read at ``blocks.{L}.hook_resid_post`` (the output of decoder block L) through
forward hooks, the same site steering writes to. Two kinds of positions never count:

* position 0: on SmolLM2 (and many Llama-style models) the first position is an attention sink
  whose residual norm is ~100× the others; it would dominate every mean and percentile;
* chat-template tokens (``<|im_start|>``, role names, ``<|im_end|>``, the default system prompt):
  identical in every sample, so they carry no concept signal.

Texts are tokenized segment by segment (template pieces and content pieces separately) so the
content mask is exact without offset mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass
class Encoded:
    """One tokenized sample: ids and the content mask (True = counts for statistics)."""

    ids: list[int]
    mask: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


_MODELS: dict[tuple[str, torch.dtype], tuple[Any, Any]] = {}


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode on CPU; float32 by default for collection.

    Cached per (folder, dtype) within the process (the builders only read activations through
    temporary hooks, so a shared model stays unmodified)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = (str(Path(model_dir).resolve()), dtype)
    if key not in _MODELS:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        model.eval()
        _MODELS.clear()  # keep at most one model resident
        _MODELS[key] = (model, tok)
    return _MODELS[key]


def has_chat_template(tok) -> bool:
    return "<|im_start|>" in (getattr(tok, "chat_template", None) or "")


def encode_chat(tok, messages: Sequence[dict[str, str]], system: str | None = DEFAULT_SYSTEM,
                add_generation_prompt: bool = False, max_tokens: int | None = None,
                content_roles: Sequence[str] = ("user", "assistant")) -> Encoded:
    """ChatML-encode ``messages`` ({role, content}); only the contents of messages whose role is
    in ``content_roles`` are unmasked.

    Mirrors SmolLM2's template (a default system prompt when the first message is not a system
    message). Models without ChatML fall back to plain concatenated contents.
    """
    ids: list[int] = []
    mask: list[bool] = []

    def piece(text: str, content: bool) -> None:
        if not text:
            return
        t = tok.encode(text, add_special_tokens=False)
        ids.extend(t)
        mask.extend([content] * len(t))

    if not has_chat_template(tok):
        for i, m in enumerate(messages):
            piece(("\n" if i else "") + m["content"], m["role"] in content_roles)
    else:
        msgs = list(messages)
        if system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": system}] + msgs
        for m in msgs:
            piece(f"<|im_start|>{m['role']}\n", False)
            # A system prompt is template: identical across samples.
            piece(m["content"], m["role"] != "system" and m["role"] in content_roles)
            piece("<|im_end|>\n", False)
        if add_generation_prompt:
            piece("<|im_start|>assistant\n", False)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    if mask:
        mask[0] = False  # the attention sink
    return Encoded(ids, mask)


def encode_plain(tok, text: str, max_tokens: int | None = None) -> Encoded:
    """Plain text with the BOS token when the tokenizer has one; position 0 masked."""
    ids = tok.encode(text, add_special_tokens=False)
    bos = getattr(tok, "bos_token_id", None)
    if bos is not None:
        ids = [bos] + ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    mask = [True] * len(ids)
    if mask:
        mask[0] = False
    return Encoded(ids, mask)


def encode_sample(tok, sample: Any, chat: bool = True, max_tokens: int | None = None) -> Encoded:
    """A sample is a string (a user turn when ``chat``, else plain text), or a message list,
    or {"prompt", "response"} (user / assistant turns)."""
    if isinstance(sample, Encoded):
        return sample
    if isinstance(sample, dict):
        msgs = [{"role": "user", "content": sample["prompt"]}]
        if sample.get("response"):
            msgs.append({"role": "assistant", "content": sample["response"]})
        return encode_chat(tok, msgs, max_tokens=max_tokens)
    if isinstance(sample, list):
        return encode_chat(tok, sample, max_tokens=max_tokens)
    if chat and has_chat_template(tok):
        return encode_chat(tok, [{"role": "user", "content": str(sample)}], max_tokens=max_tokens)
    return encode_plain(tok, str(sample), max_tokens=max_tokens)


class _Stop(Exception):
    pass


def _base(model):
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


def num_layers(model) -> int:
    return len(_base(model).layers)


@torch.no_grad()
def residuals(model, batch: Sequence[Encoded], layers: Sequence[int], pad_id: int = 0
              ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Right-padded forward of ``batch``; returns ({layer: [B, T, d] float32}, mask [B, T]).

    Only runs the decoder up to the deepest requested layer (no LM head).
    """
    layers = sorted(set(int(x) for x in layers))
    base = _base(model)
    T = max(len(e) for e in batch)
    B = len(batch)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    msk = torch.zeros((B, T), dtype=torch.bool)
    for i, e in enumerate(batch):
        n = len(e)
        ids[i, :n] = torch.tensor(e.ids)
        att[i, :n] = 1
        msk[i, :n] = torch.tensor(e.mask)
    out: dict[int, torch.Tensor] = {}
    last = layers[-1]
    handles = []
    for L in layers:
        def hook(_m, _i, o, L=L):
            hs = o[0] if isinstance(o, tuple) else o
            out[L] = hs.detach().float()
            if L == last:
                raise _Stop()
        handles.append(base.layers[L].register_forward_hook(hook))
    try:
        base(input_ids=ids, attention_mask=att, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out, msk


def batches_by_length(encoded: Sequence[Encoded], max_batch_tokens: int = 4096
                      ) -> Iterator[list[int]]:
    """Index batches of similar length (sorted) under a padded-token budget."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    cur: list[int] = []
    for i in order:
        n = len(encoded[i])
        if cur and (len(cur) + 1) * max(n, len(encoded[cur[-1]])) > max_batch_tokens:
            yield cur
            cur = []
        cur.append(i)
    if cur:
        yield cur


@torch.no_grad()
def sample_activations(model, encoded: Sequence[Encoded], layers: Sequence[int],
                       reduce: str = "mean", max_batch_tokens: int = 4096, progress: bool = False,
                       desc: str = "activations") -> dict[int, np.ndarray]:
    """Per-sample reduced activations: {layer: [N, d]} (``reduce`` = mean | last over content)."""
    from tqdm.auto import tqdm

    d = None
    res: dict[int, np.ndarray] = {}
    batches = list(batches_by_length(encoded, max_batch_tokens))
    for idx in tqdm(batches, desc=desc, disable=not progress):
        acts, msk = residuals(model, [encoded[i] for i in idx], layers)
        for L, a in acts.items():
            if d is None:
                d = a.shape[-1]
            if L not in res:
                res[L] = np.zeros((len(encoded), a.shape[-1]), np.float32)
            for j, i in enumerate(idx):
                m = msk[j]
                if not m.any():
                    raise ValueError(f"sample {i} has no content tokens")
                rows = a[j][m]
                res[L][i] = (rows.mean(0) if reduce == "mean" else rows[-1]).numpy()
    return res


@torch.no_grad()
def token_activations(model, encoded: Sequence[Encoded], layers: Sequence[int],
                      max_batch_tokens: int = 4096, progress: bool = False,
                      desc: str = "activations") -> dict[int, np.ndarray]:
    """All content-token activations: {layer: [N_tokens, d] float32} (in sample order)."""
    from tqdm.auto import tqdm

    chunks: dict[int, list[tuple[int, np.ndarray]]] = {}
    for idx in tqdm(list(batches_by_length(encoded, max_batch_tokens)), desc=desc,
                    disable=not progress):
        acts, msk = residuals(model, [encoded[i] for i in idx], layers)
        for L, a in acts.items():
            for j, i in enumerate(idx):
                chunks.setdefault(L, []).append((i, a[j][msk[j]].numpy()))
    out = {}
    for L, lst in chunks.items():
        lst.sort(key=lambda t: t[0])
        out[L] = np.concatenate([x for _, x in lst]) if lst else np.zeros((0, 0), np.float32)
    return out


def iter_token_activations(model, encoded: Iterable[Encoded], layer: int, batch_size: int = 16
                           ) -> Iterator[tuple[np.ndarray, list[tuple[int, int]]]]:
    """Stream (acts [n, d] float32, [(sample_index, position)]) over ``encoded`` in order."""
    buf: list[tuple[int, Encoded]] = []

    def flush():
        acts, msk = residuals(model, [e for _, e in buf], [layer])
        a = acts[layer]
        rows, where = [], []
        for j, (i, e) in enumerate(buf):
            pos = torch.nonzero(msk[j]).flatten()
            rows.append(a[j, pos].numpy())
            where.extend((i, int(p)) for p in pos)
        return np.concatenate(rows), where

    for i, e in enumerate(encoded):
        buf.append((i, e))
        if len(buf) == batch_size:
            yield flush()
            buf = []
    if buf:
        yield flush()
