"""The packs shipped in feature_packs/ load, verify and resolve against the bundled model."""

from __future__ import annotations

import numpy as np
import pytest

from steering.packs import PackRegistry, bundled_packs_dir, discover_packs, model_fingerprint

SMOLLM2_PACKS = ("smollm2-tone", "smollm2-sae-l12")
"""The bundled packs of the bundled model; feature_packs/ also holds packs of other catalog models."""
TONE = ["formality", "positivity", "enthusiasm", "hedging", "verbosity", "humor", "pirate",
        "french", "golden_gate", "refusal", "code"]


@pytest.fixture(scope="module")
def registry():
    from steering.model_store import resolve_model

    return PackRegistry.from_paths([bundled_packs_dir() / p for p in SMOLLM2_PACKS], resolve_model(None))


def test_bundled_packs_present():
    names = {p.name for p in discover_packs([bundled_packs_dir()])}
    assert "smollm2-tone" in names


def test_a_pack_of_another_model_is_not_served():
    from steering.model_store import resolve_model

    assert "qwen2.5-0.5b-tone" in {p.name for p in discover_packs([bundled_packs_dir()])}
    assert {p["name"] for p in PackRegistry.bundled(resolve_model(None)).packs()} == set(SMOLLM2_PACKS)


def test_the_qwen_pack_is_the_tone_recipe_on_its_model():
    """Built by the same recipe (concepts_from): the same features from the same pairs, fitted on
    Qwen2.5-Coder-0.5B (896 wide, 24 layers) at a layer of its own candidates."""
    import json

    def manifest(name):
        return json.loads((bundled_packs_dir() / name / "pack.json").read_text())

    tone, qwen = manifest("smollm2-tone"), manifest("qwen2.5-0.5b-tone")
    assert qwen["model"]["id"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert (qwen["model"]["fingerprint"]["hidden_size"], qwen["model"]["fingerprint"]["num_layers"]) == (896, 24)
    pairs = {f["name"]: f["contrastive"]["pairs"] for f in tone["features"]}
    assert {f["name"]: f["contrastive"]["pairs"] for f in qwen["features"]} == pairs
    assert {f["layer"] for f in qwen["features"]} <= {6, 8, 10, 12}
    assert qwen["provenance"]["recipe"] == "qwen2.5-0.5b-tone.yaml"


def assert_calibrated(entry, scale):
    """``steer pack calibrate`` ran: strength 1 is the chosen dose in norm units (effect), or the
    norm unit itself (no measurable effect, tagged so)."""
    cal = entry["calibration"]
    u = 0.25 * cal["resid_norm_p50"]
    assert cal["norm_scale"] == pytest.approx(u) and 10 < u < 60
    chosen = cal["effect"]["chosen"]
    assert chosen["dose"] in [r["dose"] for r in cal["effect"]["curve"]]
    if cal["method"] == "effect":
        assert scale == pytest.approx(chosen["dose"] * u) and chosen["status"] in ("effect", "weak")
        assert "no-measured-effect" not in entry["tags"]
    else:
        assert cal["method"] == "norm" and scale == pytest.approx(u) and chosen["status"] == "none"
        assert "no-measured-effect" in entry["tags"]
    assert entry["evidence"]["steering"]["status"] == chosen["status"]


def test_tone_pack(registry):
    feats = {f["name"]: f for f in registry.features(pack="smollm2-tone")}
    assert set(TONE) <= set(feats) and len(feats) >= 10
    for name in TONE:
        f = registry.resolve(name)
        assert f.name == f"smollm2-tone/{name}" and f.kind == "direction"
        assert_calibrated(registry.get(f.name), f.scale)
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
        assert_calibrated(registry.get(e["id"]), registry.resolve(e["id"]).scale)


def test_bundled_constructor_matches_from_paths(registry):
    from steering.model_store import resolve_model

    reg = PackRegistry.bundled(resolve_model(None))
    assert [p["name"] for p in reg.packs()] == [p["name"] for p in registry.packs()]
    fp = model_fingerprint(resolve_model(None))
    assert all(p["model"]["fingerprint"] == fp for p in reg.packs())
