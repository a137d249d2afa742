"""Helpers shared by the feature-pack tests (a fake model folder, packs, SAEs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from steering.packs import PackWriter, SAE, model_fingerprint

D, LAYERS, VOCAB = 16, 4, 50


def make_fake_model(path: Path, seed: int = 0, d: int = D, layers: int = LAYERS) -> Path:
    """config.json + model.safetensors with the tensors a fingerprint reads (not runnable)."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(VOCAB, d, generator=g).to(torch.bfloat16),
         "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    for i in range(layers):
        t[f"model.layers.{i}.input_layernorm.weight"] = (1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(
        {"hidden_size": d, "num_hidden_layers": layers, "vocab_size": VOCAB, "model_type": "llama"}))
    return path


def make_sae(d: int = D, m: int = 24, layer: int = 2, activation: str = "relu", sid: str = "L2") -> SAE:
    rng = np.random.default_rng(1)
    W_dec = rng.normal(size=(m, d)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return SAE(id=sid, layer=layer, activation=activation,
               W_enc=np.ascontiguousarray(W_dec.T * 0.9), b_enc=rng.normal(size=m).astype(np.float32) * 0.1,
               W_dec=W_dec, b_dec=rng.normal(size=d).astype(np.float32) * 0.1,
               threshold=np.full(m, 0.05, np.float32) if activation == "jumprelu" else None,
               latent_p99=np.full(m, 2.0, np.float32),
               labels=[{"label": f"latent {i} " + ("bridge" if i == 3 else "misc"),
                        "top_tokens": ["Golden", "Gate"] if i == 3 else ["the"]} for i in range(m)])


def write_pack(out: Path, model_dir: Path, name: str = "tone", features=("formality", "humor"),
               with_sae: bool = False, tags=("tone",)) -> Path:
    fp = model_fingerprint(model_dir)
    w = PackWriter(name, "0.1.0", fp, model_id="fake/model", description=f"{name} test pack",
                   provenance={"builder": "tests"})
    rng = np.random.default_rng(abs(hash(name)) % 1000)
    for i, f in enumerate(features):
        w.add_feature(f, layer=1 + i % 2, kind="direction", direction=rng.normal(size=fp["hidden_size"]),
                      calibration={"scale": 3.0 + i, "p50": 0.5, "p99": 3.0 + i, "max": 9.0},
                      description=f"the {f} of the text", tags=list(tags))
    if with_sae:
        sae = make_sae(fp["hidden_size"])
        w.add_sae(sae, info={"metrics": {"fvu": 0.2}},
                  labels={"latents": sae.labels})
        w.add_feature("bridge", layer=sae.layer, kind="sae", direction=sae.W_dec[3],
                      encoder=sae.W_enc[:, 3], bias=float(sae.b_enc[3] - sae.W_enc[:, 3] @ sae.b_dec),
                      calibration={"scale": 2.0}, source={"sae": sae.id, "latent": 3},
                      description="Golden Gate Bridge", tags=["topic"])
    return w.write(out / name)

