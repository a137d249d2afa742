"""``steer pack choose``: each feature taken from the calibrated candidate with the best harmonic
mean at strength 1, its tensors and records copied unchanged, the choice recorded; bad candidates
refused."""

from __future__ import annotations

import json
from argparse import Namespace

import numpy as np
import pytest

from clients.eval.choose import MIN_GAIN, RULE, choose, choose_cmd
from steering.packs import FEATURES_FILE, MANIFEST_FILE, PackError, PackWriter, load_pack
from steering.packs.tensors import load_tensors

D, LAYERS = 16, 4
FP = {"hidden_size": D, "num_layers": LAYERS, "vocab_size": 50, "tensors": ["norm.weight"], "sha256": "ab" * 32}


def chosen(harmonic, dose=0.5, status="weak", ppl=1.4):
    """A calibration record whose strength-1 point has this harmonic mean (None: not recorded)."""
    point = {"dose": dose, "status": status, "fluent": True, "diff": 1.0, "p": 0.001, "ppl_ratio": ppl,
             "strength": dose}
    if harmonic is not None:
        point.update(concept=harmonic, fluency=1.0, harmonic=harmonic)
    stronger = {**point, "dose": 2 * dose, "ppl_ratio": 2.5, "harmonic": None if harmonic is None else 0.9}
    return {"scale": 2.0 * dose, "norm_scale": 2.0, "method": "effect",
            "effect": {"scorer": "x", "chosen": point, "curve": [point, stronger], "run": {}}}


def candidate(tmp_path, label, features, fp=FP, seed=0):
    """A pack named ``label`` with ``features``: name → (kind, harmonic), kinds ``direction``,
    ``multi`` (a two-layer direction) and ``lowrank`` (rank 2 on layers 1, 2)."""
    rng = np.random.default_rng(seed)
    w = PackWriter(label, "1.0.0", fp, model_id="fake/model", description=f"{label} pack",
                   provenance={"builder": "tests"}, calibration={"unit": "dose"})
    for name, (kind, h) in features.items():
        cal = chosen(h)
        if kind == "direction":
            w.add_feature(name, 1, "direction", rng.standard_normal(D), cal,
                          extra={"contrastive": {"method": "mean_diff"}})
        elif kind == "multi":
            dirs = rng.standard_normal((2, D))
            w.add_feature(name, 1, "direction", dirs[0], cal, layers=[1, 3], directions=dirs,
                          extra={"trained": {"method": "vector"}})
        else:
            R = np.stack([np.linalg.qr(rng.standard_normal((D, 2)))[0].T for _ in range(2)])
            lr = {"R": R, "W": rng.standard_normal((2, 2, D)), "b": rng.standard_normal((2, 2))}
            w.add_feature(name, 1, "lowrank", R[0, 0], cal, layers=[1, 2], lowrank=lr,
                          extra={"trained": {"method": "lowrank"}})
    return w.write(tmp_path / label)


def test_each_feature_comes_from_its_best_candidate_unchanged(tmp_path):
    md = candidate(tmp_path, "mean_diff", {"formality": ("direction", 0.8), "golden_gate": ("direction", 0.1),
                                           "pirate": ("direction", 0.5), "humor": ("direction", None),
                                           "french": ("direction", 0.30)})
    vec = candidate(tmp_path, "vector", {"golden_gate": ("multi", 0.6), "pirate": ("multi", 0.5),
                                         "formality": ("multi", 0.3), "humor": ("multi", 0.2),
                                         "french": ("multi", 0.34)}, seed=1)
    lr = candidate(tmp_path, "lowrank", {"golden_gate": ("lowrank", 0.7), "code": ("lowrank", None)}, seed=2)
    writer, choices = choose([("mean_diff", md), ("vector", vec), ("lowrank", lr)], name="tone", version="2.0.0",
                             note="methods chosen")
    out = writer.write(tmp_path / "out")
    assert {f: c["method"] for f, c in choices.items()} == {
        "formality": "mean_diff",  # 0.8 beats 0.3
        "golden_gate": "lowrank",  # 0.7 beats 0.6 and 0.1
        "pirate": "mean_diff",     # a tie keeps the earlier candidate
        "french": "mean_diff",     # so does a gain of no more than MIN_GAIN (0.34 vs 0.30)
        "humor": "vector",         # mean_diff recorded no harmonic mean: it does not compete
        "code": "lowrank",         # measured by nobody: kept from the only candidate that has it
    }
    gg = choices["golden_gate"]
    assert gg["rule"] == RULE and gg["built_by"] == "lowrank" and gg["min_gain"] == MIN_GAIN
    assert {k: v["harmonic"] for k, v in gg["candidates"].items()} == {"mean_diff": 0.1, "vector": 0.6, "lowrank": 0.7}
    assert gg["candidates"]["vector"]["built_by"] == "vector" and gg["candidates"]["vector"]["dose"] == 0.5
    # The curve's best harmonic mean is recorded, but strength 1 (the calibrated dose) decides.
    assert (gg["candidates"]["vector"]["best_dose"], gg["candidates"]["vector"]["best_harmonic"]) == (1.0, 0.9)
    assert choices["humor"]["candidates"]["mean_diff"] == {"built_by": "mean_diff", "harmonic": None}
    assert choices["code"]["rule"].startswith("not measured")

    pack = load_pack(out)  # sha256-checked, shapes checked
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["name"] == "tone" and m["version"] == "2.0.0" and m["calibration"] == {"unit": "dose"}
    # The first candidate's provenance, plus the choice.
    prov = m["provenance"]
    assert prov["builder"] == "tests" and prov["method"] == "chosen per feature" and prov["note"] == "methods chosen"
    assert list(prov["choice"]["candidates"]) == ["mean_diff", "vector", "lowrank"]
    assert prov["choice"]["candidates"]["vector"]["files"][FEATURES_FILE] == \
        json.loads((vec / MANIFEST_FILE).read_text())["files"][FEATURES_FILE]["sha256"]
    assert [f["name"] for f in m["features"]] == ["formality", "golden_gate", "pirate", "humor", "french", "code"]
    assert pack.manifest.feature("golden_gate").kind == "lowrank" and pack.manifest.feature("humor").layers == [1, 3]
    # Tensors and entries byte for byte from the winner; only calibration.choice is added.
    got = load_tensors(out / FEATURES_FILE)
    for fname, src in (("golden_gate", lr), ("humor", vec), ("formality", md)):
        theirs = load_tensors(src / FEATURES_FILE)
        mine = {k: v for k, v in got.items() if k.startswith(fname + ".")}
        assert set(mine) == {k for k in theirs if k.startswith(fname + ".")}
        for k, v in mine.items():
            assert np.array_equal(v, theirs[k])
        entry = next(f for f in m["features"] if f["name"] == fname)
        source = next(f for f in json.loads((src / MANIFEST_FILE).read_text())["features"] if f["name"] == fname)
        assert entry["calibration"].pop("choice") == choices[fname]
        assert entry == source


def test_bad_candidates_are_refused(tmp_path):
    a = candidate(tmp_path, "a", {"x": ("direction", 0.5)})
    other = candidate(tmp_path, "b", {"x": ("direction", 0.5)}, fp={**FP, "sha256": "cd" * 32})
    with pytest.raises(PackError, match="another model"):
        choose([("a", a), ("b", other)])
    with pytest.raises(PackError, match="must differ"):
        choose([("a", a), ("a", a)])
    with pytest.raises(PackError, match="at least one"):
        choose([])
    # A modified tensor file fails its sha256 before anything is merged.
    bad = candidate(tmp_path, "c", {"x": ("direction", 0.9)})
    raw = bytearray((bad / FEATURES_FILE).read_bytes())
    raw[-1] ^= 1
    (bad / FEATURES_FILE).write_bytes(bytes(raw))
    with pytest.raises(PackError, match="sha256 mismatch"):
        choose([("a", a), ("c", bad)])


def test_the_command_writes_the_pack_and_prints_the_table(tmp_path, capsys):
    md = candidate(tmp_path, "mean_diff", {"golden_gate": ("direction", 0.1)})
    vec = candidate(tmp_path, "vector", {"golden_gate": ("multi", 0.6)}, seed=1)
    args = Namespace(out=str(tmp_path / "tone"), candidate=[("mean_diff", md), ("vector", vec)], name=None,
                     version="1.2.0", description=None, note=None, min_gain=MIN_GAIN)
    assert choose_cmd(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("golden_gate"))
    assert line.split()[-1] == "vector" and "0.10 @0.5 (1.40×)" in line and "0.60 @0.5 (1.40×)" in line
    assert load_pack(tmp_path / "tone").manifest.version == "1.2.0"
    # The output may not be a candidate (it would overwrite what it reads).
    assert choose_cmd(Namespace(**{**vars(args), "out": str(vec)})) == 1
    assert "one of the candidates" in capsys.readouterr().err
