"""``steer pack calibrate``: the choice of strength 1 from a measured curve, the manifest it writes,
and one small real run against the session's server."""

from __future__ import annotations

import asyncio
import json
import shutil
from argparse import Namespace

import pytest

from clients.eval.calibrate import (CALIBRATION_PROMPTS, EFFECT, NONE, WEAK, CalibrationConfig, apply, choose,
                                    pack_features)
from clients.eval.calibrate_cli import calibrate_cmd, run
from clients.eval.gendata import TRAIN_PROMPTS
from clients.eval.harness import DEFAULT_PROMPTS, EvalError, load_prompts
from steering.packs import bundled_packs_dir, load_pack
from steering.packs.manifest import DOSE_FRACTION, NO_EFFECT_TAG, PackError, norm_unit, read_manifest

CFG = CalibrationConfig(doses=[0.25, 0.5, 1.0], max_ppl_ratio=1.5, alpha=0.01)


def row(dose, diff, p, ppl):
    return {"dose": dose, "diff": diff, "p": p, "ppl_ratio": ppl}


def test_the_largest_fluent_dose_with_a_clear_effect_is_chosen():
    curve = [row(0.25, 0.1, 0.2, 1.0), row(0.5, 0.5, 0.003, 1.2), row(1.0, 0.9, 1e-5, 1.4)]
    assert choose(curve, CFG) == {"dose": 1.0, "fluent": True, "status": EFFECT}
    # The fluent doses stop at the first one over budget, even if a later one is back under it.
    curve = [row(0.25, 0.1, 0.2, 1.0), row(0.5, 0.5, 0.003, 1.6), row(1.0, 0.9, 1e-5, 1.4)]
    assert choose(curve, CFG) == {"dose": 0.25, "fluent": True, "status": WEAK}


def test_weak_none_and_not_fluent():
    # Clear only where fluency is gone: weak, at the largest fluent dose.
    assert choose([row(0.25, 0.0, 1.0, 1.1), row(0.5, 0.2, 0.002, 2.5)], CFG)["status"] == WEAK
    # A clear fall is not an effect; p exactly alpha is not below it.
    assert choose([row(0.25, -0.4, 1e-4, 1.1), row(0.5, 0.3, 0.01, 1.2)], CFG) == \
        {"dose": 0.5, "fluent": True, "status": NONE}
    # Nothing fluent: the smallest dose, marked.
    assert choose([row(0.25, 0.5, 1e-3, 1.7), row(0.5, 1, 1e-4, 3.0)], CFG) == \
        {"dose": 0.25, "fluent": False, "status": EFFECT}
    # No perplexity (failed scoring) counts as not fluent.
    assert choose([row(0.25, 0.5, 1e-3, None)], CFG)["fluent"] is False


def test_config_is_checked():
    assert CalibrationConfig(doses=[1, 0.5, 1]).doses == [0.5, 1]
    for bad in ([], [0.0], [-1.0], [float("nan")]):
        with pytest.raises(EvalError):
            CalibrationConfig(doses=bad)
    with pytest.raises(EvalError):
        CalibrationConfig(max_ppl_ratio=1.0)


def _pack() -> dict:
    """The bundled tone manifest as a build writes it (the norm unit, no calibration record)."""
    pack = json.loads((bundled_packs_dir() / "smollm2-tone" / "pack.json").read_text())
    for f in pack["features"]:
        cal = f["calibration"]
        cal["scale"] = DOSE_FRACTION * cal["resid_norm_p50"]
        for k in ("method", "norm_scale", "effect"):
            cal.pop(k, None)
        f["tags"] = [t for t in f["tags"] if t != NO_EFFECT_TAG]
        f.pop("evidence", None)
    return pack


def _curve(rows):
    return [{"dose": 0.0, "strength": 0.0, "score": 0.0, "diff": 0.0, "p": None, "ppl_ratio": 1.0,
             "ppl_median": 5.0}] + [{**r, "strength": r["dose"], "score": r["diff"], "ppl_median": 5.0}
                                    for r in rows]


def test_apply_sets_scale_curve_and_evidence_and_keeps_the_rest():
    pack = _pack()
    before = {f["name"]: f for f in pack["features"]}
    u = DOSE_FRACTION * before["pirate"]["calibration"]["resid_norm_p50"]
    curves = {"pirate": _curve([row(0.25, 1.0, 1e-4, 1.1), row(0.5, 3.0, 1e-6, 1.4), row(1.0, 9.0, 1e-7, 4.9)]),
              "humor": _curve([row(0.25, 0.0, 1.0, 1.0), row(0.5, 0.0, 1.0, 1.3), row(1.0, 0.2, 0.1, 2.2)])}
    out = apply(pack, curves, {"pirate": "pirate", "humor": "humor"}, CFG, {"prompts": "calibration.jsonl"})
    after = {f["name"]: f for f in out["features"]}
    pc, hc = after["pirate"]["calibration"], after["humor"]["calibration"]
    assert pc["scale"] == pytest.approx(0.5 * u) and pc["norm_scale"] == pytest.approx(u)
    assert pc["method"] == "effect" and pc["effect"]["chosen"]["dose"] == 0.5
    assert pc["effect"]["chosen"]["p"] == 1e-6 and len(pc["effect"]["curve"]) == 4
    assert after["pirate"]["evidence"]["steering"]["status"] == EFFECT
    # No effect at any dose: the norm unit stays, and the evidence says so.
    assert hc["scale"] == pytest.approx(u) and hc["method"] == "norm"
    assert after["humor"]["evidence"]["steering"]["status"] == NONE
    assert "no measurable effect" in after["humor"]["evidence"]["steering"]["note"]
    assert after["humor"]["tags"] == [*before["humor"]["tags"], NO_EFFECT_TAG]
    assert after["pirate"]["tags"] == before["pirate"]["tags"]
    # A later calibration that finds an effect drops the tag.
    again = apply(out, {"humor": curves["pirate"]}, {"humor": "humor"}, CFG, {})
    assert next(f for f in again["features"] if f["name"] == "humor")["tags"] == before["humor"]["tags"]
    # Everything else is untouched (the input too), and the pack record is added.
    assert after["formality"] == before["formality"]
    assert pack["features"][0] == before[pack["features"][0]["name"]] and "method" not in before["pirate"]["calibration"]
    assert pc["effect"]["run"] == {"prompts": "calibration.jsonl"} and out["calibration"] == pack["calibration"]


def test_recalibration_measures_in_norm_units():
    pack = _pack()
    f = next(x for x in pack["features"] if x["name"] == "pirate")
    u = norm_unit(f["calibration"])
    out = apply(pack, {"pirate": _curve([row(0.5, 3.0, 1e-6, 1.4)])}, {"pirate": "pirate"}, CFG, {})
    g = next(x for x in out["features"] if x["name"] == "pirate")
    # After calibration the unit is read from norm_scale, not from the (now smaller) scale.
    assert norm_unit(g["calibration"]) == pytest.approx(u) and g["calibration"]["scale"] == pytest.approx(0.5 * u)
    assert norm_unit({"scale": 3.0}) is None


def test_features_with_a_scorer_are_chosen_and_names_are_checked():
    pack = _pack()
    assert set(pack_features(pack)) == {f["name"] for f in pack["features"]}  # all 11 have scorers
    assert pack_features(pack, ["golden_gate"]) == {"golden_gate": "golden_gate"}
    with pytest.raises(EvalError, match="no feature nope"):
        pack_features(pack, ["pirate", "nope"])


def test_the_shipped_prompt_sets_are_disjoint():
    """Calibration, the eval's neutral set, the held-out set of the calibrated report and the
    training prompts of steer pack gen-data share no prompt."""
    sets = [{p.prompt.lower() for p in load_prompts(path)}
            for path in (CALIBRATION_PROMPTS, DEFAULT_PROMPTS, DEFAULT_PROMPTS.with_name("heldout.jsonl"),
                         TRAIN_PROMPTS)]
    assert [len(s) for s in sets] == [32, 32, 32, 96]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j], (i, j, sets[i] & sets[j])


def _args(pack_dir, **kw):
    d = dict(pack=str(pack_dir), features="pirate,french", doses="0.5,1", max_ppl_ratio=1.5, alpha=0.01,
             prompts=str(CALIBRATION_PROMPTS), limit_prompts=4, max_tokens=24, long_max_tokens=24, seed=0,
             concurrency=16, dry_run=False, url=None, api_key=None, serve_args="")
    d.update(kw)
    return Namespace(**d)


def test_a_real_calibration_writes_a_loadable_pack(server, tmp_path, capsys):
    """Two features, 4 prompts, doses 0.5 and 1 through the session's server (it serves the bundled
    pack, whose copy is calibrated here)."""
    pack_dir = tmp_path / "smollm2-tone"
    shutil.copytree(bundled_packs_dir() / "smollm2-tone", pack_dir)
    args = _args(pack_dir, url=server.url, api_key=server.api_key)
    assert calibrate_cmd(args) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["feature", "status", "dose"]
    m = read_manifest(pack_dir)
    load_pack(pack_dir)  # hashes and tensors still verify
    old = {f.name: f for f in read_manifest(bundled_packs_dir() / "smollm2-tone").features}
    for f in m.features:
        cal = f.model_dump()["calibration"]
        if f.name not in ("pirate", "french"):
            assert cal == old[f.name].model_dump()["calibration"]
            continue
        eff = cal["effect"]
        u = DOSE_FRACTION * old[f.name].calibration.resid_norm_p50
        assert [r["dose"] for r in eff["curve"]] == [0.0, 0.5, 1.0]
        # The bundled pack is calibrated already: doses are asked for in norm units again.
        assert [r["strength"] for r in eff["curve"]] == pytest.approx(
            [0.0, 0.5 * u / old[f.name].calibration.scale, u / old[f.name].calibration.scale], rel=1e-5)
        for r in eff["curve"][1:]:
            assert r["ppl_ratio"] > 0 and 0 <= r["p"] <= 1 and r["ppl_median"] > 1
        assert eff["chosen"]["dose"] in (0.5, 1.0) and f.name in table
        want = u if eff["chosen"]["status"] == NONE else eff["chosen"]["dose"] * u
        assert cal["scale"] == pytest.approx(want)
    rec = next(f for f in m.features if f.name == "pirate").calibration.effect["run"]
    assert rec["n_prompts"] == 4 and rec["doses"] == [0.5, 1.0] and len(rec["prompts_sha256"]) == 64
    assert rec["sampling"]["max_tokens"] == 24


def test_a_server_with_another_calibration_is_refused(server, tmp_path):
    pack_dir = tmp_path / "smollm2-tone"
    shutil.copytree(bundled_packs_dir() / "smollm2-tone", pack_dir)
    data = json.loads((pack_dir / "pack.json").read_text())
    data["features"][0]["calibration"]["scale"] *= 2
    (pack_dir / "pack.json").write_text(json.dumps(data))
    with pytest.raises(EvalError, match="serve this pack folder"):
        asyncio.run(run(server.url, server.api_key, pack_dir, _args(pack_dir, features=data["features"][0]["name"])))


def test_a_bad_pack_is_an_error_before_any_request(tmp_path, capsys):
    assert calibrate_cmd(_args(tmp_path / "nope", url="http://127.0.0.1:9")) == 1
    assert "no pack folder or bundled pack" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pack.json").write_text("{}")
    with pytest.raises(PackError):
        asyncio.run(run("http://127.0.0.1:9", None, tmp_path / "bad", _args(tmp_path / "bad")))


RECIPE = {"pack": {"name": "tiny-cal", "version": "0.0.1"}, "seed": 0, "layers": [6], "heldout": 0.25,
          "format": "assistant", "prompt": "Talk.", "calibration": {"corpus": "recipe"},
          "concepts": [{"name": "weather", "description": "talks about the weather", "pairs": [
              ["It is raining and the wind is cold.", "The train leaves at noon."],
              ["A thunderstorm is coming with hail.", "She bought apples at the shop."],
              ["The sun is shining and the sky is clear.", "He fixed the broken chair."],
              ["Snow fell all night and the roads are icy.", "The book has twelve chapters."]]}]}


def test_a_rebuild_calibrates_the_pack_it_wrote(tmp_path, monkeypatch):
    """``steer pack build-contrastive`` runs ``steer pack calibrate`` on its output (every default),
    unless ``--no-calibrate``."""
    import yaml

    from clients.cli import main
    from clients.eval import calibrate_cli
    from clients.eval.harness import DEFAULT_SERVE_ARGS

    calls = []
    monkeypatch.setattr(calibrate_cli, "calibrate_cmd", lambda a: calls.append(a) or 0)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    assert main(["pack", "build-contrastive", str(recipe), "--out", str(tmp_path / "a"), "-q"]) == 0
    assert [c.pack for c in calls] == [str(tmp_path / "a")]
    assert calls[0].serve_args == DEFAULT_SERVE_ARGS and calls[0].doses == "0.25,0.5,0.75,1,1.5"
    assert calls[0].prompts == str(CALIBRATION_PROMPTS) and calls[0].url is None and not calls[0].dry_run
    assert main(["pack", "build-contrastive", str(recipe), "--out", str(tmp_path / "b"), "-q", "--no-calibrate"]) == 0
    assert len(calls) == 1 and read_manifest(tmp_path / "b").features[0].calibration.method is None
