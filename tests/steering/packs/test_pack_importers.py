"""SAELens and GGUF control-vector import/export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steering.packs import PackError, PackRegistry, load_pack
from steering.builders.importers import export_gguf, import_gguf, import_saelens, list_packs, validate

D, M = 16, 40


def _saelens_dir(tmp_path, arch="jumprelu", apply_b_dec=True, layer=2):
    g = torch.Generator().manual_seed(3)
    W_enc = torch.randn(D, M, generator=g) * 0.3
    W_dec = torch.randn(M, D, generator=g) * 0.5  # deliberately not unit-norm
    t = {"W_enc": W_enc, "b_enc": torch.randn(M, generator=g) * 0.1, "W_dec": W_dec,
         "b_dec": torch.randn(D, generator=g) * 0.2}
    cfg = {"d_in": D, "d_sae": M, "hook_name": f"blocks.{layer}.hook_resid_post", "model_name": "fake",
           "architecture": arch, "activation_fn_str": "relu", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none"}
    if arch == "jumprelu":
        t["threshold"] = torch.rand(M, generator=g) * 0.3
    if arch == "topk":
        cfg["activation_fn_str"] = "topk"
        cfg["activation_fn_kwargs"] = {"k": 5}
    d = tmp_path / f"sae-{arch}-{apply_b_dec}"
    d.mkdir()
    save_file(t, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps(cfg))
    return d, t


def _saelens_encode(t, x, arch, apply_b_dec=True):
    """The SAELens formulas, written out independently of our code."""
    sae_in = x - t["b_dec"] if apply_b_dec else x
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if arch == "jumprelu":
        return torch.relu(pre) * (pre > t["threshold"])
    acts = torch.relu(pre)
    if arch == "topk":
        v, i = pre.topk(5, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    return acts


@pytest.mark.parametrize("arch,apply_b_dec", [("jumprelu", True), ("standard", True),
                                               ("standard", False), ("topk", True)])
def test_import_saelens_encodes_like_saelens(tmp_path, fake_model, arch, apply_b_dec):
    d, t = _saelens_dir(tmp_path, arch, apply_b_dec)
    expl = tmp_path / "expl.json"
    expl.write_text(json.dumps([{"index": "7", "description": "bridges and rivers"}]))
    p = import_saelens(d, out=tmp_path / "pk", model_dir=fake_model, explanations=expl, calibrate=False)
    reg = PackRegistry.from_paths([p], fake_model)
    x = torch.randn(6, D) * 2
    ref = _saelens_encode(t, x, arch, apply_b_dec)
    acts = reg.encode(2, x.numpy())
    np.testing.assert_allclose(acts, ref.numpy(), atol=1e-5)
    sae = reg.sae(2)
    np.testing.assert_allclose(sae.decode(acts), (ref @ t["W_dec"] + t["b_dec"]).numpy(), atol=1e-5)
    # each latent as a steering Feature: act'·d̂ == act·W_dec[i] (rectified form, as steering applies it)
    for i in (0, 7, 13):
        f = reg.resolve(f"L2:{i}")
        pre = x.numpy() @ f.encoder + f.bias
        act = np.where(pre > f.threshold, pre, 0.0)
        sae_in = x - t["b_dec"] if apply_b_dec else x
        pre_ref = (sae_in @ t["W_enc"][:, i] + t["b_enc"][i]).numpy()
        thr = t["threshold"][i].item() if arch == "jumprelu" else 0.0
        act_ref = np.where(pre_ref > thr, pre_ref, 0.0)
        np.testing.assert_allclose(np.outer(act, f.direction), np.outer(act_ref, t["W_dec"][i].numpy()), atol=1e-4)
        assert f.scale == 1.0  # uncalibrated: strength is in raw activation units
    assert reg.get("L2:7")["label"] == "bridges and rivers"
    assert reg.search("bridges")[0]["id"].endswith("/L2:7")


def test_import_saelens_rejects(tmp_path, fake_model):
    d, _ = _saelens_dir(tmp_path)
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["hook_name"] = "blocks.2.hook_mlp_out"
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PackError, match="hook_resid_post"):
        import_saelens(d, out=tmp_path / "x", model_dir=fake_model, calibrate=False)
    cfg["hook_name"], cfg["d_in"] = "blocks.2.hook_resid_post", 8
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PackError, match="do not match"):
        import_saelens(d, out=tmp_path / "x", model_dir=fake_model, calibrate=False)


def test_gguf_round_trip(pack_factory, fake_model, tmp_path):
    src = pack_factory("tone")
    orig = load_pack(src)
    f = tmp_path / "tone.gguf"
    export_gguf(src, f, {"formality": 1.0, "humor": -0.5})
    p = import_gguf(f, out=tmp_path / "imported", model_dir=fake_model)
    back = load_pack(p)
    assert set(back.features) == {"layer_1", "layer_2"}
    for name, s, layer in (("formality", 1.0, 1), ("humor", -0.5, 2)):
        g, b = orig.features[name], back.features[f"layer_{layer}"]
        want = s * g.scale * g.unit_direction()
        got = b.scale * b.unit_direction()  # strength 1 of the imported feature
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # re-export the imported pack: the same vectors, to float32 rounding (export writes scale ×
    # unit direction, import splits that product again: a last-bit difference is possible)
    f2 = tmp_path / "again.gguf"
    export_gguf(p, f2)
    back2 = load_pack(import_gguf(f2, out=tmp_path / "again", model_dir=fake_model))
    np.testing.assert_allclose(back2.features["layer_1"].direction, back.features["layer_1"].direction,
                               rtol=1e-6, atol=1e-7)


def test_gguf_export_refuses_shared_layer(pack_factory, tmp_path):
    src = pack_factory("tone", features=("a", "b", "c"))  # a and c share layer 1
    with pytest.raises(PackError, match="share layer 1"):
        export_gguf(src, tmp_path / "x.gguf")


def test_gguf_import_rejects_other_arch(tmp_path, fake_model):
    import gguf

    f = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_tensor("direction.1", np.ones(16, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(PackError, match="expected 'controlvector'"):
        import_gguf(f, out=tmp_path / "x", model_dir=fake_model)


def test_validate_and_list(pack_factory, fake_model, tmp_path):
    p = pack_factory("tone")
    assert validate(p, fake_model)["ok"]
    (p.parent / "broken").mkdir()
    (p.parent / "broken" / "pack.json").write_text("{}")
    rows = {r["name"]: r for r in list_packs([p.parent])}
    assert rows["tone"]["ok"] and not rows["broken"]["ok"] and "schema_version" in rows["broken"]["error"]
