"""Summary and report from hand-made samples (no engine): the numbers, the bar, the files, the CLI parsing."""

from __future__ import annotations

import copy
import json

import pytest

from clients.cli import build_parser
from clients.eval import report
from clients.eval.cli import parse_features, parse_strengths
from clients.eval.harness import EvalConfig, EvalError, Prompt, Sample, load_prompts, steering_body
from clients.eval.scorers import SCORERS
from clients.eval.summary import summarize_features

PROMPTS = [Prompt(f"p{i}", f"prompt {i}") for i in range(12)]


def _sample(feature, strength, i, text, ppl):
    return Sample(feature=feature, strength=strength, max_tokens=64, prompt_id=f"p{i}", index=0, text=text,
                  tokens=10, finish_reason="length", scores={n: s(text) for n, s in SCORERS.items()},
                  perplexity=ppl)


@pytest.fixture(scope="module")
def result():
    cfg = EvalConfig(features={"golden_gate": "golden_gate"}, strengths=[-1.0, 0.0, 1.0, 2.0], prompts=PROMPTS)
    samples = []
    for i in range(12):
        samples.append(_sample(None, 0.0, i, "We went to the park.", 5.0))
        samples.append(_sample("golden_gate", -1.0, i, "We went to the park.", 5.0))
        samples.append(_sample("golden_gate", 1.0, i, "The Golden Gate Bridge." if i < 10 else "A park.", 8.0))
        samples.append(_sample("golden_gate", 2.0, i, "The Golden Gate Bridge, San Francisco.", 20.0))
    summ = summarize_features(cfg, samples, {"golden_gate": {"layer": 10, "pack": "smollm2-tone", "default_mode": "add"}})
    return {"config": cfg.public(), "features": summ}


def test_summary_numbers(result):
    f = result["features"]["golden_gate"]
    one = f["strengths"]["1"]
    assert one["score_mean"] == pytest.approx(10 / 12)
    assert one["vs_baseline"]["diff"] == pytest.approx(10 / 12)
    assert one["vs_baseline"]["p_wilcoxon"] == pytest.approx(2 / 2 ** 10)  # 10 positive ties, 2 zeros dropped
    assert one["ppl_ratio"] == pytest.approx(8 / 5)
    assert f["strengths"]["2"]["ppl_ratio"] == pytest.approx(4.0)
    # means −1: 0, 0: 0, 1: 0.83, 2: 1 → ρ with a tie at the bottom.
    assert f["spearman"]["over_means"]["rho"] == pytest.approx(0.9486832980505138)
    assert f["bar"] == {"direction_p<0.01": True, "spearman>0.8": True, "ppl_ratio<=2": True, "pass": True}
    assert f["layer"] == 10 and f["mode"] == "add" and f["max_tokens"] == 64
    assert f["examples"]["1"] == "The Golden Gate Bridge."
    assert f["max_fluent"] == {"strength": 1.0, "ppl_ratio": pytest.approx(1.6), "diff": pytest.approx(10 / 12),
                               "p_wilcoxon": pytest.approx(2 / 2 ** 10)}


def test_report_files(result, tmp_path):
    paths = report.write(result, tmp_path)
    assert json.loads(paths["json"].read_text())["features"]["golden_gate"]["bar"]["pass"] is True
    md = paths["md"].read_text()
    assert "| golden_gate | 10 | golden_gate (share of outputs) | 0.833" in md
    assert "**pass**" in md and "[golden_gate](golden_gate.png)" in md
    assert "| 1 (0.833, p 0.002) |" in md  # fluent up to strength 1 (2 has 4× the perplexity)

    png = paths["golden_gate"].read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) < 80_000


def test_weak_feature_names_the_failed_checks(result):
    result = copy.deepcopy(result)
    f = result["features"]["golden_gate"]
    f["bar"] = {"direction_p<0.01": True, "spearman>0.8": False, "ppl_ratio<=2": False, "pass": False}
    assert "weak: spearman>0.8, ppl_ratio<=2" in report.markdown(result)


def test_cli_parsing():
    assert parse_strengths("1,-1,0,0.5") == [-1.0, 0.0, 0.5, 1.0]
    with pytest.raises(EvalError, match="include 0"):
        parse_strengths("0.5,1")
    with pytest.raises(EvalError):
        parse_strengths("a,b")
    assert parse_features("pirate, L12:1888=french") == {"pirate": None, "L12:1888": "french"}
    with pytest.raises(EvalError, match="unknown scorer"):
        parse_features("pirate=nope")
    args = build_parser().parse_args(["eval", "--features", "positivity", "--strengths", "0,1", "--url", "http://x"])
    assert args.func.__name__ == "eval_cmd" and args.url == "http://x" and args.samples == 1


def test_steering_body_and_prompt_set():
    assert steering_body("pirate", 0.0, None) is None
    assert steering_body("pirate", 1.0, None) == {"features": {"pirate": 1.0}}
    assert steering_body("pirate", -0.5, "clamp") == {"features": {"pirate": {"strength": -0.5, "mode": "clamp"}}}
    prompts = load_prompts()
    assert len(prompts) >= 24 and len({p.prompt for p in prompts}) == len(prompts)
    # Neutral: the shipped prompts trigger none of the topic / refusal scorers.
    for p in prompts:
        for name in ("golden_gate", "pirate", "french", "refusal", "code"):
            assert SCORERS[name](p.prompt) == 0.0, (name, p.prompt)
