"""PackRegistry: name resolution, catalog queries, SAE access, and use as a FeatureSource."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from steering.config import SteeringConfig
from steering.features import AmbiguousFeature, UnknownFeature
from steering.packs import PackError, PackRegistry
from steering.packs.manifest import NO_EFFECT_TAG
from steering.request import SteeringCompiler, SteeringError


@pytest.fixture
def registry(pack_factory, fake_model):
    a = pack_factory("tone", with_sae=True)
    b = pack_factory("style", features=("formality", "pirate"), tags=("style",))
    return PackRegistry.from_paths([a.parent], fake_model)


def test_resolution(registry):
    f = registry.resolve("tone/formality")
    assert f.name == "tone/formality" and f.layer == 1
    assert registry.resolve("style/formality").name == "style/formality"
    assert registry.resolve("humor").name == "tone/humor"  # bare, unambiguous
    assert registry.resolve("pirate").name == "style/pirate"
    with pytest.raises(AmbiguousFeature) as e:
        registry.resolve("formality")
    assert "style/formality" in str(e.value) and "tone/formality" in str(e.value)
    for bad in ("nope", "tone/nope", "nopack/formality", "tone/L2:999", "L9:1"):
        with pytest.raises(UnknownFeature):
            registry.resolve(bad)


def test_latent_resolution(registry):
    f = registry.resolve("tone/L2:3")
    g = registry.resolve("L2:3")
    assert f is g and f.kind == "sae" and f.layer == 2
    assert f.scale == pytest.approx(2.0, rel=1e-2)  # p99 × unit decoder norm
    assert np.linalg.norm(f.direction) == pytest.approx(1.0, abs=1e-3)
    # act_feature·d̂ == act_native·W_dec[i]: the Feature's activation is n = ‖W_dec[i]‖ times the SAE's
    sae = registry.sae(2)
    n = np.linalg.norm(sae.W_dec[3])
    h = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    acts = sae.encode(h)[:, 3]
    pre = h @ f.encoder + f.bias
    np.testing.assert_allclose(np.where(pre > f.threshold, pre, 0.0), n * acts, atol=1e-5)


def test_catalog(registry):
    assert [p["name"] for p in registry.packs()] == ["style", "tone"]
    assert {f["id"] for f in registry.features(pack="tone")} == {"tone/formality", "tone/humor", "tone/bridge"}
    assert {f["id"] for f in registry.features(tag="style")} == {"style/formality", "style/pirate"}
    assert {f["id"] for f in registry.features(layer=2)} == {"tone/humor", "tone/bridge", "style/pirate"}
    g = registry.get("tone/bridge")
    assert g["source"] == {"sae": "L2", "latent": 3} and g["calibration"]["scale"] == 2.0
    li = registry.get("tone/L2:3")
    assert li["named_as"] == ["tone/bridge"] and li["top_tokens"] == ["Golden", "Gate"]
    with pytest.raises(KeyError):
        registry.features(pack="nope")


def test_search(registry):
    hits = registry.search("pirate")
    assert hits[0]["id"] == "style/pirate"
    hits = registry.search("golden gate bridge", limit=3)
    assert hits[0]["id"] == "tone/bridge"
    assert any(h["id"] == "tone/L2:3" for h in registry.search("bridge", limit=10))
    assert registry.search("") == []
    assert len(registry.search("the", limit=2)) <= 2


def test_encode_and_saes(registry):
    assert registry.saes()[0]["d_sae"] == 24
    h = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    acts = registry.encode(2, h)
    assert acts.shape == (3, 24) and (acts >= 0).all()
    assert registry.labels(2)[3]["label"].endswith("bridge")
    tops = registry.top_latents(2, h, k=3)
    assert len(tops) == 3 and all(len(t) <= 3 for t in tops)
    with pytest.raises(KeyError):
        registry.encode(3, h)


def test_duplicate_pack_rejected(registry, pack_factory):
    with pytest.raises(PackError, match="already loaded"):
        registry.load(pack_factory("tone"))


def test_registry_is_a_feature_source(registry):
    comp = SteeringCompiler(SteeringConfig(), hidden_size=16, num_layers=4, feature_source=registry)
    c = comp.compile({"features": {"humor": 0.5, "tone/bridge": {"strength": 1.0, "mode": "clamp"}}})
    assert [a["feature"] for a in c.applied] == ["tone/humor", "tone/bridge"]
    add = c.program.layers[2].add
    f = registry.resolve("humor")
    np.testing.assert_allclose(add, 0.5 * f.scale * f.unit_direction(), rtol=1e-6)
    with pytest.raises(SteeringError, match="ambiguous"):
        comp.compile({"features": {"formality": 1.0}})


def test_search_ranks_a_feature_without_a_measured_effect_lower(pack_factory, fake_model):
    """``steer pack calibrate`` tags a feature whose steering showed nothing; its name alone must not
    put it first."""
    a = pack_factory("zz", features=("pirate",), tags=("style",))
    pack_factory("aa", features=("pirate",), tags=("style", NO_EFFECT_TAG))
    hits = PackRegistry.from_paths([a.parent], fake_model).search("pirate")
    assert [h["id"] for h in hits] == ["zz/pirate", "aa/pirate"]
    assert hits[1]["score"] == pytest.approx(hits[0]["score"] / 2)


def test_builders_never_write_into_an_installed_package_by_default(tmp_path) -> None:
    """`steer pack train-sae` (and the other builders) without --out: beside the bundled packs in
    a checkout, refused (asking for --out) where that folder is in site-packages."""
    import sysconfig

    from steering.packs.registry import bundled_packs_dir, default_pack_dir

    assert default_pack_dir("mine", tmp_path) == (tmp_path / "mine").resolve()
    assert default_pack_dir("mine").parent == bundled_packs_dir().resolve()  # a checkout
    with pytest.raises(ValueError, match="--out"):
        default_pack_dir("mine", Path(sysconfig.get_paths()["purelib"]) / "feature_packs")
