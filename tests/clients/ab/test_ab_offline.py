"""``steer ab run``'s numbers from hand-made outputs (no server): means, CIs, the paired t-test."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from clients.ab.offline import Output, pick_scorers, summarize_offline
from server.stats import mean_ci, paired_t

VARIANTS = [{"name": "control", "control": True}, {"name": "loud", "steering": {"features": {"x": 1.0}}}]


def _out(variant: str, prompt: str, index: int, score: float) -> Output:
    return Output(variant=variant, prompt_id=prompt, index=index, seed=0, text="t", tokens=4,
                  finish_reason="length", latency_s=0.5, scores={"s": score})


def test_summary_pairs_by_prompt_against_the_control():
    control = {"a": [1.0, 2.0], "b": [2.0], "c": [4.0]}
    loud = {"a": [3.0], "b": [3.0, 5.0], "c": [4.5]}
    outputs = [_out("control", p, i, x) for p, xs in control.items() for i, x in enumerate(xs)]
    outputs += [_out("loud", p, i, x) for p, xs in loud.items() for i, x in enumerate(xs)]
    c, v = summarize_offline(VARIANTS, outputs, ["s"])
    assert (c["n"], v["n"]) == (4, 4) and c["mean_tokens"] == 4.0 and v["mean_latency_s"] == 0.5
    assert "vs_control" not in c["scores"]["s"]
    assert c["scores"]["s"]["mean"] == pytest.approx(9 / 4)
    assert (c["scores"]["s"]["mean"], *c["scores"]["s"]["ci95"]) == mean_ci([1.0, 2.0, 2.0, 4.0])
    vs = v["scores"]["s"]["vs_control"]
    a, b = [3.0, 4.0, 4.5], [1.5, 2.0, 4.0]  # per-prompt means
    assert vs["diff"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / 3)
    assert vs["p_value"] == pytest.approx(sps.ttest_rel(a, b).pvalue)


def test_paired_t_edges():
    assert paired_t({}, {"a": [1.0]}) == {"diff": None, "p_value": None}
    assert paired_t({"a": [2.0]}, {"a": [1.0]}) == {"diff": 1.0, "p_value": None}  # one prompt: no test
    # Every difference 0: the t statistic is 0/0, so no p (scipy's warning is silenced).
    assert paired_t({"a": [2.0], "b": [3.0]}, {"a": [2.0], "b": [3.0]}) == {"diff": 0.0, "p_value": None}


def test_a_nan_score_stays_nan_in_the_offline_mean():
    """Unlike steer eval, the offline run does not drop non-finite scores (its behaviour before the
    statistics moved to server.stats)."""
    outputs = [_out("control", "a", 0, float("nan")), _out("control", "b", 0, 1.0),
               _out("loud", "a", 0, 1.0), _out("loud", "b", 0, 2.0)]
    c, _ = summarize_offline(VARIANTS, outputs, ["s"])
    assert math.isnan(c["scores"]["s"]["mean"])


def test_pick_scorers():
    assert pick_scorers("pirate, verbosity") == ["pirate", "verbosity"]
    assert "positivity" in pick_scorers(None)
    with pytest.raises(ValueError, match="nope"):
        pick_scorers("pirate,nope")
