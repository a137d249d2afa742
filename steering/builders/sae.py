"""SAE builder: collect residual activations, train a TopK SAE, label latents, write a pack.

Pipeline (:func:`train_sae`, options :data:`DEFAULTS`): (1) :func:`collect_activations` streams
chat-formatted samples from the offline corpora through the model and stores content-token
activations at ``blocks.{L}.hook_resid_post`` in float16 shards (resumable: rerunning continues
where it stopped); (2) :func:`~steering.builders.sae_train.train_topk_sae` fits a TopK SAE (Gao et
al. 2024) with unit-norm decoder rows and an AuxK loss against dead latents; (3)
:func:`~steering.builders.sae_train.reconstruction_metrics` and
:func:`~steering.builders.sae_train.downstream_loss` report normalized MSE, fraction of variance
explained, L0, dead-latent % and the downstream CE-loss increase when the reconstruction
replaces the stream; (4) :func:`~steering.builders.sae_label.label_latents` keeps each latent's
top-activating contexts (top tokens + snippets) in a JSON sidecar; (5)
:func:`~steering.builders.sae_label.match_concepts` matches named features to contrastive concept
directions by cosine and activation correlation; (6) everything is written as a pack.

Activation of latent i in the pack (a "topk" SAE is stored as a ReLU SAE with threshold 0 plus
its k; steering uses the per-latent ReLU form act = ReLU(e·h + b), which is what the latent
computes whenever it is among the top k):  act_i(h) = ReLU(W_enc[:, i]·(h − b_dec) + b_enc[i]).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from steering.builders import calibration as cal
from steering.builders import collect, corpora
from steering.builders.contrastive import _git_rev
from steering.packs.manifest import dose_scale
from steering.packs.registry import default_pack_dir
from steering.builders.sae_label import label_latents, match_concepts, sparse_codes
from steering.builders.sae_train import TopKSAE, downstream_loss, reconstruction_metrics, train_topk_sae
from steering.packs.tensors import model_fingerprint
from steering.packs.writer import PackWriter

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
    """Options from an SAE recipe YAML (keys of :data:`DEFAULTS`; ``concepts_recipe`` relative
    to the recipe's folder)."""
    import yaml

    r = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(r) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    if r.get("concepts_recipe") and not Path(r["concepts_recipe"]).is_absolute():
        r["concepts_recipe"] = str(Path(path).resolve().parent / r["concepts_recipe"])
    return r


def _train_or_resume(o: dict[str, Any], act_dir: Path, train_acts: np.ndarray, progress: bool
                     ) -> tuple[TopKSAE, list[dict[str, Any]], float | None, Path]:
    """(SAE, training log, train seconds, checkpoint): trained, or read back from the checkpoint
    of the same configuration, so a failure after training does not cost a rerun."""
    from safetensors.torch import load_file, save_file

    ckpt = act_dir / ("sae_d{d_sae}_k{k}_e{epochs}_lr{lr}_b{batch_size}_s{seed}_n{n}.safetensors".format(
        n=len(train_acts), **{k_: o[k_] for k_ in ("d_sae", "k", "epochs", "lr", "batch_size", "seed")}))
    log_file = ckpt.with_suffix(".log.json")
    if ckpt.exists():
        sae_t = TopKSAE(train_acts.shape[1], int(o["d_sae"]), int(o["k"]))
        sae_t.load_state_dict(load_file(str(ckpt)))
        saved = json.loads(log_file.read_text()) if log_file.exists() else []
        # {"log", "train_seconds"}; a bare list from before the time was kept
        log, train_seconds = (saved, None) if isinstance(saved, list) else (saved["log"], saved["train_seconds"])
        return sae_t, log, train_seconds, ckpt
    t1 = time.time()
    log: list[dict[str, Any]] = []
    sae_t = train_topk_sae(train_acts, int(o["d_sae"]), int(o["k"]), float(o["epochs"]),
                           int(o["batch_size"]), float(o["lr"]), seed=int(o["seed"]),
                           progress=progress, log=log)
    save_file({k_: v.detach().contiguous() for k_, v in sae_t.state_dict().items()}, str(ckpt))
    train_seconds = round(time.time() - t1, 1)
    log_file.write_text(json.dumps({"log": log, "train_seconds": train_seconds}))
    return sae_t, log, train_seconds, ckpt


def _recipe_record(o: dict[str, Any]) -> dict[str, Any]:
    """The options as recorded in ``provenance.recipe`` (paths by name, no local folders)."""
    def plain(k: str, v: Any) -> Any:
        if k == "concepts_recipe" and isinstance(v, (str, Path)):
            return Path(v).name
        if k == "concepts_recipe" and isinstance(v, dict):
            return "inline"
        return str(v) if isinstance(v, Path) else v

    return {k: plain(k, v) for k, v in o.items() if k not in ("activations_dir", "model")}


def train_sae(out: str | Path | None = None, progress: bool = True, **kw: Any) -> Path:
    """Collect → train → evaluate → label → match concepts → write the SAE pack (see DEFAULTS)."""
    from steering.model_store import cache_root, resolve_model

    unknown = set(kw) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    o = {**DEFAULTS, **{k: v for k, v in kw.items() if v is not None}}
    torch.manual_seed(o["seed"])
    np.random.seed(o["seed"])
    model_dir = o["model"] if o["model"] is not None else resolve_model(None)
    layer = int(o["layer"])
    name = o["name"] or f"{Path(str(model_dir)).name.lower()}-sae-l{layer}"
    act_dir = Path(o["activations_dir"] or cache_root() / "activations" / f"{Path(str(model_dir)).name}-L{layer}")
    index = collect_activations(model_dir, layer, int(o["tokens"]), act_dir, o["corpora"],
                                o["max_tokens_per_sample"], progress=progress)
    acts, where = load_activations(act_dir, int(o["tokens"]))  # [N, d], [N, 3]
    n_eval = min(int(o["eval_tokens"]), len(acts) // 10)
    train_acts, eval_acts = acts[:-n_eval], acts[-n_eval:]
    sae_t, log, train_seconds, ckpt = _train_or_resume(o, act_dir, train_acts, progress)
    t2 = time.time()
    sae_t.eval()
    metrics = reconstruction_metrics(sae_t, eval_acts)
    model, tok = collect.load_model(model_dir)
    sae_np = sae_t.to_sae(f"L{layer}", layer)
    enc_cal, cal_info = cal.calibration_samples(tok, {"corpus": list(o["corpora"]),
                                                      "samples": max(1, int(o["ce_samples"]) // 2)})
    if int(o["ce_samples"]) > 0:  # 0 skips the (full-model) downstream-loss evaluation
        metrics.update(downstream_loss(model, enc_cal, layer, sae_np))
    V, I = sparse_codes(sae_t, acts, progress=progress)  # [N, k] values, latent ids
    samples = corpus_samples(tok, o["corpora"], "train", o["max_tokens_per_sample"],
                             limit=int(where[:, 0].max()) + 1)
    labels, stats = label_latents(V, I, where, samples, tok, int(o["d_sae"]))
    for k_, v in stats.items():
        setattr(sae_np, k_, v)
    resid_norm = float(np.median(np.linalg.norm(eval_acts.astype(np.float32), axis=1)))
    t3 = time.time()
    info = {
        "metrics": {k_: (round(v, 5) if isinstance(v, float) else v) for k_, v in metrics.items()},
        "calibration": {"resid_norm_p50": resid_norm, "scale": dose_scale(resid_norm)},
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
    w = PackWriter(name, str(o["version"]), model_fingerprint(model_dir),
                   model_id="HuggingFaceTB/SmolLM2-135M-Instruct"
                   if "SmolLM2-135M-Instruct" in str(model_dir) else Path(str(model_dir)).name,
                   description=f"TopK SAE (k={o['k']}, d_sae={o['d_sae']}) on blocks.{layer}.hook_resid_post, "
                               "trained by steering.builders.sae, latents labelled by top-activating contexts",
                   license=str(o["license"]),
                   provenance={"builder": "steering.packs.sae/1", "git": _git_rev(),
                               "corpus": {"corpora": index["corpora"], "split": "train",
                                          "tokens": int(len(acts)),
                                          "max_tokens_per_sample": o["max_tokens_per_sample"],
                                          "skipped": "position 0, chat-template tokens, default system prompt"},
                               "recipe": _recipe_record(o)},
                   calibration={"unit": cal.CALIBRATION_UNIT, **cal_info})
    matches = {}
    if o["concepts_recipe"]:
        matches = match_concepts(model, tok, sae_t, o["concepts_recipe"], layer,
                                 float(o["min_corr"]), float(o["min_cos"]))
        info["concept_matches"] = {c: {"candidates": m["candidates"], "chosen": m["chosen"]}
                                   for c, m in matches.items()}
    w.add_sae(sae_np, info=info, labels={"latents": labels, "source": "top-activating contexts"})
    for cname, m in matches.items():
        if not m["chosen"]:
            continue
        i = m["chosen"]["latent"]
        f = sae_np.latent_feature(i, f"{cname}_latent")
        w.add_feature(
            f"{cname}_latent", layer, "sae", f.direction, encoder=f.encoder, bias=f.bias,
            threshold=f.threshold,
            calibration={"scale": dose_scale(resid_norm), "p50": float(stats["latent_p50"][i]),
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
        out = default_pack_dir(name)
    return w.write(out)
