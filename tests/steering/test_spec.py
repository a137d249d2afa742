"""The steering spec: shape validation (param paths), the bare-number form, and the merge rule."""

import numpy as np
import pytest

from steering.spec import SteeringError, SteeringSpec, merge, param_path

D = 4


def vec(layer, x=1.0):
    return {"layer": layer, "values": [x] * D}


def test_bare_number_and_object_forms():
    spec = SteeringSpec.parse({"features": {"a": 0.5, "b": {"strength": 2, "mode": "clamp"},
                                            "c": {"mode": "ablate"}}})
    a, b, c = (spec.features[k] for k in "abc")
    assert (a.strength, a.mode, a.bare) == (0.5, None, True)
    assert (b.strength, b.mode, b.bare) == (2.0, "clamp", False)
    assert (c.strength, c.mode) == (None, "ablate")
    assert SteeringSpec.parse({"features": None, "vectors": None}).empty


@pytest.mark.parametrize("payload,param", [
    ([], "steering"),
    ({"vectors": [{"layer": True, "values": [0.0] * D}]}, "steering.vectors[0].layer"),
    ({"vectors": [{"layer": 1, "values": [0.0, True, 0.0, 0.0]}]}, "steering.vectors[0].values"),
    ({"vectors": [{"layer": 1, "values": [0.0, "1", 0.0, 0.0]}]}, "steering.vectors[0].values"),
    ({"vectors": [{"layer": 1, "values": [0.0, float("inf"), 0.0, 0.0]}]}, "steering.vectors[0].values"),
    ({"vectors": [{"layer": 1, "base64": 7}]}, "steering.vectors[0].base64"),
    ({"vectors": [vec(1)] * 2 + [{"layer": 1, "values": [0] * D, "scale": float("nan")}]},
     "steering.vectors[2].scale"),
    ({"features": {"pack/x.y": float("nan")}}, "steering.features.pack/x.y"),
    ({"features": {"x": {"strength": True}}}, "steering.features.x.strength"),
    ({"features": {"x": {"strength": 1, "weight": 2}}}, "steering.features.x.weight"),
    ({"return_activations": 1}, "steering.return_activations"),
])
def test_shape_errors_name_their_param(payload, param):
    with pytest.raises(SteeringError) as e:
        SteeringSpec.parse(payload)
    assert e.value.param == param and e.value.code == "invalid_steering", e.value.message


def test_param_path_under_another_prefix():
    assert param_path(("vectors", 3, "values")) == "steering.vectors[3].values"
    assert param_path(("features", "a"), "variants.[0].steering") == "variants.[0].steering.features.a"
    with pytest.raises(SteeringError) as e:
        SteeringSpec.parse({"vectors": [{"values": [0.0] * D}]}, prefix="variants.[1].steering")
    assert e.value.param == "variants.[1].steering.vectors[0].layer"


def test_merge_rule():
    preset = SteeringSpec.parse({"features": {"pirate": 1.0, "formality": 0.5}, "vectors": [vec(1)],
                                 "apply_to": "all"})
    variant = SteeringSpec.parse({"features": {"formality": -0.5}})
    request = SteeringSpec.parse({"features": {"pirate": 0.2}, "vectors": [vec(2, 3.0)],
                                  "apply_to": "generated", "return_activations": True})
    merged = merge(preset, variant, request)
    assert {k: f.strength for k, f in merged.features.items()} == {"pirate": 0.2, "formality": -0.5}
    assert [v.layer for v in merged.vectors] == [1, 2]
    assert np.array_equal(merged.vectors[1].values, [3.0] * D)
    assert (merged.apply_to, merged.return_activations) == ("generated", True)
    # a later layer that does not set apply_to keeps the earlier one
    assert merge(request, variant).apply_to == "generated"
    assert merge(None, None) is None
    assert preset.features["pirate"].strength == 1.0 and len(preset.vectors) == 1  # inputs untouched


def test_dump_round_trips():
    spec = SteeringSpec.parse({"features": {"a": 1.5}, "vectors": [vec(0, 0.25)], "apply_to": "prompt"})
    again = SteeringSpec.parse(spec.model_dump(exclude_unset=True))
    assert again.features["a"].strength == 1.5 and again.apply_to == "prompt"
    assert np.array_equal(again.vectors[0].values, [0.25] * D)
