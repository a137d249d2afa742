"""The request schema: validation errors name their param; compilation obeys the algebra."""

import base64

import numpy as np
import pytest

from steering.config import SteeringConfig
from steering.features import Feature, StaticFeatureSource
from steering.program import SteeringProgram
from steering.request import KeyBound, KeyBoundExceeded, SteeringCompiler, SteeringError

D, L = 16, 4


def compiler(**cfg):
    rng = np.random.default_rng(1)
    feats = StaticFeatureSource(
        [
            Feature("tone/formality", 1, "direction", rng.standard_normal(D), scale=3.0),
            Feature("tone/pirate", 2, "direction", rng.standard_normal(D), default_mode="clamp"),
            Feature("other/pirate", 2, "direction", rng.standard_normal(D)),
            Feature(
                "sae/bridge", 2, "sae", rng.standard_normal(D), encoder=rng.standard_normal(D),
                bias=-0.5, threshold=0.25, scale=2.0,
            ),
        ]
    )
    return SteeringCompiler(SteeringConfig(**cfg), hidden_size=D, num_layers=L, feature_source=feats)


def vec(v, **kw):
    return {"layer": 1, "values": [float(x) for x in v], **kw}


def test_empty_is_none():
    c = compiler()
    assert c.compile(None) is None
    assert c.compile({}) is None
    assert c.compile({"features": {}, "vectors": [], "apply_to": "generated"}) is None


def test_add_scale_algebra_shares_tables():
    c = compiler()
    v = np.random.default_rng(0).standard_normal(D)
    a = c.compile({"vectors": [vec(v, scale=2.0)]})
    b = c.compile({"vectors": [vec(2 * v)]})
    halves = c.compile({"vectors": [vec(v, scale=0.5), vec(v, scale=0.5)]})
    one = c.compile({"vectors": [vec(v)]})
    assert a.table_hash == b.table_hash
    assert halves.table_hash == one.table_hash
    assert a.table_hash != one.table_hash
    # apply_to changes the request hash, not the tables
    g = c.compile({"vectors": [vec(2 * v)], "apply_to": "generated"})
    assert g.table_hash == b.table_hash and g.hash != b.hash
    assert g.cache_salt != b.cache_salt


def test_base64_equals_values():
    c = compiler()
    v = np.random.default_rng(0).standard_normal(D).astype("<f4")
    a = c.compile({"vectors": [vec(v)]})
    b = c.compile({"vectors": [{"layer": 1, "base64": base64.b64encode(v.tobytes()).decode()}]})
    assert a.table_hash == b.table_hash


def test_feature_modes_compile_to_entries():
    c = compiler()
    out = c.compile(
        {"features": {"formality": 0.5, "tone/pirate": 2.0, "bridge": {"strength": 1.5, "mode": "clamp"}}}
    )
    p = out.program
    f = c.features.resolve("formality")
    np.testing.assert_allclose(p.layers[1].add, 0.5 * 3.0 * f.unit_direction(), rtol=1e-12)
    lp = p.layers[2]
    assert lp.num_entries == 2
    # tone/pirate: default mode clamp, t = s·c = 2.0, linear readout
    assert lp.alpha[0] == -1.0 and lp.beta[0] == 2.0 and not lp.rectify[0]
    # SAE feature: clamp to s·c = 3.0 through its JumpReLU encoder
    assert lp.alpha[1] == -1.0 and lp.beta[1] == 3.0 and lp.rectify[1]
    assert lp.theta[1] == pytest.approx(0.25) and lp.bias[1] == pytest.approx(-0.5)
    assert [a["feature"] for a in out.summary()["applied"]] == ["tone/formality", "tone/pirate", "sae/bridge"]


def test_scale_and_ablate_coefficients():
    c = compiler()
    v = np.ones(D)
    p = c.compile({"vectors": [vec(v, mode="scale", scale=3.0), vec(v, mode="ablate")]}).program
    assert p.layers[1].alpha == [2.0, -1.0] and p.layers[1].beta == [0.0, 0.0]


def test_wire_round_trip_keeps_hash():
    c = compiler()
    out = c.compile(
        {"features": {"formality": 0.5, "bridge": {"strength": 1.0, "mode": "scale"}},
         "vectors": [vec(np.arange(D), mode="clamp", target=1.5)]}
    )
    wire = out.extra_args()["steering"]
    back = SteeringProgram.from_wire(wire["program"])
    assert back.table_hash() == out.table_hash == wire["hash"]


@pytest.mark.parametrize(
    "payload,param",
    [
        ("nope", "steering"),
        ({"bogus": 1}, "steering.bogus"),
        ({"vectors": [vec(np.ones(D - 1))]}, "steering.vectors[0].values"),
        ({"vectors": [{"layer": 9, "values": [0.0] * D}]}, "steering.vectors[0].layer"),
        ({"vectors": [{"layer": -1, "values": [0.0] * D}]}, "steering.vectors[0].layer"),
        ({"vectors": [{"values": [0.0] * D}]}, "steering.vectors[0].layer"),
        ({"vectors": [vec([float("nan")] + [0.0] * (D - 1))]}, "steering.vectors[0].values"),
        ({"vectors": [vec([float("inf")] + [0.0] * (D - 1))]}, "steering.vectors[0].values"),
        ({"vectors": [vec(np.ones(D), scale=1e9)]}, "steering.vectors[0].scale"),
        ({"vectors": [vec(np.ones(D), mode="twist")]}, "steering.vectors[0].mode"),
        ({"vectors": [vec(np.ones(D), mode="clamp")]}, "steering.vectors[0].target"),
        ({"vectors": [vec(np.ones(D), mode="clamp", target=float("nan"))]}, "steering.vectors[0].target"),
        ({"vectors": [vec(np.zeros(D), mode="clamp", target=1.0)]}, "steering.vectors[0]"),
        ({"vectors": [{"layer": 1, "base64": base64.b64encode(b"\0" * (4 * D - 4)).decode()}]},
         "steering.vectors[0].base64"),
        ({"vectors": [{"layer": 1, "base64": "***"}]}, "steering.vectors[0].base64"),
        ({"vectors": [{"layer": 1, "values": [0.0] * D, "base64": "AAAA"}]}, "steering.vectors[0]"),
        ({"vectors": [{"layer": 1, "values": [0.0] * D, "path": "/etc/passwd"}]}, "steering.vectors[0].path"),
        ({"features": {"nonexistent": 1.0}}, "steering.features.nonexistent"),
        ({"features": {"pirate": 1.0}}, "steering.features.pirate"),  # ambiguous bare name
        ({"features": {"formality": 100.0}}, "steering.features.formality"),
        ({"features": {"formality": {"strength": 1.0, "mode": "nudge!"}}}, "steering.features.formality.mode"),
        ({"features": {"formality": "high"}}, "steering.features.formality"),
        ({"apply_to": "sometimes", "vectors": [vec(np.ones(D))]}, "steering.apply_to"),
        ({"return_activations": "yes"}, "steering.return_activations"),
        ({"vectors": [vec(np.ones(D))] * 3}, "steering.vectors"),
        ({"vectors": [vec(np.ones(D), mode="ablate")] * 2}, "steering"),
    ],
)
def test_bad_input_names_param(payload, param):
    c = compiler(max_vectors=2, max_features=1, max_strength=10.0)
    with pytest.raises(SteeringError) as e:
        c.compile(payload)
    assert e.value.param == param, e.value.message


def test_too_many_features():
    c = compiler(max_features=1)
    with pytest.raises(SteeringError) as e:
        c.compile({"features": {"formality": 1.0, "tone/pirate": 1.0}})
    assert e.value.param == "steering.features"


def test_layer_outside_steer_layers():
    c = compiler(layers=[2])
    with pytest.raises(SteeringError) as e:
        c.compile({"vectors": [vec(np.ones(D))]})
    assert "not steerable" in e.value.message and e.value.param == "steering.vectors[0].layer"


def test_no_feature_source_means_unknown_feature():
    c = SteeringCompiler(SteeringConfig(), hidden_size=D, num_layers=L)
    with pytest.raises(SteeringError) as e:
        c.compile({"features": {"formality": 1.0}})
    assert e.value.param == "steering.features.formality" and e.value.code == "unknown_feature"


# -- raw-vector bounds (issue 16) ---------------------------------------------------------------
def rejects(c, vectors, param, **kw):
    with pytest.raises(SteeringError) as e:
        c.compile({"vectors": vectors}, **kw)
    assert e.value.param == param, e.value.message
    return e.value.message


def unit(norm, seed=0):
    v = np.random.default_rng(seed).standard_normal(D)
    return v / np.linalg.norm(v) * norm


def test_values_must_be_finite_after_the_float32_cast():
    c = compiler()
    msg = rejects(c, [vec([1e39] * D)], "steering.vectors[0].values")
    assert "float32" in msg
    rejects(c, [vec([0.0] * (D - 1) + [-3.5e38])], "steering.vectors[0].values")
    raw = np.full(D, np.finfo(np.float32).max, dtype="<f4")
    rejects(c, [{"layer": 1, "base64": base64.b64encode(raw.tobytes()).decode()}],
            "steering.vectors[0].base64")
    # a clamp uses only the direction, but its values must still be representable
    rejects(c, [vec([1e39] * D, mode="ablate")], "steering.vectors[0].values")


def test_huge_finite_vectors_are_refused_even_without_measured_norms():
    c = compiler()
    assert c.layer_norms is None
    rejects(c, [vec([1e30] * D)], "steering.vectors[0].values")  # ‖v‖² overflows float32
    rejects(c, [vec([1e18] * D, scale=30.0)], "steering.vectors[0].scale")
    assert c.compile({"vectors": [vec(unit(1e6))]}) is not None  # large, but representable


def test_add_norm_is_bounded_relative_to_the_layers_residual_norm():
    c = compiler()
    c.layer_norms = {1: 100.0, 2: 50.0}
    c.max_vector_norm = 4.0  # the server's factor (--max-steering-vector-norm)
    assert c.compile({"vectors": [vec(unit(399.0))]}) is not None
    rejects(c, [vec(unit(401.0))], "steering.vectors[0].values")
    rejects(c, [vec(unit(300.0), scale=2.0)], "steering.vectors[0].scale")  # the scale pushes it over
    assert c.compile({"vectors": [vec(unit(300.0), scale=-1.0)]}) is not None
    msg = rejects(c, [vec(unit(60.0)) | {"layer": 2}, vec(unit(300.0)) | {"layer": 2}],
                  "steering.vectors[1].values")
    assert "layer 2" in msg and "4 ×" in msg
    # a clamp's target is bounded the same way; its direction's length does not matter
    assert c.compile({"vectors": [vec(unit(1e6), mode="clamp", target=390.0)]}) is not None
    rejects(c, [vec(unit(1.0), mode="clamp", target=-410.0)], "steering.vectors[0].target")


def test_a_policy_can_only_tighten_the_vector_bound():
    c = compiler()
    c.layer_norms = {1: 100.0}
    c.max_vector_norm = 4.0  # the server's factor (--max-steering-vector-norm)
    rejects(c, [vec(unit(150.0))], "steering.vectors[0].values", max_vector_norm=1.0)
    assert c.compile({"vectors": [vec(unit(99.0))]}, max_vector_norm=1.0) is not None
    rejects(c, [vec(unit(450.0))], "steering.vectors[0].values", max_vector_norm=10.0)
    c.max_vector_norm = 2.0  # the server's own factor (--max-steering-vector-norm)
    rejects(c, [vec(unit(250.0))], "steering.vectors[0].values")


def test_a_keys_bound_covers_only_the_requests_own_vectors_and_yields_to_a_400():
    """KeyBound(F, first): vectors[first:] are the request's own (a preset's come first and are
    exempt); a vector the server admits but the key's F refuses raises KeyBoundExceeded with the
    param as the request wrote it, and only once everything else compiled."""
    c = compiler()
    c.layer_norms = {1: 100.0}
    c.max_vector_norm = 4.0
    preset, own = vec(unit(300.0)), vec(unit(150.0, seed=1))
    assert c.compile({"vectors": [preset, vec(unit(50.0))]}, key_bound=KeyBound(1.0, first=1)) is not None
    with pytest.raises(KeyBoundExceeded) as err:
        c.compile({"vectors": [preset, own]}, key_bound=KeyBound(1.0, first=1))
    assert err.value.param == "steering.vectors[0].values" and err.value.factor == 1.0
    assert "exceeds 100 (1 × the median residual norm at layer 1" in err.value.message
    with pytest.raises(KeyBoundExceeded) as err:  # a clamp target, bounded the same way
        c.compile({"vectors": [vec(unit(1.0), mode="clamp", target=120.0)]}, key_bound=KeyBound(1.0))
    assert err.value.param == "steering.vectors[0].target"
    # a later vector the server refuses anyway: its 400, not the key's 403
    with pytest.raises(SteeringError) as err:
        c.compile({"vectors": [own, vec(unit(500.0))]}, key_bound=KeyBound(1.0))
    assert not isinstance(err.value, KeyBoundExceeded) and err.value.param == "steering.vectors[1].values"


def test_max_steering_strength_bounds_a_raw_vectors_dose_like_a_features():
    c = compiler(max_strength=2.0)  # strength 2 = 0.5 × the stream's norm
    c.layer_norms = {1: 100.0}
    assert c.compile({"vectors": [vec(unit(49.0))]}) is not None
    rejects(c, [vec(unit(60.0))], "steering.vectors[0].values")
    rejects(c, [vec(unit(30.0), scale=2.0)], "steering.vectors[0].scale")


def test_readout_bytes_bound_entries_and_captured_streams():
    from steering.request import readout_record_bytes

    c = compiler()
    plain = c.compile({"features": {"tone/pirate": 1.0, "bridge": {"strength": 1.0, "mode": "clamp"}}})
    assert plain.readout_bytes(100) == 0  # no readout asked
    asked = c.compile({"features": {"tone/pirate": 1.0, "bridge": {"strength": 1.0, "mode": "clamp"},
                                    "formality": 1.0}, "return_activations": True})
    # layer 2: two clamp entries, one record per position; formality (add) captures layer 1
    assert asked.capture == (1,)
    assert asked.readout_bytes(10) == 10 * (readout_record_bytes(2) + readout_record_bytes(D))
