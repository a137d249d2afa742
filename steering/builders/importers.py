"""Importers and exporters: SAELens SAE folders and llama.cpp / repeng GGUF control vectors.

* :func:`import_saelens` reads ``cfg.json`` + ``sae_weights.safetensors`` (W_enc [d_in, d_sae],
  b_enc, W_dec [d_sae, d_in], b_dec, threshold for JumpReLU) and an optional Neuronpedia
  explanations JSON into a pack with one SAE (id ``L{layer}``); every latent is addressable as
  ``pack/L{layer}:{i}``. Encoding follows SAELens: pre = (h − b_dec)·W_enc + b_enc (without
  the ``− b_dec`` when ``apply_b_dec_to_input`` is false), then ReLU / JumpReLU / TopK.
* :func:`import_gguf` reads a GGUF of architecture ``controlvector`` (tensors ``direction.{L}``,
  applied by llama.cpp to the output of block L, i.e. ``blocks.{L}.hook_resid_post``) into a
  pack with one direction feature per layer, ``layer_{L}``, whose scale is the vector's norm:
  strength 1 adds exactly the file's vector (llama.cpp's ``--control-vector`` at scale 1).
* :func:`export_gguf` writes chosen direction features of a pack (at most one per layer, each
  at a given strength in the pack's units) as such a GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from steering.packs.format import SAE, load_pack, validate_pack
from steering.packs.manifest import PackError
from steering.packs.registry import bundled_packs_dir, discover_packs
from steering.packs.tensors import load_tensors, model_fingerprint
from steering.packs.writer import PackWriter

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
GGUF_ARCH = "controlvector"


def _default_model(model_dir):
    if model_dir is not None:
        return Path(model_dir)
    from steering.model_store import resolve_model

    return resolve_model(None)


def _layer_from_hook(hook: str, label: str) -> int:
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "hook_resid_post" and parts[1].isdigit():
        return int(parts[1])
    raise PackError(label, f"hook_name {hook!r} is not blocks.N.hook_resid_post (only residual-stream "
                           "SAEs after a block can steer here)")


def _explanations(path: Path | None, d_sae: int) -> dict[int, str]:
    """Neuronpedia exports: a list of {index, description} (or {explanations: [...]})."""
    if path is None:
        return {}
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("explanations", data.get("features", []))
    out: dict[int, str] = {}
    for e in data:
        try:
            i = int(e.get("index", e.get("feature", e.get("featureIndex"))))
        except (TypeError, ValueError):
            continue
        desc = e.get("description") or e.get("explanation") or ""
        if 0 <= i < d_sae and desc and i not in out:
            out[i] = str(desc).strip()
    return out


def import_saelens(sae_dir: str | Path, out: str | Path | None = None,
                   model_dir: str | Path | None = None, name: str | None = None,
                   explanations: str | Path | None = None, calibrate: bool = True,
                   license: str = "see source", version: str = "1.0.0") -> Path:
    """Convert a SAELens SAE folder into a pack for the model in ``model_dir`` (default: the
    bundled model). ``calibrate`` measures the layer's median residual norm on a few
    calibration samples so latents get the pack dose unit (else strength = raw activation)."""
    sae_dir = Path(sae_dir)
    label = name or f"saelens-{sae_dir.name}"
    if not (sae_dir / SAELENS_CFG).is_file() or not (sae_dir / SAELENS_WEIGHTS).is_file():
        raise PackError(label, f"{sae_dir} needs {SAELENS_CFG} and {SAELENS_WEIGHTS}")
    cfg = json.loads((sae_dir / SAELENS_CFG).read_text())
    layer = _layer_from_hook(str(cfg.get("hook_name", "")), label)
    t = load_tensors(sae_dir / SAELENS_WEIGHTS)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if k not in t:
            raise PackError(label, f"{SAELENS_WEIGHTS} lacks {k!r}")
    arch = str(cfg.get("architecture", "standard")).lower()
    act_fn = str(cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))).lower()
    k = None
    if arch == "jumprelu":
        activation = "jumprelu"
        if "threshold" not in t:
            if "log_threshold" in t:
                t["threshold"] = np.exp(t["log_threshold"])
            else:
                raise PackError(label, "a JumpReLU SAE needs a 'threshold' tensor")
    elif arch == "topk" or act_fn == "topk":
        activation = "topk"
        k = int((cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k", 0)) or 0) or None
        if k is None:
            raise PackError(label, "a TopK SAE needs k (activation_fn_kwargs.k)")
    elif act_fn == "relu" and arch == "standard":
        activation = "relu"
    else:
        raise PackError(label, f"unsupported SAE architecture {arch!r} / activation {act_fn!r}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise PackError(label, f"normalize_activations={norm!r} is not supported (only 'none')")
    W_enc, W_dec = t["W_enc"], t["W_dec"]
    d_in, d_sae = int(cfg.get("d_in", W_enc.shape[0])), int(cfg.get("d_sae", W_enc.shape[1]))
    if W_enc.shape != (d_in, d_sae) or W_dec.shape != (d_sae, d_in):
        raise PackError(label, f"W_enc {W_enc.shape} / W_dec {W_dec.shape} do not match d_in={d_in}, d_sae={d_sae}")
    b_dec = t["b_dec"]
    meta: dict[str, Any] = {}
    if cfg.get("apply_b_dec_to_input", True) is False:
        # encode uses h directly: fold it as b_enc' = b_enc + b_dec·W_enc so pre stays exact
        t["b_enc"] = t["b_enc"] + b_dec @ W_enc
        meta["apply_b_dec_to_input"] = False
    model_dir = _default_model(model_dir)
    fp = model_fingerprint(model_dir)
    if d_in != fp["hidden_size"]:
        raise PackError(label, f"SAE d_in {d_in} does not match the model's hidden size {fp['hidden_size']}")
    if not 0 <= layer < fp["num_layers"]:
        raise PackError(label, f"layer {layer} outside the model's {fp['num_layers']} layers")
    expl = _explanations(Path(explanations) if explanations else None, d_sae)
    labels = {"latents": [({"label": expl[i], "explanation": expl[i]} if i in expl else {})
                          for i in range(d_sae)], "source": "neuronpedia" if expl else None}
    sae = SAE(id=f"L{layer}", layer=layer, activation=activation, W_enc=W_enc, b_enc=t["b_enc"],
              W_dec=W_dec, b_dec=b_dec, threshold=t.get("threshold"), k=k)
    info: dict[str, Any] = {"source": {"format": "saelens", "model_name": cfg.get("model_name"),
                                       "hook_name": cfg.get("hook_name"), "architecture": arch,
                                       "release": cfg.get("neuronpedia_id") or cfg.get("release")},
                            **meta}
    if calibrate:
        info["calibration"] = {"resid_norm_p50": _resid_norm(model_dir, layer)}
    w = PackWriter(label, version, fp, model_id=str(cfg.get("model_name") or ""),
                   description=f"SAELens SAE at {cfg.get('hook_name')} ({activation}, d_sae={d_sae})",
                   license=license, provenance={"builder": "steering.builders.importers.import_saelens",
                                                "source": str(sae_dir.name)})
    w.add_sae(sae, info=info, labels=labels if expl else None)
    return w.write(out or Path.cwd() / label, sae_dtype="float32")


def _resid_norm(model_dir: Path, layer: int, samples: int = 24) -> float:
    from steering.builders import calibration as cal
    from steering.builders import collect

    model, tok = collect.load_model(model_dir)
    enc, _ = cal.calibration_samples(tok, {"corpus": ["chitchat", "wiki"], "samples": samples // 2})
    acts = cal.layer_tokens(model, enc, [layer])[layer]
    return float(np.median(np.linalg.norm(acts, axis=1)))


# ---------------------------------------------------------------------------------------------
# GGUF control vectors
# ---------------------------------------------------------------------------------------------
def import_gguf(file: str | Path, out: str | Path | None = None, model_dir: str | Path | None = None,
                name: str | None = None, license: str = "see source") -> Path:
    """A llama.cpp / repeng control-vector GGUF → a pack (one ``layer_{L}`` feature per layer)."""
    from gguf import GGUFReader

    file = Path(file)
    label = name or file.stem.replace(" ", "-")
    try:
        reader = GGUFReader(str(file))
    except Exception as e:  # noqa: BLE001
        raise PackError(label, f"{file.name} is not a readable GGUF file: {e}") from None
    arch_f = reader.get_field("general.architecture")
    arch = arch_f.contents() if arch_f is not None else None
    if arch != GGUF_ARCH:
        raise PackError(label, f"GGUF architecture is {arch!r}, expected {GGUF_ARCH!r}")
    hint_f = reader.get_field(f"{GGUF_ARCH}.model_hint")
    hint = hint_f.contents() if hint_f is not None else ""
    dirs: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        if not t.name.startswith("direction."):
            continue
        try:
            layer = int(t.name.split(".", 1)[1])
        except ValueError:
            raise PackError(label, f"bad tensor name {t.name!r} (expected direction.N)") from None
        v = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(v)):
            raise PackError(label, f"{t.name} has NaN/inf values")
        dirs[layer] = v
    if not dirs:
        raise PackError(label, "no direction.N tensors in the file")
    model_dir = _default_model(model_dir)
    fp = model_fingerprint(model_dir)
    w = PackWriter(label, "1.0.0", fp, model_id=str(hint), license=license,
                   description=f"control vector imported from {file.name}",
                   provenance={"builder": "steering.builders.importers.import_gguf", "source": file.name})
    for layer in sorted(dirs):
        v = dirs[layer]
        if v.shape != (fp["hidden_size"],):
            raise PackError(label, f"direction.{layer} has {v.size} values; the model's hidden size is {fp['hidden_size']}")
        if not 0 <= layer < fp["num_layers"]:
            raise PackError(label, f"direction.{layer} outside the model's {fp['num_layers']} layers")
        n = float(np.linalg.norm(v))
        if n == 0:
            continue
        w.add_feature(f"layer_{layer}", layer, "direction", v,
                      calibration={"scale": n, "direction_norm": n,
                                   "unit": "strength 1 = the file's vector as is (llama.cpp scale 1)"},
                      description=f"{label}: control vector at layer {layer}", tags=["controlvector"])
    return w.write(out or Path.cwd() / label)


def export_gguf(pack: str | Path, file: str | Path,
                features: Mapping[str, float] | Sequence[str] | None = None) -> Path:
    """Write features of ``pack`` as a control-vector GGUF: per layer the vector strength·c·d̂.

    ``features``: {name: strength} or names (strength 1); default all features, which must then
    sit on distinct layers. llama.cpp ignores ``direction.0``, so layer 0 is refused."""
    import gguf

    p = load_pack(pack)
    if features is None:
        features = {n: 1.0 for n in p.features}
    elif not isinstance(features, Mapping):
        features = {n: 1.0 for n in features}
    vecs: dict[int, np.ndarray] = {}
    owner: dict[int, str] = {}
    for n, s in features.items():
        if n not in p.features:
            raise PackError(p.name, f"no feature {n!r} to export")
        f = p.features[n]
        if f.layer in vecs:
            raise PackError(p.name, f"features {owner[f.layer]!r} and {n!r} share layer {f.layer}; a control "
                                    "vector has one direction per layer: export them separately")
        if f.layer == 0:
            raise PackError(p.name, f"feature {n!r} is at layer 0, which llama.cpp control vectors cannot address")
        vecs[f.layer] = (float(s) * f.scale * f.unit_direction()).astype(np.float32)
        owner[f.layer] = n
    file = Path(file)
    w = gguf.GGUFWriter(str(file), GGUF_ARCH)
    w.add_string(f"{GGUF_ARCH}.model_hint", str(p.manifest.model.id or "llama"))
    w.add_uint32(f"{GGUF_ARCH}.layer_count", len(vecs))
    for layer in sorted(vecs):
        w.add_tensor(f"direction.{layer}", vecs[layer])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return file


def validate(path: str | Path, model_dir: str | Path | None = None, strict_model: bool = True) -> dict[str, Any]:
    return validate_pack(path, model_dir, strict_model)


def list_packs(paths: Sequence[str | Path] | None = None) -> list[dict[str, Any]]:
    """Summaries of the packs under ``paths`` (default: the bundled feature_packs/); a pack that
    fails to load is listed with its error."""
    out = []
    for p in discover_packs(paths or [bundled_packs_dir()]):
        try:
            s = load_pack(p).summary()
            s["ok"] = True
        except PackError as e:
            s = {"name": p.name, "path": str(p), "ok": False, "error": str(e)}
        out.append(s)
    return out
