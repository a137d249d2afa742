"""Builders: the contrastive builder on a tiny recipe (real bundled model, shallow layers) and
the TopK SAE trainer on synthetic sparse activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steering.packs import PackRegistry, load_pack
from steering.builders.sae_train import TopKSAE, reconstruction_metrics, train_topk_sae

TINY = {
    "pack": {"name": "tiny-test", "version": "0.0.1"},
    "seed": 0, "layers": [6, 10], "heldout": 0.34, "format": "assistant", "prompt": "Talk.",
    "calibration": {"corpus": "recipe"},
    "concepts": [{
        "name": "weather", "tags": ["topic"], "description": "talks about the weather",
        "pairs": [
            ["It is raining heavily and the wind is cold.", "The train leaves at noon from platform two."],
            ["A thunderstorm is coming with lightning and hail.", "She bought apples and bread at the shop."],
            ["The sun is shining and the sky is clear and warm.", "He fixed the broken chair in the kitchen."],
            ["Snow fell all night and the roads are icy.", "The book has twelve chapters about history."],
            ["Fog covered the valley on this humid morning.", "My cousin plays the violin in an orchestra."],
            ["The forecast says showers and strong gusts later.", "We painted the fence green last weekend."],
        ]}],
}
HELD_OUT = [("Heavy clouds and drizzle will last until evening.", "The museum opens its new wing on Friday."),
            ("It was freezing and windy, with sleet all afternoon.", "They counted the coins in the jar.")]


@pytest.fixture(scope="module")
def bundled_model():
    from steering.model_store import resolve_model

    return resolve_model(None)


def test_contrastive_builder_separates_held_out_pairs(tmp_path, bundled_model):
    from steering.builders import collect
    from steering.builders.contrastive import _encode, build_contrastive

    p = build_contrastive(TINY, out=tmp_path / "tiny", model_dir=bundled_model, progress=False)
    pack = load_pack(p)
    meta = pack.feature_meta("weather")
    assert meta.layer == 10  # layer 6 fails the held-out pairs and meta.contrastive["heldout"]["paired_accuracy"] == 1.0
    cal = meta.calibration
    assert cal.scale == pytest.approx(0.25 * cal.resid_norm_p50) and cal.p99 >= cal.p50
    f = PackRegistry.from_paths([p], bundled_model).resolve("weather")
    model, tok = collect.load_model(bundled_model)
    enc = [_encode(tok, "assistant", "Talk.", t) for pair in HELD_OUT for t in pair]
    acts = collect.sample_activations(model, enc, [f.layer])[f.layer]
    proj = acts @ f.unit_direction()
    assert proj[0] > proj[1] and proj[2] > proj[3]
    # reproducible: same recipe, same seed → same direction
    again = load_pack(build_contrastive(TINY, out=tmp_path / "again", model_dir=bundled_model, progress=False))
    np.testing.assert_allclose(again.features["weather"].direction, pack.features["weather"].direction, rtol=1e-5)


def _sparse_data(n=4000, d=24, m=48, active=3, seed=0):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(m, d))
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    X = np.zeros((n, d))
    for r in range(n):
        idx = rng.choice(m, active, replace=False)
        X[r] = rng.exponential(3.0, size=active) @ G[idx]
    return (X + 0.5 + 0.05 * rng.normal(size=X.shape)).astype(np.float16)


def test_sae_trainer_lowers_mse_and_reports_metrics():
    acts = _sparse_data()
    init = TopKSAE(24, 48, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        init.b_dec.copy_(torch.from_numpy(acts.astype(np.float32)).median(0).values)
    before = reconstruction_metrics(init, acts)
    log = []
    sae = train_topk_sae(acts, d_sae=48, k=3, epochs=8, batch_size=256, lr=3e-3, aux_k=16,
                         dead_after_tokens=2000, seed=0, progress=False, log=log)
    after = reconstruction_metrics(sae, acts)
    assert set(after) >= {"nmse", "fvu", "fve", "l0", "dead_frac"}
    assert after["fvu"] < 0.5 * before["fvu"] and after["fve"] > 0.5
    assert after["l0"] <= 3 and log and log[-1]["fvu"] < log[0]["fvu"]
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-4)
    # the pack-side SAE (activation "topk") encodes exactly like the trainer
    np_sae = sae.to_sae("L0", 0)
    x = torch.from_numpy(acts[:50].astype(np.float32))
    v, i, _ = sae.encode_sparse(x)
    dense = torch.zeros(50, 48).scatter_(1, i, v).detach().numpy()
    np.testing.assert_allclose(np_sae.encode(x.numpy()), dense, atol=1e-5)
    # seeded: the same run again gives the same weights
    sae2 = train_topk_sae(acts[:1024], d_sae=48, k=3, epochs=1, batch_size=256, lr=3e-3, seed=1, progress=False)
    sae3 = train_topk_sae(acts[:1024], d_sae=48, k=3, epochs=1, batch_size=256, lr=3e-3, seed=1, progress=False)
    assert torch.equal(sae2.W_dec, sae3.W_dec)


def test_train_sae_pipeline_smoke(tmp_path, bundled_model):
    """collect → train → evaluate → label → match → pack, at toy size (shallow layer, few tokens)."""
    from steering.builders.sae import train_sae

    p = train_sae(out=tmp_path / "sae", progress=False, model=bundled_model, layer=2, d_sae=64, k=4,
                  tokens=600, epochs=2, batch_size=128, lr=1e-3, eval_tokens=100, ce_samples=0,
                  concepts_recipe=TINY, min_corr=-1.0, min_cos=-1.0,
                  activations_dir=tmp_path / "acts", name="toy-sae")
    reg = PackRegistry.from_paths([p], bundled_model)
    s = reg.saes()[0]
    m = s["metrics"]
    assert {"nmse", "fvu", "fve", "l0", "dead_frac"} <= set(m)  # CE metrics: see the bundled pack test
    assert 0 < m["l0"] <= 4
    labs = reg.labels(2)
    assert len(labs) == 64 and any(lab.get("examples") for lab in labs)
    f = reg.get("toy-sae/weather_latent")
    assert f["kind"] == "sae" and {"cosine_with_contrastive", "activation_corr"} <= set(f["evidence"])
    assert f["source"]["sae"] == "L2"


def test_concepts_from_reuses_another_recipes_examples_without_its_layers(tmp_path):
    """One set of examples builds the pack of every model: ``concepts_from`` takes the other
    recipe's concepts and default prompt; a layer it fixed (chosen on its model) is dropped."""
    import yaml

    from steering.builders.contrastive import RecipeError, concept_pairs, load_recipe
    from steering.packs.registry import bundled_packs_dir

    qwen = load_recipe(bundled_packs_dir() / "recipes" / "qwen2.5-0.5b-tone.yaml")
    tone = load_recipe(bundled_packs_dir() / "recipes" / "smollm2-tone.yaml")
    assert [c["name"] for c in qwen["concepts"]] == [c["name"] for c in tone["concepts"]]
    assert all(concept_pairs(qwen, a) == concept_pairs(tone, b) for a, b in zip(qwen["concepts"], tone["concepts"]))
    assert any("layer" in c for c in tone["concepts"]) and not any("layer" in c for c in qwen["concepts"])
    assert qwen["model"] == "qwen2.5-0.5b" and qwen["pack"]["name"] == "qwen2.5-0.5b-tone"

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"pack": {"name": "b"}, "concepts": tone["concepts"][:1]}))
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({"pack": {"name": "x"}, "concepts_from": "base.yaml",
                                                        "concepts": tone["concepts"][:1]}))
    with pytest.raises(RecipeError, match="either concepts or concepts_from"):
        load_recipe(tmp_path / "both.yaml")


def test_workshop_calibration_stops_at_the_first_dose_past_the_fluency_budget():
    """Strength 1 of a workshop feature: the strongest dose reached from the weakest up while the
    perplexity ratio stays within budget; a fluent dose past a non-fluent one does not count."""
    from steering.builders.workshop import MAX_PPL_RATIO, strongest_fluent

    rows = [{"dose": d, "ppl_ratio": r} for d, r in
            [(0.25, 1.02), (0.5, 1.1), (1.0, MAX_PPL_RATIO), (1.5, 1.7), (2.0, 1.3)]]
    assert strongest_fluent(rows) == (rows[2], True)
    assert strongest_fluent([{**rows[3], "dose": 0.25}, rows[4]]) == ({**rows[3], "dose": 0.25}, False)
    assert strongest_fluent([{"dose": 0.25, "ppl_ratio": None}]) == ({"dose": 0.25, "ppl_ratio": None}, False)
