"""Files of a pack and of a model: sha256, safetensors read/write, the model fingerprint.

Tensors are read and written with safetensors (never pickles). Nothing here knows the manifest;
:mod:`steering.packs.format` turns problems into :class:`~steering.packs.manifest.PackError`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

# Suffixes of the weights hashed into a model fingerprint ({last} = the last decoder layer).
FINGERPRINT_TENSORS = (
    "embed_tokens.weight",
    "layers.0.input_layernorm.weight",
    "layers.{last}.post_attention_layernorm.weight",
    "norm.weight",
)
_DTYPES = ("float32", "bfloat16", "float16")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """Identify a Hugging Face model folder: hidden size, layer count, vocab size and a sha256
    over the raw bytes (with name, dtype and shape) of a few weights (:data:`FINGERPRINT_TENSORS`)
    read straight from its safetensors files. The same weights saved in another dtype give
    another fingerprint. A JSON-ready dict, the shape of
    :class:`~steering.packs.manifest.ModelFingerprint`."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    hidden, layers, vocab = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights")
    where: dict[str, tuple[Path, dict[str, Any], int]] = {}
    for p in files:
        header, base = _safetensors_header(p)
        for k, v in header.items():
            if k != "__metadata__":
                where[k] = (p, v, base)
    wanted = [s.format(last=layers - 1) for s in FINGERPRINT_TENSORS]
    h = hashlib.sha256()
    used = []
    for suffix in wanted:
        hits = sorted(k for k in where if k == suffix or k.endswith("." + suffix))
        if not hits:
            continue
        key = hits[0]
        p, info, base = where[key]
        s, e = info["data_offsets"]
        h.update(f"{suffix}|{info['dtype']}|{info['shape']}|".encode())
        with open(p, "rb") as f:
            f.seek(base + s)
            remaining = e - s
            while remaining:
                chunk = f.read(min(remaining, 1 << 22))
                if not chunk:
                    raise ValueError(f"{p} is truncated")
                h.update(chunk)
                remaining -= len(chunk)
        used.append(suffix)
    if not used:
        raise ValueError(f"{model_dir}: none of {wanted} found in the weights")
    return {"hidden_size": hidden, "num_layers": layers, "vocab_size": vocab,
            "tensors": used, "sha256": h.hexdigest()}


def save_tensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "float32",
                 metadata: dict[str, str] | None = None, keep_float32: tuple[str, ...] = ()) -> None:
    """Write numpy arrays to a safetensors file in ``dtype`` (float32 | bfloat16 | float16);
    the names in ``keep_float32`` stay float32 whatever ``dtype`` is."""
    import torch
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {_DTYPES}")
    td = getattr(torch, dtype)
    out = {}
    for k, v in tensors.items():
        a = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
        if not a.flags.writeable:  # e.g. a view of a read-only safetensors buffer
            a = a.copy()
        t = torch.from_numpy(a)
        out[k] = t if k in keep_float32 else t.to(td).contiguous()
    save_file(out, str(path), metadata=metadata)


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file as float32 numpy arrays (any float dtype on disk)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k).float().numpy()
    return out
