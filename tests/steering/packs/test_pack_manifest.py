"""The typed manifest: what it accepts (every bundled and generated pack.json, unchanged on a
round trip) and how it refuses (a PackError naming the pack and the field)."""

from __future__ import annotations

import copy
import json
from typing import get_args

import numpy as np
import pytest

from steering.features import KINDS, MODES
from steering.packs import MANIFEST_FILE, PackError, PackManifest, PackWriter, bundled_packs_dir, load_pack
from steering.packs.format import check_fingerprint
from steering.packs.manifest import FeatureEntry, parse_manifest


@pytest.fixture
def manifest(pack_factory) -> dict:
    """A generated manifest (two direction features, one SAE with a named latent)."""
    return json.loads((pack_factory(with_sae=True) / MANIFEST_FILE).read_text())


def _refused(m: dict, match: str) -> PackError:
    with pytest.raises(PackError, match=match) as e:
        parse_manifest(m, "folder")
    return e.value


@pytest.mark.parametrize("pack", ["smollm2-tone", "smollm2-sae-l12", "qwen2.5-0.5b-tone"])
def test_bundled_manifest_round_trips(pack):
    raw = json.loads((bundled_packs_dir() / pack / MANIFEST_FILE).read_text())
    m = parse_manifest(raw, pack)
    assert isinstance(m, PackManifest) and m.name == pack
    assert m.model_dump(exclude_unset=True) == raw  # extras kept, nothing added


def test_generated_manifest_round_trips(manifest):
    m = parse_manifest(manifest, "x")
    assert m.model_dump(exclude_unset=True) == manifest
    assert m.feature("bridge").source.latent == 3 and m.sae("L2").metrics == {"fvu": 0.2}


def test_kinds_and_modes_come_from_features():
    assert get_args(FeatureEntry.model_fields["kind"].annotation) == KINDS
    assert get_args(FeatureEntry.model_fields["default_mode"].annotation) == MODES


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["features"][0]["calibration"].update(scale=float("nan")),
     r"feature 'formality': calibration.scale nan is invalid \(input should be a finite number\)"),
    (lambda m: m["features"][0]["calibration"].update(scale=0.0), r"calibration.scale 0.0 .*greater than 0"),
    (lambda m: m["features"][1].update(kind="lora"), r"feature 'humor': kind 'lora' is invalid"),
    (lambda m: m["features"][1].update(default_mode="steer"), r"feature 'humor': default_mode 'steer'"),
    (lambda m: m["features"][0].pop("layer"), r"feature 'formality' lacks the required field 'layer'"),
    (lambda m: m["features"][0].update(layer=True), r"feature 'formality': layer True is invalid"),
    (lambda m: m["features"][0].update(bias="0.5"), r"feature 'formality': bias '0.5' is invalid"),
    (lambda m: m["features"][0].update(site="blocks.1.hook_mlp_out"), r"site must be 'blocks.1.hook_resid_post'"),
    (lambda m: m["features"][0].update(source={"sae": "L2", "latent": 3, "note": 1}), r"unknown field 'source.note'"),
    (lambda m: m["model"]["fingerprint"].pop("sha256"), r"pack.json lacks the required field 'model.fingerprint.sha256'"),
    (lambda m: m["files"]["features.safetensors"].pop("sha256"), r"files\['features.safetensors'\] lacks the required field 'sha256'"),
    (lambda m: m.update(sae=m.pop("saes")), r"pack.json has an unknown field 'sae'"),
    (lambda m: m["saes"][0].update(activation="gelu"), r"SAE 'L2': activation 'gelu' is invalid"),
    (lambda m: m["saes"][0].update(d_in=8), r"SAE 'L2': d_in 8 is not the model's hidden size 16"),
    (lambda m: m["saes"].append(dict(m["saes"][0])), r"duplicate SAE id 'L2'"),
    (lambda m: m["saes"][0].update(file="sae_other.safetensors"), r"file sae_other.safetensors is not listed"),
    (lambda m: m["files"].pop("features.safetensors"), r"features.safetensors .* not listed in files"),
])
def test_refusals_name_pack_and_field(manifest, edit, match):
    edit(manifest)
    e = _refused(manifest, match)
    assert e.pack == "tone"


def test_unusable_name_falls_back_to_the_folder(manifest):
    assert _refused({}, "pack.json lacks the required field 'schema_version'").pack == "folder"
    manifest["name"] = "a b"
    assert _refused(manifest, r"pack name must match").pack == "folder"
    assert _refused([], "must be a JSON object").pack == "folder"


def test_other_schema_fails_on_its_version_first():
    _refused({"schema_version": 2, "name": "future", "shape": "different"}, "unsupported schema_version 2")


def test_open_records_keep_extras(manifest):
    m = copy.deepcopy(manifest)
    m["features"][0]["my_builder"] = {"note": 1}
    m["saes"][0]["concept_matches"] = {}
    m["provenance"]["anything"] = [1, 2]
    back = parse_manifest(m, "x").model_dump(exclude_unset=True)
    assert back["features"][0]["my_builder"] == {"note": 1} and back["provenance"]["anything"] == [1, 2]


def test_load_pack_reports_manifest_errors(pack_factory):
    p = pack_factory()
    m = json.loads((p / MANIFEST_FILE).read_text())
    m["features"][0]["calibration"]["scale"] = float("inf")
    (p / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(PackError, match=r"'tone'.*feature 'formality': calibration.scale inf"):
        load_pack(p)


def test_writer_validates_as_it_goes(fake_model, tmp_path):
    from steering.packs import model_fingerprint

    w = PackWriter("x", "1", model_fingerprint(fake_model))
    with pytest.raises(PackError, match=r"'x'.*feature 'a': kind 'lora'"):
        w.add_feature("a", 1, "lora", np.ones(16), {"scale": 1.0})
    with pytest.raises(PackError, match=r"feature 'a': calibration.scale nan"):
        w.add_feature("a", 1, "direction", np.ones(16), {"scale": np.float32("nan")})
    with pytest.raises(PackError, match=r"lacks the required field 'calibration.scale'"):
        w.add_feature("a", 1, "direction", np.ones(16), {"p99": 1.0})
    with pytest.raises(PackError, match="pack name must match"):
        PackWriter("no/slash", "1", model_fingerprint(fake_model))
    w.add_feature("deep", 9, "direction", np.ones(16), {"scale": np.float32(2.0)})  # numpy scalars are fine
    with pytest.raises(PackError, match=r"feature 'deep' layer 9 outside \[0, 4\)"):
        w.write(tmp_path / "x")  # the whole manifest is checked before it is written


def test_check_fingerprint(manifest):
    fp = parse_manifest(manifest, "x").model.fingerprint
    check_fingerprint("x", fp, fp.model_dump())
    with pytest.raises(PackError, match="vocab_size 50 in the pack, 51 in the model"):
        check_fingerprint("x", fp, {**fp.model_dump(), "vocab_size": 51})
    check_fingerprint("x", fp, {**fp.model_dump(), "sha256": "other"}, strict=False)
    with pytest.raises(PackError, match="weight fingerprint"):
        check_fingerprint("x", fp, {**fp.model_dump(), "sha256": "other"})
