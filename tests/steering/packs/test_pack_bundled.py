"""The packs shipped in feature_packs/ load, verify and resolve against the bundled model."""

from __future__ import annotations

import numpy as np
import pytest

from steering.packs import PackRegistry, bundled_packs_dir, discover_packs, model_fingerprint

TONE = ["formality", "positivity", "enthusiasm", "hedging", "verbosity", "humor", "pirate",
        "french", "golden_gate", "refusal", "code"]


@pytest.fixture(scope="module")
def registry():
    from steering.model_store import resolve_model

    return PackRegistry.from_paths([bundled_packs_dir()], resolve_model(None))


def test_bundled_packs_present():
    names = {p.name for p in discover_packs([bundled_packs_dir()])}
    assert "smollm2-tone" in names


def test_tone_pack(registry):
    feats = {f["name"]: f for f in registry.features(pack="smollm2-tone")}
    assert set(TONE) <= set(feats) and len(feats) >= 10
    for name in TONE:
        f = registry.resolve(name)
        assert f.name == f"smollm2-tone/{name}" and f.kind == "direction"
        cal = feats[name]["calibration"]
        assert 10 < f.scale < 60 and f.scale == pytest.approx(0.25 * cal["resid_norm_p50"])
        assert np.isfinite(f.direction).all() and f.direction.shape == (576,)
        assert feats[name]["description"] and feats[name]["tags"]
    assert registry.search("pirate")[0]["id"] == "smollm2-tone/pirate"
    assert registry.search("golden gate bridge")[0]["id"].startswith("smollm2-tone/golden_gate")


def test_sae_pack(registry):
    saes = registry.saes()
    if not saes:
        pytest.skip("no SAE pack bundled")
    s = saes[0]
    assert s["d_in"] == 576 and s["labelled"] and {"fvu", "l0", "dead_frac", "ce_increase"} <= set(s["metrics"])
    h = np.random.default_rng(0).normal(size=(4, 576)).astype(np.float32) * 5
    acts = registry.encode(s["layer"], h)
    assert acts.shape == (4, s["d_sae"])
    f = registry.resolve(f"{s['id']}:0")
    assert f.kind == "sae" and f.layer == s["layer"]
    for e in registry.features(pack=s["pack"]):
        assert e["kind"] == "sae" and "evidence" in registry.get(e["id"])


def test_bundled_constructor_matches_from_paths(registry):
    from steering.model_store import resolve_model

    reg = PackRegistry.bundled(resolve_model(None))
    assert [p["name"] for p in reg.packs()] == [p["name"] for p in registry.packs()]
    fp = model_fingerprint(resolve_model(None))
    assert all(p["model"]["fingerprint"] == fp for p in reg.packs())
