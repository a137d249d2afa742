"""Multi-layer and lowrank (LoReFT) features (issue #28): the compiler's programs, the batched op
and transformers' hooks against the formulas they claim, and old single-layer programs unchanged.

Formulas (steering/request.py): a multi-layer ``add`` writes s·c·directions[i]/‖direction‖ at
layers[i]; a lowrank ``add`` does h ← h + α·R_iᵀ(W_i h + b_i − R_i h) with α = s·c at each of its
layers, its ``ablate`` h ← h − R_iᵀR_i h.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from steering.config import SteeringConfig
from steering.features import Feature, LowRank, StaticFeatureSource
from steering.request import SteeringCompiler, SteeringError
from steering.worker.runtime import SteeringRuntime
from tests.steering.test_runtime import reference, run_step

D, L, K, S = 12, 3, 8, 4
R_RANK = 3


def orthonormal_rows(rng, n: int, r: int, d: int) -> np.ndarray:
    """[n, r, d] with orthonormal rows per layer (QR of a random matrix)."""
    return np.stack([np.linalg.qr(rng.standard_normal((d, r)))[0].T for _ in range(n)])


def kinds_features(d: int = D) -> list[Feature]:
    rng = np.random.default_rng(28)
    multi_dirs = rng.standard_normal((3, d))
    multi_dirs *= np.array([[1.0], [2.5], [0.5]]) / np.linalg.norm(multi_dirs, axis=1, keepdims=True)
    R = orthonormal_rows(rng, 2, R_RANK, d)
    lora = LowRank(R=R, W=rng.standard_normal((2, R_RANK, d)), b=rng.standard_normal((2, R_RANK)))
    R1 = orthonormal_rows(rng, 1, 2, d)
    lora1 = LowRank(R=R1, W=rng.standard_normal((1, 2, d)), b=rng.standard_normal((1, 2)))
    return [
        Feature("k/multi", 1, "direction", multi_dirs[1] * 0.8, scale=2.0, layers=(0, 1, 2),
                directions=multi_dirs),
        Feature("k/lora", 1, "lowrank", R[1, 0], scale=1.0, layers=(1, 2), lowrank=lora),
        Feature("k/lora1", 1, "lowrank", R1[0, 0], scale=0.5, lowrank=lora1),
        Feature("k/dir", 1, "direction", rng.standard_normal(d), scale=3.0),
        Feature("k/early", 0, "direction", rng.standard_normal(d)),
    ]


def compiler(**cfg) -> SteeringCompiler:
    cfg = {"max_slots": S, "max_features": K, **cfg}
    return SteeringCompiler(SteeringConfig(**cfg), D, L, StaticFeatureSource(kinds_features()))


def feat(name: str) -> Feature:
    return {f.name: f for f in kinds_features()}[name]


def loreft(f: Feature, i: int, x: np.ndarray, alpha: float) -> np.ndarray:
    """x [..., d] after f's lowrank edit at its i-th layer, in float64."""
    R, W, b = (np.asarray(a, np.float64) for a in (f.lowrank.R[i], f.lowrank.W[i], f.lowrank.b[i]))
    return x + alpha * ((x @ W.T + b - x @ R.T) @ R)


# -- old programs ---------------------------------------------------------------------------
OLD_HASHES = {
    # table_hash of the bundled packs' features, computed with the code before issue #28
    # (commit 742c41e) through PackRegistry over feature_packs/: "name|mode|strength"
    "smollm2-tone/formality|add|1.0": "ad95bf7ea423fed2e4853eeaab6bb488fe44a3d32a328f6fa3b6944db9fbe637",
    "smollm2-tone/formality|clamp|1.0": "26203df0a113b723d2bcdef00eafe1dadd9ab4e25c4b69d353ad7bd49e15b86d",
    "smollm2-tone/formality|scale|2.0": "77e50a797b6347ed6669d341bc88af8e3fd04ad8e02375381e3d63469c415c22",
    "smollm2-tone/formality|ablate|None": "25745edec1b2f9b2004c246f19410796befc79b6f11780b025eda9bcda325238",
    "smollm2-tone/hedging|add|-0.5": "67572cf4b8e77e5c4a5537946b09e0685c59deed411db62c5b197e3181fc7f53",
    "smollm2-tone/code|clamp|1.0": "9f68b2e443066531be120d3f2bb47dbf6a2106e7faa1d7e2c39f118a4bb84e46",
    "smollm2-sae-l12/hedging_latent|clamp|1.0": "0b1ad4f2c232907bc819b2ffcfd24a2062b50c425c3fcf90ef1d9be1c672ee4f",
    "smollm2-sae-l12/L12:100|add|1.0": "7dd8b6765baceab1e705705488ad9b0a4ceea75e3e6c278302e5ad191b897c0f",
    "smollm2-sae-l12/L12:100|clamp|1.0": "74b2956bbabbb8f8659b4ca164ccea070e69091474c58e51ff039d916bcd2d40",
}
OLD_WHEN = "744d491c14ed3b2dbd80a8fd914e9d1c16c8fefef2fca6592c0a5714df0b8df2"
OLD_MIX = "15c94239462efd84d4caa8ade19b8586141c9cceeeff9a3f42984924f314bb1f"
OLD_ALL = "8738db9be7e7d2a2c422004f0b7f6de24ebe828f9dc95a0e4fde34fa53874ed0"
"""sha256 over "key=hash\\n" (sorted) of every named feature of both packs and latent L12:100 in
add 1, clamp 1, scale 2, ablate and add −0.5, plus the two keys ``when`` and ``mix``."""
BUNDLED_FEATURE_FILES = {  # the packs those hashes were computed from
    "smollm2-tone": "features.safetensors", "smollm2-sae-l12": "features.safetensors"}


def test_old_pack_programs_unchanged():
    """Single-layer features compile to the very bytes they did before multi-layer and lowrank
    features existed: same hashes, so slots, prefix-cache salts and recorded experiments agree."""
    from steering.packs.registry import PackRegistry, bundled_packs_dir

    reg = PackRegistry.from_paths([bundled_packs_dir() / "smollm2-tone", bundled_packs_dir() / "smollm2-sae-l12"])
    # 1.2.0 is 1.1.0's directions and scales with method-choice records (steer pack choose).
    assert reg.pack("smollm2-tone").version in ("1.1.0", "1.2.0"), (
        "the bundled pack was rebuilt: recompute OLD_HASHES with the code of commit 742c41e")
    c = SteeringCompiler(SteeringConfig(), hidden_size=576, num_layers=30, feature_source=reg)

    def h(name, mode, s):
        setting = {"mode": mode} if s is None else {"mode": mode, "strength": s}
        return c.compile({"features": {name: setting}}).table_hash

    for key, want in OLD_HASHES.items():
        name, mode, s = key.split("|")
        assert h(name, mode, None if s == "None" else float(s)) == want, key
    when = c.compile({"features": {"smollm2-tone/formality": {
        "strength": 1.0, "when": {"feature": "smollm2-tone/hedging", "above": 0.5}}}}).table_hash
    mix = c.compile({"features": {"smollm2-tone/formality": 1.0, "smollm2-tone/pirate": {
        "strength": 0.5, "mode": "clamp"}, "smollm2-tone/code": -1.0}}).table_hash
    assert (when, mix) == (OLD_WHEN, OLD_MIX)
    every = {"when": when, "mix": mix}
    for name in [f["id"] for f in reg.features()] + ["smollm2-sae-l12/L12:100"]:
        for mode, s in (("add", 1.0), ("clamp", 1.0), ("scale", 2.0), ("ablate", None), ("add", -0.5)):
            every[f"{name}|{mode}|{s}"] = h(name, mode, s)
    assert len(every) == 102
    digest = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(every.items())).encode())
    assert digest.hexdigest() == OLD_ALL


# -- the compiler ---------------------------------------------------------------------------
def test_multilayer_add_writes_each_row_at_one_strength():
    f = feat("k/multi")
    out = compiler().compile({"features": {"multi": 0.5}})
    p = out.program
    n0 = np.linalg.norm(f.direction)
    assert sorted(p.layers) == [0, 1, 2]
    for i, layer in enumerate(f.layers):
        np.testing.assert_allclose(p.layers[layer].add, 0.5 * 2.0 * f.directions[i] / n0, rtol=1e-12)
        assert p.layers[layer].num_entries == 0
    assert out.applied == [{"feature": "k/multi", "layer": 1, "layers": [0, 1, 2], "mode": "add",
                            "strength": 0.5}]
    # the single-layer feature's echo has no "layers"
    assert compiler().compile({"features": {"dir": 1.0}}).applied[0] == {
        "feature": "k/dir", "layer": 1, "mode": "add", "strength": 1.0}


@pytest.mark.parametrize("mode,s", [("clamp", 1.5), ("scale", 3.0), ("ablate", None)])
def test_multilayer_clamp_scale_ablate_per_layer(mode, s):
    f = feat("k/multi")
    setting = {"mode": mode} if s is None else {"mode": mode, "strength": s}
    p = compiler().compile({"features": {"multi": setting}}).program
    n0 = np.linalg.norm(f.direction)
    for i, layer in enumerate(f.layers):
        lp = p.layers[layer]
        unit = f.directions[i] / np.linalg.norm(f.directions[i])
        assert lp.num_entries == 1 and lp.add is None and not lp.rectify[0]
        np.testing.assert_allclose(lp.enc[0], unit, rtol=1e-6)
        np.testing.assert_allclose(lp.dec[0], unit, rtol=1e-6)
        want = {"clamp": (-1.0, 1.5 * 2.0 * np.linalg.norm(f.directions[i]) / n0),
                "scale": (2.0, 0.0), "ablate": (-1.0, 0.0)}[mode]
        assert lp.alpha[0] == want[0]
        assert lp.beta[0] == pytest.approx(want[1], rel=1e-12)
    if mode == "clamp":  # the targets differ per layer with the rows' norms (1 : 2.5 : 0.5)
        betas = [p.layers[x].beta[0] for x in f.layers]
        np.testing.assert_allclose(np.array(betas) / betas[1], [0.4, 1.0, 0.2], rtol=1e-12)


@pytest.mark.parametrize("s", [0.7, 0.0, -1.0])
def test_lowrank_add_is_r_linear_entries_summing_to_loreft(s):
    f = feat("k/lora")
    p = compiler().compile({"features": {"lora": s}}).program
    x = np.random.default_rng(1).standard_normal((5, D)) * 3
    for i, layer in enumerate(f.layers):
        lp = p.layers[layer]
        assert lp.num_entries == R_RANK and lp.add is None
        assert lp.alpha == [s * 1.0] * R_RANK and lp.beta == [0.0] * R_RANK
        assert not any(lp.rectify) and lp.cond == [0] * R_RANK
        got = np.stack([reference(p, xi, layer) for xi in x])
        # tables hold float32 (W − R, R, b): the per-entry sum meets the formula to float32 rounding
        np.testing.assert_allclose(got, loreft(f, i, x, s), rtol=1e-5, atol=1e-5)
    assert p.layers.keys() == {1, 2}


def test_lowrank_ablate_removes_the_subspace():
    f = feat("k/lora")
    p = compiler().compile({"features": {"lora": {"mode": "ablate"}}}).program
    x = np.random.default_rng(2).standard_normal((5, D)) * 3
    for i, layer in enumerate(f.layers):
        R = f.lowrank.R[i]
        got = np.stack([reference(p, xi, layer) for xi in x])
        assert np.abs(x @ R.T).max() > 0.5  # there was something to remove
        np.testing.assert_allclose(got @ R.T, 0.0, atol=1e-5)
        np.testing.assert_allclose(got, x - (x @ R.T) @ R, atol=1e-5)  # and nothing else moved


@pytest.mark.parametrize("mode", ["clamp", "scale"])
def test_lowrank_clamp_and_scale_are_400s_on_mode(mode):
    with pytest.raises(SteeringError) as e:
        compiler().compile({"features": {"lora": {"mode": mode, "strength": 1.0}}})
    assert e.value.param == "steering.features.lora.mode"
    assert "lowrank" in e.value.message and mode in e.value.message


def test_condition_must_be_read_before_the_earliest_layer():
    c = compiler()
    # k/dir is read at layer 1: fine for k/dir itself (layer 1) and for k/lora (layers 1, 2) ...
    ok = c.compile({"features": {"lora": {"strength": 1.0, "when": {"feature": "dir", "above": 0.1}}}})
    assert [ok.program.layers[x].cond for x in (1, 2)] == [[1] * R_RANK] * 2
    # ... but not for k/multi, whose first layer is 0
    with pytest.raises(SteeringError) as e:
        c.compile({"features": {"multi": {"strength": 1.0, "when": {"feature": "dir", "above": 0.1}}}})
    assert e.value.param == "steering.features.multi.when.feature"
    assert "layer 0" in e.value.message
    gated = c.compile({"features": {"multi": {"strength": 1.0,
                                              "when": {"feature": "early", "above": 0.1}}}})
    f = feat("k/multi")
    for i, layer in enumerate(f.layers):  # a conditioned add: one gated entry per layer
        lp = gated.program.layers[layer]
        assert lp.cond == [1] and lp.alpha == [0.0] and lp.beta == [1.0]
        np.testing.assert_allclose(lp.dec[0], 2.0 * f.directions[i] / np.linalg.norm(f.direction),
                                   rtol=1e-6)


def test_lowrank_rows_count_against_max_features():
    with pytest.raises(SteeringError) as e:
        compiler(max_features=R_RANK - 1).compile({"features": {"lora": 1.0}})
    assert e.value.param == "steering" and f"{R_RANK} clamp/scale/ablate entries at layer 1" in e.value.message
    assert compiler(max_features=R_RANK).compile({"features": {"lora": 1.0}}) is not None


def test_entry_labels_follow_table_order_and_lowrank_reads_as_probe():
    v = np.random.default_rng(3).standard_normal(D)
    out = compiler().compile({
        "features": {"dir": {"mode": "clamp", "strength": 1.0}, "lora": 1.0,
                     "multi": {"mode": "ablate"}, "lora1": {"mode": "ablate"}},
        "vectors": [{"layer": 1, "values": v.tolist(), "mode": "ablate"}],
        "return_activations": True})
    assert out.entry_labels == {
        1: ["k/dir", None, None, None, "k/multi", None, None, "vectors[0]"],
        2: [None, None, None, "k/multi"],
        0: ["k/multi"],
    }
    for layer, labels in out.entry_labels.items():
        assert len(labels) == out.program.layers[layer].num_entries
    assert [n for n, _ in out.probes] == ["k/lora", "k/lora1"]
    assert out.capture == (1,)  # both lowrank features are read out at their readout layer


def test_single_layer_labels_and_probes_as_before():
    """For single-layer features and vectors the per-entry labels are the old rule's: one label
    per clamp/scale/ablate or conditioned entry, unconditioned adds read as probes."""
    v = np.random.default_rng(4).standard_normal(D)
    out = compiler().compile({
        "features": {"dir": {"mode": "clamp", "strength": 1.0}, "early": 0.5,
                     "k/lora1": {"mode": "ablate"}},
        "vectors": [{"layer": 1, "values": v.tolist()},
                    {"layer": 1, "values": v.tolist(), "mode": "scale", "scale": 2.0},
                    {"layer": 1, "values": v.tolist(),
                     "when": {"feature": "early", "above": 0.0}}],
        "return_activations": True})
    assert out.entry_labels == {1: ["k/dir", None, None, "vectors[1]", "vectors[2]"]}
    assert [n for n, _ in out.probes] == ["k/early", "k/lora1"]
    assert out.capture == (0, 1)


def test_lowrank_weights_are_in_the_hash():
    base = kinds_features()
    lr = feat("k/lora").lowrank
    W = lr.W.copy()
    W[1, 2, 5] += 1e-3

    def hash_with(lowrank):
        feats = [f if f.name != "k/lora" else Feature("k/lora", 1, "lowrank", f.direction,
                                                      layers=(1, 2), lowrank=lowrank) for f in base]
        c = SteeringCompiler(SteeringConfig(max_slots=S, max_features=K), D, L,
                             StaticFeatureSource(feats))
        return c.compile({"features": {"lora": 1.0}}).table_hash

    same = hash_with(LowRank(R=lr.R, W=lr.W.copy(), b=lr.b))
    assert same == hash_with(lr)
    assert hash_with(LowRank(R=lr.R, W=W, b=lr.b)) != same


# -- the op ---------------------------------------------------------------------------------
def make_runtime(host_gating: bool = True, dtype: torch.dtype = torch.float64) -> SteeringRuntime:
    return SteeringRuntime(SteeringConfig(max_slots=S, max_features=K), num_layers=L, hidden_size=D,
                           max_tokens=64, dtype=dtype, device=torch.device("cpu"),
                           host_gating=host_gating)


def _seat(rt, compiled, key):
    slot, fresh = rt.allocator.acquire(key, compiled.table_hash)
    assert fresh
    rt.write_slot(slot, compiled.program)
    return slot


@pytest.mark.parametrize("host_gating", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_op_mixed_batch_equals_the_formulas(host_gating, dtype, tol):
    """Slot 0, a lowrank add and a multi-layer add in one batch: every token equals its formula
    (computed from the feature's own tensors, not from the program), slot-0 tokens are bitwise
    untouched, and each row equals that request run alone."""
    rt = make_runtime(host_gating, dtype)
    c = compiler()
    lora, multi = feat("k/lora"), feat("k/multi")
    prog_lora = c.compile({"features": {"lora": 0.8}})
    prog_multi = c.compile({"features": {"multi": -0.6}})
    slots = {"lora": _seat(rt, prog_lora, "a"), "multi": _seat(rt, prog_multi, "b")}
    req = [("none", 0, 3), ("lora", slots["lora"], 2), ("multi", slots["multi"], 4),
           ("lora", slots["lora"], 1)]
    n_sched = [n for *_, n in req]
    T = sum(n_sched)
    g = torch.Generator().manual_seed(7)
    n0 = np.linalg.norm(multi.direction)
    for layer in range(L):
        h = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype) * 3
        r = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
        h0, x0 = h.clone(), (h + r).double().numpy()
        run_step(rt, [s for _, s, _ in req], n_sched, [0] * 4, [100] * 4, [0] * 4, h, r, layer)
        got = (h + r).double().numpy()
        t = 0
        for kind, slot, n in req:
            rows = slice(t, t + n)
            if kind == "none":
                assert torch.equal(h[rows], h0[rows])
            elif kind == "lora":
                want = (loreft(lora, lora.layers.index(layer), x0[rows], 0.8)
                        if layer in lora.layers else x0[rows])
                np.testing.assert_allclose(got[rows], want, rtol=tol, atol=tol)
            else:
                i = multi.layers.index(layer)
                want = x0[rows] + (-0.6) * 2.0 * multi.directions[i] / n0
                np.testing.assert_allclose(got[rows], want, rtol=tol, atol=tol)
            # the same request alone
            hs, rs = h0[rows].clone(), r[rows].clone()
            run_step(rt, [slot], [n], [0], [100], [0], hs, rs, layer)
            # (to the last bits: the matmuls block a batch of other size differently)
            np.testing.assert_allclose(hs.double().numpy(), h[rows].double().numpy(),
                                       rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
            t += n
        assert np.abs(got - x0)[3:].max() > 0.1  # the steering moved the steered rows


@pytest.mark.parametrize("host_gating", [True, False])
def test_op_strength_zero_is_bitwise_unsteered(host_gating):
    rt = make_runtime(host_gating)
    c = compiler()
    prog = c.compile({"features": {"lora": 0.0, "lora1": 0.0, "multi": 0.0}})
    assert prog.program.layers[1].num_entries == R_RANK + 2  # the entries are there, with α = 0
    slot = _seat(rt, prog, "z")
    for layer in range(L):
        h = torch.randn(6, D, dtype=torch.float64) * 5
        r = torch.randn(6, D, dtype=torch.float64)
        h0 = h.clone()
        run_step(rt, [0, slot], [2, 4], [0, 0], [9, 9], [0, 0], h, r, layer)
        assert torch.equal(h, h0), layer


def test_op_lowrank_ablate_zeroes_the_subspace():
    rt = make_runtime()
    f = feat("k/lora")
    slot = _seat(rt, compiler().compile({"features": {"lora": {"mode": "ablate"}}}), "x")
    for i, layer in enumerate(f.layers):
        h = torch.randn(4, D, dtype=torch.float64) * 5
        r = torch.randn(4, D, dtype=torch.float64)
        before = ((h + r).numpy() @ f.lowrank.R[i].T)
        run_step(rt, [slot], [4], [0], [9], [0], h, r, layer)
        after = (h + r).numpy() @ f.lowrank.R[i].T
        assert np.abs(before).max() > 1.0
        np.testing.assert_allclose(after, 0.0, atol=1e-5)


# -- transformers' hooks --------------------------------------------------------------------
def test_hf_reference_equals_the_loreft_formula(tmp_path):
    """steering.hf.hf_steering with a lowrank + multi-layer program on a tiny random Llama gives
    the logits of hooks that apply the formulas directly to the feature's tensors."""
    from transformers import AutoModelForCausalLM

    from steering.hf import hf_decoder_layers, hf_steering
    from steering.model_store import resolve_model
    from tests.steering.tiny_models import D as TD
    from tests.steering.tiny_models import N_LAYERS as TL
    from tests.steering.tiny_models import build

    folder = build("llama", tmp_path / "llama", resolve_model(None))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    feats = kinds_features(TD)
    lora, multi = (next(f for f in feats if f.name == n) for n in ("k/lora", "k/multi"))
    c = SteeringCompiler(SteeringConfig(), TD, TL, StaticFeatureSource(feats))
    program = c.compile({"features": {"lora": 2.0, "multi": 1.5}}).program
    ids = torch.tensor([[1, 520, 3100, 811, 12, 4301, 90]])
    n0 = np.linalg.norm(multi.direction)

    def formula(layer):
        def hook(_m, _i, out):
            hs = out[0] if isinstance(out, tuple) else out
            x = hs.double().numpy()[0]  # [T, d]
            if layer in multi.layers:
                x = x + 1.5 * 2.0 * multi.directions[multi.layers.index(layer)] / n0
            if layer in lora.layers:
                x = loreft(lora, lora.layers.index(layer), x, 2.0)
            new = torch.from_numpy(x).to(hs.dtype)[None]
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return hook

    with torch.no_grad():
        plain = model(ids).logits
        with hf_steering(model, program):
            got = model(ids).logits
        handles = [hf_decoder_layers(model)[x].register_forward_hook(formula(x)) for x in range(TL)]
        try:
            want = model(ids).logits
        finally:
            for hd in handles:
                hd.remove()
    assert (got - plain).abs().max() > 0.5  # the steering is real
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
