"""Trained features (steering/builders/train.py, trained.py) on the bundled model, shallow settings:
the preference objective moves held-out pairs the trained way at +1 (a vector the other way at
−1; a lowrank edit, not odd in σ, at least less than at +1), the
pack written stores exactly what was trained (strength 1 = the trained edit), a lowrank feature
at strength 0 changes nothing, and the data's provenance is checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from steering.hf import hf_decoder_layers
from steering.packs import PackRegistry, load_pack
from steering.builders.contrastive import RecipeError
from steering.builders.train import Pair, TrainConfig, _batch, _encode_pair, _token_logprobs, train_feature
from steering.builders.trained import build_trained, concept_train_options, read_data

from test_pack_builders import HELD_OUT, TINY

SHORT = {"steps": 12, "batch_size": 2, "max_completion_tokens": 16, "kl_batch": 1, "lr": 0.05,
         "time_budget_s": None}


@pytest.fixture(scope="module")
def bundled_model():
    from steering.model_store import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="module")
def hf(bundled_model):
    from steering.builders import collect

    return collect.load_model(bundled_model)


def _pairs() -> list[Pair]:
    c = TINY["concepts"][0]
    return [Pair(TINY["prompt"], a, b) for a, b in c["pairs"]]


def _held_margin(model, tok, edit=None) -> np.ndarray:
    """log p(weather) − log p(other) of each held-out pair, with ``edit(layer, h) -> Δh`` hooked in."""
    handles = []
    if edit is not None:
        for L, layer in enumerate(hf_decoder_layers(model)):
            def hook(_m, _i, out, L=L):
                hs = out[0] if isinstance(out, tuple) else out
                d = edit(L, hs)
                if d is None:
                    return out
                return (hs + d, *out[1:]) if isinstance(out, tuple) else hs + d
            handles.append(layer.register_forward_hook(hook))
    try:
        seqs = [_encode_pair(tok, TINY["prompt"], t, 16) for pair in HELD_OUT for t in pair]
        with torch.no_grad():
            lp = _token_logprobs(model, *_batch(seqs, tok.pad_token_id or 0)).view(-1, 2)
        return (lp[:, 0] - lp[:, 1]).numpy()
    finally:
        for h in handles:
            h.remove()


def _served_edit(feature, strength: float):
    """Δh the served op writes for ``feature`` at ``strength`` (add), from its pack parts."""
    c = feature.scale
    parts = {p.layer: p for p in feature.parts()}

    def edit(L, h):
        p = parts.get(L)
        if p is None:
            return None
        if p.R is None:
            return torch.as_tensor(strength * c * p.gain * p.unit, dtype=h.dtype)
        R, W, b = (torch.as_tensor(np.asarray(x), dtype=h.dtype) for x in (p.R, p.W, p.b))
        return strength * c * ((h @ (W - R).T + b) @ R)
    return edit


@pytest.mark.parametrize("method,layers", [("vector", [6]), ("lowrank", [4, 6])])
def test_training_moves_held_out_pairs_both_ways(hf, method, layers):
    model, tok = hf
    cfg = TrainConfig(method=method, layers=layers, rank=2, **SHORT)
    tf = train_feature(model, tok, _pairs(), ["The meeting is at ten.", "Add two cups of flour."], cfg,
                       progress=False)
    assert tf.log["steps_run"] == SHORT["steps"]
    assert tf.log["loss_last"]["pref"] < tf.log["loss_first"]["pref"]
    base = _held_margin(model, tok)

    def trained(sign):
        def edit(L, h):
            if L not in layers:
                return None
            i = layers.index(L)
            if method == "vector":
                return sign * torch.as_tensor(tf.directions[i])
            R, W, b = (torch.as_tensor(x[i]) for x in (tf.R, tf.W, tf.b))
            return sign * ((h @ (W - R).T + b) @ R)
        return edit

    plus, minus = _held_margin(model, tok, trained(1.0)), _held_margin(model, tok, trained(-1.0))
    assert (plus > base).all() and (minus < plus).all(), (base, plus, minus)
    if method == "vector":  # an added vector is odd in σ: −1 is the opposite concept
        assert (minus < base).all(), (base, minus)
    if method == "lowrank":
        np.testing.assert_allclose(tf.R[0] @ tf.R[0].T, np.eye(2), atol=1e-4)


def test_pack_strength_one_is_the_trained_edit_and_zero_is_none(tmp_path, bundled_model, hf):
    model, tok = hf
    r = json.loads(json.dumps(TINY))
    r["concepts"].append({**r["concepts"][0], "name": "weather_lr",
                          "train": {"method": "lowrank", "rank": 2, "layers": [4, 6]}})
    r["concepts"].append({**r["concepts"][0], "name": "weather_md", "train": {"method": "mean_diff"}})
    r["train"] = {**SHORT, "layers": [4, 6]}
    p = build_trained(r, tmp_path / "pack", bundled_model, progress=False)
    pack = load_pack(p)
    reg = PackRegistry.from_paths([p], bundled_model)

    vec, lr, md = (reg.resolve(n) for n in ("weather", "weather_lr", "weather_md"))
    assert vec.kind == "direction" and vec.steered_layers() == (4, 6)
    meta = pack.feature_meta("weather")
    assert meta.calibration.method == "trained" and meta.trained["method"] == "vector"
    assert meta.calibration.norm_scale == meta.calibration.scale == pytest.approx(
        np.linalg.norm(pack.features["weather"].directions[0]), rel=1e-5)
    # strength 1 writes the trained vectors exactly, at every layer
    for part, v in zip(vec.parts(), pack.features["weather"].directions):
        np.testing.assert_allclose(vec.scale * part.gain * part.unit, v, rtol=1e-5, atol=1e-6)
    assert lr.kind == "lowrank" and lr.lowrank.R.shape == (2, 2, 576) and lr.scale == 1.0
    assert md.kind == "direction" and pack.feature_meta("weather_md").contrastive["method"] == "mean_diff"
    log = pack.feature_meta("weather_lr").trained["log"]
    assert log["pairs"] == 6 and log["loss_last"]["pref"] < log["loss_first"]["pref"]

    base = _held_margin(model, tok)
    np.testing.assert_array_equal(_held_margin(model, tok, _served_edit(lr, 0.0)), base)
    for f in (vec, lr):
        assert (_held_margin(model, tok, _served_edit(f, 1.0)) > base).all(), f.name


def test_train_options_merge_and_refuse_unknown_keys():
    r = {"train": {"method": "vector", "steps": 50, "layers": [6]}}
    c = {"name": "x", "train": {"method": "lowrank", "rank": 3}}
    assert concept_train_options(r, c, {"steps": 7, "lr": None}) == {
        "method": "lowrank", "steps": 7, "layers": [6], "rank": 3}
    with pytest.raises(RecipeError, match="unknown train keys"):
        concept_train_options(r, {"name": "x", "train": {"stpes": 3}})
    with pytest.raises(RecipeError, match="train.method"):
        concept_train_options(r, {"name": "x", "train": {"method": "sae"}})
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(method="lowrank", rank=9)


def test_generated_data_is_checked_against_its_recorded_sha256(tmp_path):
    rows = [{"prompt": "p", "positive": f"yes {i}", "negative": f"no {i}"} for i in range(4)]
    path = tmp_path / "weather.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "weather.meta.json").write_text(json.dumps({"sha256": sha, "scorer": "x"}))
    pairs, meta = read_data(tmp_path, "weather")
    assert [p.positive for p in pairs] == [r["positive"] for r in rows]
    assert meta["sha256"] == sha and meta["scorer"] == "x" and meta["pairs"] == 4
    assert read_data(tmp_path, "missing") == ([], None)
    path.write_text(path.read_text().replace("yes 0", "yes 0!"))
    with pytest.raises(RecipeError, match="sha256"):
        read_data(tmp_path, "weather")


def test_trainer_recovers_a_planted_direction_on_a_tiny_random_model(tmp_path, bundled_model):
    """Completions sampled with +v* (positives) and −v* (negatives) added at the last layer of a
    tiny random Llama, over 4096 round-tripping word tokens: the trained vector points along v*."""
    import importlib.util

    from steering.builders import collect

    spec = importlib.util.spec_from_file_location("tiny_models", Path(__file__).parents[1] / "tiny_models.py")
    tiny_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_models)
    from steering.builders.train import cosine

    model, tok = collect.load_model(tiny_models.build("llama", tmp_path / "tiny", bundled_model, seed=0))
    words = [i for i in range(300, tok.vocab_size)
             if (s := tok.decode([i])).startswith(" ") and s[1:].isalpha() and len(s) > 3
             and tok.encode(s, add_special_tokens=False) == [i]][:4096]
    allowed = torch.tensor(words)
    L, g = 2, torch.Generator().manual_seed(1)
    acts = collect.token_activations(model, [collect.encode_chat(tok, [{"role": "assistant", "content": "hello there"}])], [L])[L]
    vstar = torch.randn(model.config.hidden_size, generator=g)
    vstar *= float(np.median(np.linalg.norm(acts, axis=1))) / vstar.norm()  # one median residual norm
    sign = {"s": 0.0}

    def hook(_m, _i, out):
        return (out[0] + sign["s"] * vstar, *out[1:]) if isinstance(out, tuple) else out + sign["s"] * vstar
    handle = hf_decoder_layers(model)[L].register_forward_hook(hook)

    @torch.no_grad()
    def sample(prompt: str, s: float) -> str:
        sign["s"] = s
        ids, out = torch.tensor([_encode_pair(tok, prompt, "", 0).ids]), []
        for _ in range(12):
            j = allowed[torch.multinomial(torch.softmax(model(input_ids=ids).logits[0, -1, allowed], -1), 1, generator=g)]
            out.append(int(j))
            ids = torch.cat([ids, j[None]], 1)
        return tok.decode(out)

    try:
        prompts = [f"Tell me about {w}." for w in ("cats", "rain", "music", "trains", "bread", "stars", "chess", "rivers")]
        pairs = [Pair(p, sample(p, 1.0), sample(p, -1.0)) for p in prompts for _ in range(24)]
    finally:
        handle.remove()
    cfg = TrainConfig(layers=[L], steps=200, batch_size=8, lr=0.05, beta=0.02, sft_weight=0.0, kl_weight=0.0,
                      max_norm=10.0, max_completion_tokens=16, time_budget_s=None)
    tf = train_feature(model, tok, pairs, [], cfg, progress=False)
    assert cosine(tf.directions[0], vstar.numpy()) > 0.9
    assert tf.log["loss_last"]["pref"] < tf.log["loss_first"]["pref"]
    assert tf.log["heldout_preference_accuracy"]["plus"] >= 0.9
