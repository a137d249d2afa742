"""Pack format: round trip and every way a pack must be refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from steering.packs import (
    FEATURES_FILE, MANIFEST_FILE, PackError, PackWriter, load_pack, model_fingerprint, validate_pack,
)
from steering.packs.tensors import sha256_file

from packtools import make_fake_model


def _rehash(pack_dir, fname):
    """Tamper helper: make the manifest agree with a modified file (so later checks run)."""
    m = json.loads((pack_dir / MANIFEST_FILE).read_text())
    m["files"][fname]["sha256"] = sha256_file(pack_dir / fname)
    (pack_dir / MANIFEST_FILE).write_text(json.dumps(m))


def _edit_manifest(pack_dir, fn):
    m = json.loads((pack_dir / MANIFEST_FILE).read_text())
    fn(m)
    (pack_dir / MANIFEST_FILE).write_text(json.dumps(m))


def test_round_trip(pack_factory, fake_model):
    p = pack_factory(with_sae=True)
    pack = load_pack(p, model_fingerprint(fake_model))
    assert pack.name == "tone" and set(pack.features) == {"formality", "humor", "bridge"}
    f = pack.features["humor"]
    assert f.layer == 2 and f.kind == "direction" and f.scale == 4.0
    assert f.direction.shape == (16,) and f.direction.dtype == np.float32
    b = pack.features["bridge"]
    assert b.kind == "sae" and b.encoder.shape == (16,)
    sae = pack.saes["L2"]
    # bf16 storage of the big matrices: close to the written values
    from packtools import make_sae
    ref = make_sae()
    np.testing.assert_allclose(sae.W_dec, ref.W_dec, atol=1e-2)
    np.testing.assert_array_equal(sae.b_dec, ref.b_dec)  # small vectors stay float32
    assert sae.labels[3]["top_tokens"] == ["Golden", "Gate"]
    files = sorted(x.name for x in p.iterdir())
    assert all(n.endswith((".json", ".safetensors")) for n in files)  # never pickles
    s = validate_pack(p, fake_model)
    assert s["ok"] and s["num_features"] == 3 and s["checked_against_model"]


def test_fingerprint_is_stable_and_discriminates(tmp_path):
    a = model_fingerprint(make_fake_model(tmp_path / "a", seed=0))
    b = model_fingerprint(make_fake_model(tmp_path / "b", seed=0))
    c = model_fingerprint(make_fake_model(tmp_path / "c", seed=1))
    assert a == b and a["sha256"] != c["sha256"]
    assert a["hidden_size"] == 16 and a["num_layers"] == 4 and a["vocab_size"] == 50
    assert "embed_tokens.weight" in a["tensors"] and "norm.weight" in a["tensors"]


def test_sha_mismatch_rejected(pack_factory):
    p = pack_factory()
    t = load_file(str(p / FEATURES_FILE))
    t["formality.direction"] = t["formality.direction"] * 2
    save_file(t, str(p / FEATURES_FILE))
    with pytest.raises(PackError, match=r"'tone'.*sha256 mismatch for features.safetensors"):
        load_pack(p)


def test_wrong_model_rejected(pack_factory, tmp_path):
    p = pack_factory()
    other = model_fingerprint(make_fake_model(tmp_path / "other", seed=7))
    with pytest.raises(PackError, match="built for another model: the weight fingerprint"):
        load_pack(p, other)
    load_pack(p, other, strict_model=False)  # same shapes: allowed when not strict
    wider = model_fingerprint(make_fake_model(tmp_path / "wider", d=32))
    with pytest.raises(PackError, match="hidden_size 16 in the pack, 32 in the model"):
        load_pack(p, wider, strict_model=False)


def test_nan_tensor_rejected(pack_factory):
    p = pack_factory()
    t = load_file(str(p / FEATURES_FILE))
    t["humor.direction"][3] = float("nan")
    save_file(t, str(p / FEATURES_FILE))
    _rehash(p, FEATURES_FILE)
    with pytest.raises(PackError, match=r"'humor.direction'.*NaN/inf"):
        load_pack(p)


def test_missing_tensor_rejected(pack_factory):
    p = pack_factory()
    t = load_file(str(p / FEATURES_FILE))
    del t["humor.direction"]
    save_file(t, str(p / FEATURES_FILE))
    _rehash(p, FEATURES_FILE)
    with pytest.raises(PackError, match=r"tensor 'humor.direction' named by feature 'humor' is missing"):
        load_pack(p)


def test_missing_file_rejected(pack_factory):
    p = pack_factory(with_sae=True)
    (p / "sae_L2.safetensors").unlink()
    with pytest.raises(PackError, match="lists sae_L2.safetensors but it is missing"):
        load_pack(p)


def test_missing_sae_tensor_rejected(pack_factory):
    p = pack_factory(with_sae=True)
    t = load_file(str(p / "sae_L2.safetensors"))
    del t["b_dec"]
    save_file(t, str(p / "sae_L2.safetensors"))
    _rehash(p, "sae_L2.safetensors")
    with pytest.raises(PackError, match="tensor 'b_dec' is missing"):
        load_pack(p)


def test_duplicate_names_rejected(pack_factory, fake_model):
    p = pack_factory()
    _edit_manifest(p, lambda m: m["features"].append(dict(m["features"][0])))
    with pytest.raises(PackError, match="duplicate feature name 'formality'"):
        load_pack(p)
    w = PackWriter("x", "1", model_fingerprint(fake_model))
    w.add_feature("a", 1, "direction", np.ones(16), {"scale": 1.0})
    with pytest.raises(PackError, match="duplicate"):
        w.add_feature("a", 1, "direction", np.ones(16), {"scale": 1.0})


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.update(schema_version=99), "unsupported schema_version 99"),
    (lambda m: m["features"][0].update(layer=9), "layer 9 outside"),
    (lambda m: m["features"][0].update(kind="lora"), "kind 'lora'"),
    (lambda m: m["features"][0]["calibration"].update(scale=float("inf")), "finite"),
    (lambda m: m["features"][0].update(name="a/b"), "feature name 'a/b'"),
    (lambda m: m["files"].update({"../x": {"sha256": "0"}}), "plain name"),
])
def test_malformed_manifest_rejected(pack_factory, edit, msg):
    p = pack_factory()
    _edit_manifest(p, edit)
    with pytest.raises(PackError, match=msg):
        load_pack(p)


def test_not_json_rejected(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_FILE).write_text("{nope")
    with pytest.raises(PackError, match="not valid JSON"):
        load_pack(tmp_path / "bad")
