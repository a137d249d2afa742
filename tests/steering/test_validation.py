"""The one translator from pydantic validation errors to field paths (steering.validation), and
that the places reporting validation errors write paths through it, one way."""

from __future__ import annotations

import copy
import json
from typing import Annotated

import pytest
from pydantic import BaseModel, Field, ValidationError

from steering.packs import MANIFEST_FILE, PackError, bundled_packs_dir
from steering.packs.manifest import parse_manifest
from steering.spec import SteeringError, SteeringSpec
from steering.validation import first_error, is_branch_label, param_path


@pytest.mark.parametrize("loc, prefix, path", [
    ((), "", ""),
    ((), "steering", "steering"),
    (("apply_to",), "", "apply_to"),
    (("vectors", 0, "values"), "", "vectors[0].values"),
    (("vectors", 0, "values"), "steering", "steering.vectors[0].values"),
    ((0, "name"), "", "[0].name"),
    (("keys", 1, "sha256"), "", "keys[1].sha256"),
    (("layers", 2), "", "layers[2]"),
    # dict keys are kept as written, whatever their characters
    (("features", "pirate", "strength"), "steering", "steering.features.pirate.strength"),
    (("features", "golden-gate", "when", "above"), "steering", "steering.features.golden-gate.when.above"),
    (("features", "tone/formality"), "steering", "steering.features.tone/formality"),
    (("policies", "p", "protect", "refusal"), "", "policies.p.protect.refusal"),
    (("features", "a"), "variants.[0].steering", "variants.[0].steering.features.a"),
    # pydantic's entries that name no field: a bad dict key, union branches' labels
    (("presets", "a b", "[key]"), "", "presets.a b"),
    (("corpus", "dict[str,any]", "x"), "", "corpus.x"),
    (("name", "function-after[check(), str]"), "", "name"),
    (("content", "list[TextPart]", 1, "text"), "", "content[1].text"),
    # only a request body drops a leading 'body': elsewhere it is a name like any other
    (("body",), "", "body"),
    (("body", "text"), "steering", "steering.body.text"),
])
def test_param_path(loc, prefix, path):
    assert param_path(loc, prefix) == path


@pytest.mark.parametrize("loc, path", [
    (("body",), ""),
    (("body", "temperature"), "temperature"),
    (("body", "messages", 0, "content"), "messages.[0].content"),
    # a tagged union's tag, a union branch's label, a plain type's label
    (("body", "messages", 0, "user-message", "content", "constrained-str"), "messages.[0].content"),
    (("body", "messages", 0, "content", "list[TextPart]", 1, "text"), "messages.[0].content.[1].text"),
    (("stop", "list[constrained-str]", 0), "stop.[0]"),
    (("stop", "str"), "stop"),
    (("tool_choice", "literal['none','auto','required']"), "tool_choice"),
    (("prompt", "list[list[constrained-int]]", 1, 1), "prompt.[1].[1]"),
    (("stream_options", "bogus"), "stream_options.bogus"),
    # below the steering object: the steering spec's own way, dict keys kept
    (("body", "steering", "vectors", 0, "layer"), "steering.vectors[0].layer"),
    (("body", "steering", "features", "golden-gate", "strength"), "steering.features.golden-gate.strength"),
    (("variants", 1, "steering", "vectors", 0, "values"), "variants.[1].steering.vectors[0].values"),
])
def test_param_path_of_an_openai_body(loc, path):
    assert param_path(loc, openai=True) == path


def test_branch_labels():
    for label in ("[key]", "list[TextPart]", "function-after[check(), str]", "literal['a']", "dict[str,any]"):
        assert is_branch_label(label) and is_branch_label(label, openai=True)
    for name in ("str", "user-message", "constrained-str", "None"):
        assert not is_branch_label(name) and is_branch_label(name, openai=True)
    for name in ("content", "golden-gate", "tone/formality", "pirate", 0, 3):
        assert not is_branch_label(name)
    assert not is_branch_label("content", openai=True) and not is_branch_label(0, openai=True)


class _Inner(BaseModel):
    n: int


class _Outer(BaseModel):
    items: list[_Inner]


class _Bounded(BaseModel):
    stop: str | Annotated[list[str], Field(max_length=1)]


def test_first_error():
    with pytest.raises(ValidationError) as info:
        _Outer.model_validate({"items": [{"n": 1}, {"n": "x"}]})
    err = first_error(info.value)
    assert err["loc"] == ("items", 1, "n") and param_path(err["loc"]) == "items[1].n"
    # a union: the branch whose shape matched but whose bound failed comes first when asked
    with pytest.raises(ValidationError) as info:
        _Bounded.model_validate({"stop": ["a", "b"]})
    assert first_error(info.value)["type"] == "string_type"
    assert first_error(info.value, prefer_bounds=True)["type"] == "too_long"

    class NoErrors:
        def errors(self):
            return []

    assert first_error(NoErrors()) == {}


def _tone_manifest() -> dict:
    return json.loads((bundled_packs_dir() / "smollm2-tone" / MANIFEST_FILE).read_text())


def test_steering_spec_and_pack_manifest_write_paths_alike():
    """An index inside a list field inside a named list entry: the steering spec's param and
    the manifest's message name it the same way (``name[i]``, dots between names)."""
    with pytest.raises(SteeringError) as spec_error:
        SteeringSpec.parse({"monitors": [{"feature": "a", "above": 1.0}, {"feature": "b", "above": "x"}]})
    assert spec_error.value.param == "steering.monitors[1].above" == param_path(("monitors", 1, "above"), "steering")

    m = _tone_manifest()
    m["features"][0]["calibration"]["strength_range"] = [-1.5, "x"]
    with pytest.raises(PackError) as pack_error:
        parse_manifest(copy.deepcopy(m), "folder")
    assert "feature 'formality': calibration.strength_range[1] 'x' is invalid" in str(pack_error.value)

    # the same relative location, both ways
    loc = ("calibration", "strength_range", 1)
    assert param_path(loc) == "calibration.strength_range[1]"
    assert param_path(loc, "steering") == "steering.calibration.strength_range[1]"


def test_a_manifest_entry_without_a_name_is_named_by_its_index():
    m = _tone_manifest()
    m["features"][1]["name"] = 7
    with pytest.raises(PackError, match=r"features\[1\]: name 7 is invalid"):
        parse_manifest(m, "folder")
