"""Packs with multi-layer direction features and lowrank (LoReFT) features (issue #28): written by
PackWriter, loaded back tensor for tensor, refused (PackError naming the feature) when broken."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from steering.packs import FEATURES_FILE, MANIFEST_FILE, PackError, PackWriter, load_pack, model_fingerprint
from steering.packs.registry import PackRegistry
from steering.packs.tensors import sha256_file

from packtools import D

RANK = 3


def lowrank_tensors(seed: int = 0, n: int = 2, r: int = RANK, d: int = D) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    R = np.stack([np.linalg.qr(rng.standard_normal((d, r)))[0].T for _ in range(n)])  # [n, r, d]
    return {"R": R, "W": rng.standard_normal((n, r, d)), "b": rng.standard_normal((n, r))}


def write_kinds_pack(out, model_dir, **overrides):
    """A pack with a multi-layer direction feature (layers 0, 1, 3; readout 1) and a lowrank
    feature (layers 1, 2; rank 3); ``overrides`` replace add_feature arguments of ``lora``."""
    rng = np.random.default_rng(5)
    w = PackWriter("kinds", "0.1.0", model_fingerprint(model_dir), model_id="fake/model")
    dirs = rng.standard_normal((3, D))
    w.add_feature("multi", layer=1, kind="direction", direction=dirs[1], layers=[0, 1, 3],
                  directions=dirs, calibration={"scale": 2.0}, description="three layers")
    lr = lowrank_tensors()
    kw = dict(layer=1, kind="lowrank", direction=lr["R"][0, 0], layers=[1, 2], lowrank=lr,
              calibration={"scale": 1.0}, description="a rank-3 edit")
    kw.update(overrides)
    w.add_feature("lora", **kw)
    return w.write(out / "kinds"), dirs, lr


def test_round_trip(tmp_path, fake_model):
    path, dirs, lr = write_kinds_pack(tmp_path, fake_model)
    m = json.loads((path / MANIFEST_FILE).read_text())
    entries = {f["name"]: f for f in m["features"]}
    assert entries["multi"]["layers"] == [0, 1, 3] and "rank" not in entries["multi"]
    assert entries["lora"]["kind"] == "lowrank" and entries["lora"]["rank"] == RANK
    pack = load_pack(path, model_fingerprint(fake_model))
    multi, lora = pack.features["multi"], pack.features["lora"]
    assert multi.layers == (0, 1, 3) and multi.steered_layers() == (0, 1, 3) and multi.layer == 1
    np.testing.assert_array_equal(multi.directions, dirs.astype(np.float32))
    np.testing.assert_array_equal(multi.direction, dirs[1].astype(np.float32))
    assert multi.lowrank is None
    assert lora.kind == "lowrank" and lora.layers == (1, 2) and lora.lowrank.rank == RANK
    for k in ("R", "W", "b"):
        np.testing.assert_array_equal(getattr(lora.lowrank, k), lr[k].astype(np.float32))
    assert [p.layer for p in lora.parts()] == [1, 2]
    np.testing.assert_array_equal(lora.parts()[1].W, lr["W"][1].astype(np.float32))
    # the registry keeps them whole under the qualified name
    reg = PackRegistry.from_paths([path], fake_model)
    f = reg.resolve("kinds/lora")
    assert f.name == "kinds/lora" and f.kind == "lowrank" and f.layers == (1, 2)
    for k in ("R", "W", "b"):
        np.testing.assert_array_equal(getattr(f.lowrank, k), getattr(lora.lowrank, k))
    g = reg.resolve("multi")
    assert g.name == "kinds/multi" and g.layers == (0, 1, 3)
    np.testing.assert_array_equal(g.directions, multi.directions)


def test_catalog_entries_show_kind_layers_and_rank(tmp_path, fake_model, pack_factory):
    path, _, _ = write_kinds_pack(tmp_path, fake_model)
    reg = PackRegistry.from_paths([path, pack_factory()], fake_model)
    lora, multi = reg.get("kinds/lora"), reg.get("kinds/multi")
    assert (lora["kind"], lora["layer"], lora["layers"], lora["rank"]) == ("lowrank", 1, [1, 2], RANK)
    assert (multi["kind"], multi["layers"]) == ("direction", [0, 1, 3]) and "rank" not in multi
    plain = reg.get("tone/formality")
    assert "layers" not in plain and "rank" not in plain
    listed = {f["id"]: f for f in reg.features(pack="kinds")}
    assert listed["kinds/lora"]["rank"] == RANK and listed["kinds/multi"]["layers"] == [0, 1, 3]


def test_single_layer_lowrank_needs_no_layers(tmp_path, fake_model):
    lr = lowrank_tensors(n=1, r=2)
    path, _, _ = write_kinds_pack(tmp_path, fake_model, layer=2, layers=None, lowrank=lr,
                                  direction=lr["R"][0, 1])
    f = load_pack(path).features["lora"]
    assert f.layers == () and f.steered_layers() == (2,) and f.lowrank.R.shape == (1, 2, D)


def _retensor(path, fn):
    """Rewrite features.safetensors through ``fn`` and make the manifest's sha256 agree with it."""
    t = load_file(str(path / FEATURES_FILE))
    fn(t)
    save_file(t, str(path / FEATURES_FILE))
    m = json.loads((path / MANIFEST_FILE).read_text())
    m["files"][FEATURES_FILE]["sha256"] = sha256_file(path / FEATURES_FILE)
    (path / MANIFEST_FILE).write_text(json.dumps(m))


def _edit_manifest(path, fn):
    m = json.loads((path / MANIFEST_FILE).read_text())
    fn({f["name"]: f for f in m["features"]})
    (path / MANIFEST_FILE).write_text(json.dumps(m))


def test_corrupted_tensor_file_is_a_sha256_error(tmp_path, fake_model):
    path, _, _ = write_kinds_pack(tmp_path, fake_model)
    data = bytearray((path / FEATURES_FILE).read_bytes())
    data[-5] ^= 0xFF
    (path / FEATURES_FILE).write_bytes(bytes(data))
    with pytest.raises(PackError, match="sha256 mismatch for features.safetensors"):
        load_pack(path)


def _not_orthonormal(t):
    t["lora.R"][1, 0] *= 1.01  # one row 1 % too long: |R Rᵀ − I| ≈ 0.02


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.update({"lora.R": t["lora.R"][:, :2]}), r"feature 'lora': R must be \[2, 3, 16\]"),
    (lambda t: t.update({"lora.W": t["lora.W"][:1]}), r"feature 'lora': W must be \[2, 3, 16\]"),
    (lambda t: t.update({"lora.b": t["lora.b"].T.copy()}), r"feature 'lora': b must be \[2, 3\]"),
    (_not_orthonormal, r"feature 'lora': the rows of R must be orthonormal per layer"),
    (lambda t: t.pop("lora.W"), r"tensor 'lora.W' named by feature 'lora' is missing"),
    (lambda t: t.update({"multi.directions": t["multi.directions"][:2]}),
     r"feature 'multi': directions must be \[3, 16\]"),
    (lambda t: t["multi.directions"].__setitem__(2, 0.0), r"feature 'multi': every row of directions must be nonzero"),
    (lambda t: t.pop("multi.directions"), r"tensor 'multi.directions' named by feature 'multi' is missing"),
])
def test_broken_tensors_are_refused_naming_the_feature(tmp_path, fake_model, edit, match):
    path, _, _ = write_kinds_pack(tmp_path, fake_model)
    _retensor(path, edit)
    with pytest.raises(PackError, match=match) as e:
        load_pack(path)
    assert e.value.pack == "kinds"


def test_rank_must_match_the_tensors(tmp_path, fake_model):
    path, _, _ = write_kinds_pack(tmp_path, fake_model)
    _edit_manifest(path, lambda f: f["lora"].update(rank=2))
    with pytest.raises(PackError, match=r"feature 'lora': R must be \[2, 2, 16\].*not \[2, 3, 16\]"):
        load_pack(path)


@pytest.mark.parametrize("edit,match", [
    (lambda f: f["multi"].update(layers=[0, 3]), r"feature 'multi': layers \[0, 3\] must contain its readout layer 1"),
    (lambda f: f["multi"].update(layers=[3, 1, 0]), r"feature 'multi': layers \[3, 1, 0\] must be sorted and unique"),
    (lambda f: f["multi"].update(layers=[0, 1, 1]), r"must be sorted and unique"),
    (lambda f: f["multi"].update(layers=[0, 1, 4]), r"feature 'multi': layer 4 of layers outside \[0, 4\)"),
    (lambda f: f["lora"].pop("rank"), r"feature 'lora': a lowrank feature needs its rank"),
    (lambda f: f["lora"].update(rank=9), r"feature 'lora': rank 9 exceeds the maximum 8"),
    (lambda f: f["lora"].update(default_mode="clamp"), r"feature 'lora': a lowrank feature's default_mode must be add"),
    (lambda f: f["multi"].update(rank=2), r"feature 'multi': rank is for lowrank features only"),
    (lambda f: f["multi"].update(kind="sae", layers=[0, 1]), r"an sae feature writes at its layer only"),
])
def test_manifest_refusals_name_the_feature(tmp_path, fake_model, edit, match):
    path, _, _ = write_kinds_pack(tmp_path, fake_model)
    _edit_manifest(path, edit)
    with pytest.raises(PackError, match=match) as e:
        load_pack(path)
    assert e.value.pack == "kinds"


def test_directions_without_layers_are_refused(tmp_path, fake_model):
    path, _, _ = write_kinds_pack(tmp_path, fake_model)
    _edit_manifest(path, lambda f: f["multi"].pop("layers"))
    with pytest.raises(PackError, match=r"'multi.directions' is only for direction features with layers"):
        load_pack(path)


def test_writer_refuses_before_writing(tmp_path, fake_model):
    with pytest.raises(PackError, match=r"feature 'lora': layers \[2\] must contain its readout layer 1"):
        write_kinds_pack(tmp_path, fake_model, layers=[2], lowrank=lowrank_tensors(n=1))
    with pytest.raises(ValueError, match="lowrank feature needs lowrank"):
        write_kinds_pack(tmp_path, fake_model, lowrank={"R": lowrank_tensors()["R"]})
    w = PackWriter("x", "0.1.0", model_fingerprint(fake_model))
    with pytest.raises(ValueError, match="needs directions"):
        w.add_feature("m", layer=1, kind="direction", direction=np.ones(D), layers=[1, 2],
                      calibration={"scale": 1.0})
    assert w.manifest.features == []  # nothing half-added


def test_bundled_tone_pack_still_loads():
    from steering.packs import bundled_packs_dir
    from steering.model_store import resolve_model

    pack = load_pack(bundled_packs_dir() / "smollm2-tone", model_fingerprint(resolve_model(None)))
    assert pack.version == "1.2.0" and len(pack.features) == 11  # 1.1.0's tensors, methods recorded
    assert {f.calibration.choice["method"] for f in pack.manifest.features} == {"mean_diff"}
    for f in pack.features.values():
        assert f.kind == "direction" and f.layers == () and f.directions is None and f.lowrank is None
        assert f.steered_layers() == (f.layer,)
        (part,) = f.parts()
        assert part.layer == f.layer and part.gain == 1.0
        np.testing.assert_array_equal(part.unit, f.unit_direction())
