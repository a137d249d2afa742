"""Summary and report from hand-made samples (no engine): the numbers, the bar, the files, the CLI parsing."""

from __future__ import annotations

import copy
import json

import pytest

from clients.cli import build_parser
from clients.eval import report
from clients.eval.cli import parse_features, parse_strengths
from clients.eval.harness import DEFAULT_PROMPTS, EvalConfig, EvalError, Prompt, Sample, load_prompts, steering_body
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
    summ = summarize_features(cfg, samples, {"golden_gate": {"layer": 10, "pack": "smollm2-tone", "default_mode": "add",
                                                              "calibration": {"scale": 25.8, "norm_scale": 34.4,
                                                                              "method": "effect"}}})
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
    assert f["calibration"] == {"scale": 25.8, "method": "effect", "dose": pytest.approx(0.75)}
    assert f["examples"]["1"] == "The Golden Gate Bridge."
    assert f["max_fluent"] == {"strength": 1.0, "ppl_ratio": pytest.approx(1.6), "diff": pytest.approx(10 / 12),
                               "p_wilcoxon": pytest.approx(2 / 2 ** 10)}


def test_report_files(result, tmp_path):
    paths = report.write(result, tmp_path)
    assert json.loads(paths["json"].read_text())["features"]["golden_gate"]["bar"]["pass"] is True
    md = paths["md"].read_text()
    assert "| golden_gate | 10 | 0.75 (effect) | golden_gate (share of outputs) | 0.833" in md
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
    # Neutral: the shipped prompts (eval, calibration, held-out) trigger none of the topic / refusal scorers.
    for name in ("calibration.jsonl", "heldout.jsonl"):
        prompts += load_prompts(DEFAULT_PROMPTS.with_name(name))
    for p in prompts:
        for name in ("golden_gate", "pirate", "french", "refusal", "code"):
            assert SCORERS[name](p.prompt) == 0.0, (name, p.prompt)


def _cond_sample(condition, strength, i, text, ppl, feature="golden_gate"):
    s = _sample(None if (strength == 0 and condition == "steer") else feature, strength, i, text, ppl)
    s.condition = condition
    return s


def test_prompting_baseline_compares_the_three_conditions():
    """steer wins on 10 of 12 prompts at 1.6× perplexity; the prompt wins on 6, fluent; both wins on
    12 at 3× perplexity on half the outputs: H = 2cf/(c+f) with the numbers spelled out."""
    cfg = EvalConfig(features={"golden_gate": "golden_gate"}, strengths=[0.0, 1.0], prompts=PROMPTS,
                     baseline="prompt")
    gg, park = "The Golden Gate Bridge.", "We went to the park."
    samples = []
    for i in range(12):
        samples.append(_cond_sample("steer", 0.0, i, park, 5.0))
        samples.append(_cond_sample("steer", 1.0, i, gg if i < 10 else park, 8.0))
        samples.append(_cond_sample("prompt", 0.0, i, gg if i < 6 else park, 5.0))
        samples.append(_cond_sample("both", 1.0, i, gg, 15.0 if i % 2 else 9.0))
    summ = summarize_features(cfg, samples, {"golden_gate": {}})["golden_gate"]
    assert summ["calibration"] == {"scale": None, "method": "norm", "dose": 1.0}  # no catalog record: the norm unit
    # The prompted samples stay out of the dose-response: strength 0 is the unsteered outputs only.
    assert summ["strengths"]["0"]["score_mean"] == 0.0 and summ["strengths"]["1"]["score_mean"] == pytest.approx(10 / 12)
    cmp = summ["prompting"]
    assert cmp["instruction"] == SCORERS["golden_gate"].instruction and cmp["strength"] == 1.0
    steer, prompt, both = (cmp["conditions"][c] for c in ("steer", "prompt", "both"))
    assert steer["concept"] == pytest.approx(10 / 12) and steer["fluency"] == 1.0
    assert steer["harmonic"] == pytest.approx(2 * (10 / 12) / (10 / 12 + 1))
    assert steer["ppl_ratio"] == pytest.approx(1.6) and steer["vs_baseline"]["diff"] == pytest.approx(10 / 12)
    assert prompt["concept"] == 0.5 and prompt["fluency"] == 1.0 and prompt["harmonic"] == pytest.approx(2 / 3)
    assert both["concept"] == 1.0 and both["fluency"] == 0.5 and both["harmonic"] == pytest.approx(2 / 3)
    assert both["ppl_ratio"] == pytest.approx(12 / 5)  # median of 9 and 15 over 5
    assert cmp["best"] == "steer"
    # Each strength row carries the same trade-off (what steer pack calibrate's curves record).
    at_one = summ["strengths"]["1"]
    assert {k: at_one[k] for k in ("concept", "fluency", "harmonic")} == \
        {k: steer[k] for k in ("concept", "fluency", "harmonic")}
    assert "harmonic" not in summ["strengths"]["0"]
    md = report.markdown({"config": cfg.public(), "features": {"golden_gate": summ}})
    assert "| golden_gate | steer **best** | 0.833 (0.002) | 1.6 | 0.83 | 1 | 0.91 |" in md
    assert "| golden_gate | prompt | 0.5 (0.031) | 1 | 0.5 | 1 | 0.67 |" in md


def test_prompting_baseline_is_checked():
    with pytest.raises(EvalError, match="must be one of the strengths"):
        EvalConfig(features={"golden_gate": "golden_gate"}, strengths=[0.0, 0.5], prompts=PROMPTS,
                   baseline="prompt")
    with pytest.raises(EvalError, match="no prompting instruction"):
        EvalConfig(features={"x": "repetition"}, strengths=[0.0, 1.0], prompts=PROMPTS, baseline="prompt")
    with pytest.raises(EvalError, match="baseline must be"):
        EvalConfig(features={}, strengths=[0.0, 1.0], prompts=PROMPTS, baseline="few-shot")
    args = build_parser().parse_args(["eval", "--baseline", "prompt", "--baseline-strength", "0.5"])
    assert args.baseline == "prompt" and args.baseline_strength == 0.5
    assert all(s.instruction for n, s in SCORERS.items() if n != "repetition")
