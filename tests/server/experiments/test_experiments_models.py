"""The typed experiments objects alone (no engine, no app): what each bad body is rejected with
(status, ``param``, ``code`` as :func:`server.errors.describe` reports them), how stored rows of
earlier servers load, and how the presets file reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from server.errors import describe
from server.experiments.models import (
    MAX_VARIANTS,
    Experiment,
    ExperimentPatch,
    Feedback,
    NewExperiment,
    NewPreset,
    Preset,
    PresetsFile,
)
from server.experiments.presets import Presets, read_presets_file

CONTROL = {"name": "c", "control": True}
PIRATE = {"features": {"pirate": 1.0}}


def rejected(model: type[BaseModel], body: Any) -> tuple[int, str | None, str | None]:
    """(status, param, code) of the error ``body`` is rejected with."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    status, err = describe(info.value)
    return status, err["error"]["param"], err["error"]["code"]


def experiment(*variants: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"name": "e", "variants": [CONTROL, *variants], **kw}


@pytest.mark.parametrize("weight", [0, -1, -0.5, float("nan"), float("inf"), True, "1", None])
def test_variant_weight_must_be_a_finite_positive_number(weight):
    body = experiment({"name": "t", "weight": weight})
    assert rejected(NewExperiment, body) == (400, "variants.[1].weight", None)


@pytest.mark.parametrize("body, param, code", [
    ({"name": "e", "variants": []}, "variants", None),
    ({"name": "e"}, "variants", None),
    ({"name": "e", "variants": [CONTROL] + [{"name": f"v{i}"} for i in range(MAX_VARIANTS)]}, "variants", None),
    ({"name": "e", "variants": [{"name": "a"}, {"name": "b"}]}, "variants", None),  # no control
    (experiment({"name": "d", "control": True}), "variants", None),  # two controls
    (experiment({"name": "c"}), "variants.[1].name", None),  # duplicate name
    (experiment({"name": "t", "preset": "pirate", "steering": PIRATE}), "variants.[1].preset", None),
    (experiment({"name": "t", "control": 1}), "variants.[1].control", None),
    (experiment({"name": "t", "colour": "red"}), "variants.[1].colour", "unsupported_parameter"),
    (experiment({"name": "t", "steering": {"features": {"pirate": "x"}}}),
     "variants.[1].steering.features.pirate", "invalid_steering"),
    (experiment({"name": "t", "steering": {"vectors": [{"layer": 1, "values": [1.0, float("nan")]}]}}),
     "variants.[1].steering.vectors[0].values", "invalid_steering"),
    (experiment({"name": "t", "steering": {"experiment": "other"}}),
     "variants.[1].steering.experiment", "invalid_steering"),
    (experiment(unit="team"), "unit", None),
    (experiment(status="done"), "status", None),
    (experiment(created=1.0), "created", "unsupported_parameter"),  # set by the server
    (experiment(name="e/x"), "name", None),
    (experiment(name=""), "name", None),
    (experiment(name="-e"), "name", None),
    (experiment(name="e" * 65), "name", None),
    (experiment(name=3), "name", None),
    ([CONTROL], None, None),
])
def test_bad_experiments(body, param, code):
    assert rejected(NewExperiment, body) == (400, param, code)


def test_unknown_fields_are_named_before_other_errors():
    assert rejected(ExperimentPatch, {"variants": []}) == (400, "variants", "unsupported_parameter")
    assert rejected(NewPreset, {"name": "bad name", "extra": 1}) == (400, "extra", "unsupported_parameter")
    assert rejected(Feedback, {"note": "x"}) == (400, "note", "unsupported_parameter")


def test_good_experiment_defaults_and_control():
    exp = NewExperiment.model_validate(experiment({"name": "t", "preset": "pirate", "weight": 3}))
    assert (exp.unit, exp.status, exp.description) == ("user", "running", "")
    assert exp.variants[1].weight == 3.0 and isinstance(exp.variants[1].weight, float)
    assert exp.control.name == "c"


@pytest.mark.parametrize("body, param, code", [
    ({"name": "x"}, "steering", "invalid_steering"),
    ({"name": "x", "steering": None}, "steering", "invalid_steering"),
    ({"name": "x", "steering": {}}, "steering", "invalid_steering"),  # steers nothing
    ({"name": "x", "steering": {"features": {}, "vectors": []}}, "steering", "invalid_steering"),
    ({"name": "x", "steering": []}, "steering", "invalid_steering"),
    ({"name": "x", "steering": {"vectors": [{"layer": "a"}]}}, "steering.vectors[0].layer", "invalid_steering"),
    ({"name": "bad name", "steering": PIRATE}, "name", None),
    ({"steering": PIRATE}, "name", None),
    ({"name": "x", "steering": PIRATE, "description": 3}, "description", None),
    ({"name": "x", "steering": PIRATE, "source": "file"}, "source", "unsupported_parameter"),
])
def test_bad_presets(body, param, code):
    assert rejected(NewPreset, body) == (400, param, code)


@pytest.mark.parametrize("body, param", [
    ({"response_id": "r"}, "score"),  # neither score nor label
    ({"response_id": "r", "score": None, "label": None}, "score"),
    ({"score": 1}, "response_id"),
    ({"response_id": "", "score": 1}, "response_id"),
    ({"response_id": 7, "score": 1}, "response_id"),
    ({"response_id": "r", "score": "x"}, "score"),
    ({"response_id": "r", "score": True}, "score"),
    ({"response_id": "r", "score": float("nan")}, "score"),
    ({"response_id": "r", "label": "meh"}, "label"),
])
def test_bad_feedback(body, param):
    assert rejected(Feedback, body) == (400, param, None)


def test_feedback_takes_a_score_a_label_or_both():
    assert Feedback.model_validate({"response_id": "r", "score": 2}).score == 2.0
    assert Feedback.model_validate({"response_id": "r", "label": "bad"}).label == "bad"
    fb = Feedback.model_validate({"response_id": "r", "score": -1.5, "label": "good"})
    assert (fb.score, fb.label) == (-1.5, "good")


def test_patch_changes_only_the_status():
    assert ExperimentPatch.model_validate({"status": "paused"}).status == "paused"
    assert rejected(ExperimentPatch, {}) == (400, "status", None)
    assert rejected(ExperimentPatch, {"status": "finished"}) == (400, "status", None)


def test_rows_of_earlier_servers_load_and_dump_unchanged():
    """The JSON the store holds (written before these models existed) loads, and dumping gives
    the same JSON back: steering as it was given, no ``preset`` key on inline variants."""
    preset_row = {"name": "calm", "steering": {"features": {"enthusiasm": -1.0, "humor": {"strength": 2,
                  "mode": "add"}}, "apply_to": "generated"}, "description": "calm", "source": "api"}
    assert Preset.model_validate(preset_row).model_dump(mode="json") == {
        **preset_row, "steering": {**preset_row["steering"],
                                   "features": {"enthusiasm": -1.0, "humor": {"strength": 2.0, "mode": "add"}}}}
    exp_row = {"name": "t", "unit": "user", "description": "", "status": "paused", "variants": [
        {"name": "control", "weight": 1.0, "control": True, "steering": None},
        {"name": "pirate", "weight": 2.0, "control": False, "preset": "pirate", "steering": PIRATE},
        {"name": "raw", "weight": 1.0, "control": False,
         "steering": {"vectors": [{"layer": 3, "values": [0.5, -1.0], "scale": 2.0}]}}]}
    exp = Experiment.model_validate({**exp_row, "created": 12.5})  # preset + snapshot is fine here
    assert exp.model_dump(mode="json", exclude={"created"}) == exp_row
    assert exp.created == 12.5 and exp.control.name == "control"


def test_presets_file_shapes(tmp_path: Path):
    wrapped = tmp_path / "wrapped.yaml"
    wrapped.write_text("presets:\n  shouty: {steering: {features: {enthusiasm: 1.5}}, description: loud}\n")
    bare = tmp_path / "bare.yaml"
    bare.write_text("shouty: {steering: {features: {enthusiasm: 1.5}}}\n")
    for path in (wrapped, bare):
        (p,) = read_presets_file(path)
        assert (p.name, p.source) == ("shouty", "file")
        assert p.model_dump(mode="json")["steering"] == {"features": {"enthusiasm": 1.5}}
    assert PresetsFile.model_validate(None).presets == {}
    for text, match in (("presets:\n  x: 3\n", "needs a 'steering' mapping"),
                        ("presets:\n  x: {description: d}\n", "needs a 'steering' mapping"),
                        ("presets:\n  'a b': {steering: {features: {a: 1}}}\n", "should match pattern"),
                        ("presets:\n  x: {steering: {features: {a: 1}}, tags: [t]}\n", "x.tags"),
                        ("- a\n- b\n", "valid dictionary")):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_presets_file(path)


def test_file_presets_shadow_stored_ones(tmp_path: Path, caplog):
    path = tmp_path / "p.yaml"
    path.write_text("presets:\n  calm: {steering: {features: {enthusiasm: -1}}}\n")
    presets = Presets(path, strict=True)
    presets.load([{"name": "calm", "steering": PIRATE, "description": "", "source": "api"},
                  {"name": "pirate", "steering": PIRATE, "description": "arr"},
                  {"name": "broken", "steering": {"features": {"x": "y"}}}])
    assert presets.items["calm"].source == "file" and presets.items["pirate"].source == "api"
    assert "broken" not in presets.items and "shadows the stored one" in caplog.text
