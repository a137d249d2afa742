"""Calibration: what strength 1.0 means for a feature.

**Unit (the dose).** ``Feature.scale`` c = ``DOSE_FRACTION`` (0.25, :mod:`steering.packs.manifest`)
× the median residual-stream norm at the feature's layer (over content tokens of the
calibration corpus; position 0 and chat template tokens skipped). So for *every* feature, ``add`` at strength s moves the stream by
s·c along the feature's unit direction, i.e. by s/4 of a typical stream norm, and ``clamp`` at
strength s pins act(h) (= h·d̂ for directions, the unit-decoder activation for SAE latents) to
s·c. ``{"formality": 0.5}`` and ``{"pack/L12:123": 0.5}`` are the same kind of dose.

Why not the feature's own p99 activation: measured on SmolLM2-135M-Instruct, the p99 of h·d̂
over the corpus ranged from 8.3 (hedging, L8) to 151 (enthusiasm, L6) for directions that
all steer usefully at ≈ 0.25×‖h‖ (≈ 35 at L12) and all turn to gibberish at ≈ 0.5×‖h‖ (≈ 70
at L12). The usable window is set by the stream norm, not by how far the concept naturally
varies, so a p99 unit would make strength 1 a no-op for some features and destructive for
others. The p50/p99/max of act(h) are still recorded per feature (for clamp targets and for
inspect: ``p99 / scale`` is "the strongest natural activation in strength units").

The recommended ``strength_range`` is where generations stayed coherent in our checks
(see feature_packs/README.md). The calibration corpus is the ``calibration`` split of the
offline corpora (:mod:`steering.builders.corpora`), or, in tests/tiny recipes, a list of texts.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from steering.builders import collect, corpora
from steering.packs.manifest import dose_scale

CAL_MAX_TOKENS = 192
CALIBRATION_UNIT = ("dose: scale = 0.25 x median residual norm at the feature's layer on the "
                    "calibration corpus (content tokens; position 0 and chat-template tokens "
                    "skipped). add at strength s moves h by s*scale along the unit direction; "
                    "clamp at s pins act(h) to s*scale. p50/p99/max are act(h) = h.d (directions) "
                    "or the unit-decoder JumpReLU/ReLU activation where active (SAE latents).")


def calibration_samples(tok, spec: dict[str, Any] | None, fallback_texts: Sequence[str] = ()
                        ) -> tuple[list[collect.Encoded], dict[str, Any]]:
    """Encoded calibration samples and a description of them for the manifest.

    ``spec``: {"corpus": ["chitchat", "wiki"], "samples": 120} (per corpus), or
    {"corpus": "texts", "texts": [...]} / {"corpus": "recipe"} (use ``fallback_texts``)."""
    spec = dict(spec or {"corpus": ["chitchat", "wiki"]})
    c = spec.get("corpus", ["chitchat", "wiki"])
    if c in ("texts", "recipe"):
        texts = list(spec.get("texts") or fallback_texts)
        enc = [collect.encode_chat(tok, [{"role": "assistant", "content": t}], max_tokens=CAL_MAX_TOKENS)
               for t in texts]
        return enc, {"corpus": c, "samples": len(enc), "tokens": sum(sum(e.mask) for e in enc)}
    names = [c] if isinstance(c, str) else list(c)
    n = int(spec.get("samples", 120))
    enc = []
    for name in names:
        for conv in corpora.load_corpus(name, "calibration")[:n]:
            enc.append(collect.encode_chat(tok, conv, max_tokens=CAL_MAX_TOKENS))
    info = {"corpus": {name: corpora.corpus_info([name])[name] for name in names},
            "split": "calibration", "samples": len(enc), "tokens": sum(sum(e.mask) for e in enc),
            "max_tokens_per_sample": CAL_MAX_TOKENS}
    return enc, info


def layer_tokens(model, encoded: Sequence[collect.Encoded], layers: Sequence[int],
                 progress: bool = False) -> dict[int, np.ndarray]:
    """Content-token activations of the calibration samples at ``layers``."""
    return collect.token_activations(model, encoded, sorted(set(layers)), progress=progress,
                                     desc="calibration")


def direction_stats(acts: np.ndarray, direction: np.ndarray) -> dict[str, float]:
    """Calibration numbers for a direction feature from token activations [N, d]."""
    d = np.asarray(direction, np.float64)
    unit = d / np.linalg.norm(d)
    proj = acts.astype(np.float64) @ unit
    norms = np.linalg.norm(acts.astype(np.float64), axis=1)
    p50, p99 = np.percentile(proj, [50, 99])
    rn = float(np.median(norms))
    return {"scale": dose_scale(rn), "p50": float(p50), "p99": float(p99), "max": float(proj.max()),
            "min": float(proj.min()), "std": float(proj.std()),
            "direction_norm": float(np.linalg.norm(d)), "resid_norm_p50": rn,
            "tokens": int(len(proj))}


def latent_stats(acts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-latent p50/p99/max over active tokens and firing frequency, from acts [N, m]."""
    m = acts.shape[1]
    p50 = np.zeros(m, np.float32)
    p99 = np.zeros(m, np.float32)
    mx = acts.max(0).astype(np.float32)
    freq = (acts > 0).mean(0).astype(np.float32)
    for i in range(m):
        col = acts[:, i]
        col = col[col > 0]
        if len(col):
            p50[i], p99[i] = np.percentile(col, [50, 99])
    return {"latent_p50": p50, "latent_p99": p99, "latent_max": mx, "latent_freq": freq}
