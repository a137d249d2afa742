"""``steer eval`` end to end against the session's real server: generation with fixed seeds, perplexity
under the unsteered model, statistics, and the JSON / markdown / PNG report — plus the effects the
bundled positivity and golden_gate features must have."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from clients.eval.cli import evaluate, write_all
from clients.eval.harness import Client, EvalError, Prompt, load_prompts, perplexity
from clients.eval.scorers import SCORERS
from steering.model_store import resolve_model
from transformers import AutoTokenizer

# Six of the shipped neutral prompts (none mentions a bridge, a city or a feeling).
PROMPT_IDS = ["n00", "n02", "n09", "n10", "n13", "n19"]


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    by_id = {p.id: p for p in load_prompts()}
    return [by_id[i] for i in PROMPT_IDS]


@pytest.fixture(scope="module")
def small_eval(server, prompts, tmp_path_factory):
    cfg = dict(strengths=[0.0, 1.0, 3.0], prompts=prompts, samples=1, max_tokens=40, seed=0, concurrency=16)
    result, samples = asyncio.run(evaluate(server.url, server.api_key,
                                           {"positivity": None, "golden_gate": None}, "smollm2-tone", cfg,
                                           progress=False))
    out = tmp_path_factory.mktemp("eval")
    paths = write_all(result, samples, out)
    return result, samples, paths


def test_writes_json_markdown_and_pngs(small_eval):
    result, samples, paths = small_eval
    on_disk = json.loads(paths["json"].read_text())
    assert on_disk["features"].keys() == {"positivity", "golden_gate"}
    assert on_disk["config"]["strengths"] == [0.0, 1.0, 3.0] and on_disk["config"]["prompts"] == 6
    assert on_disk["server"]["model"] == "SmolLM2-135M-Instruct"
    md = paths["md"].read_text()
    assert md.count("\n| positivity |") == 2 and md.count("\n| golden_gate |") == 2  # both tables
    for name in ("positivity", "golden_gate"):
        png = paths[name].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    lines = paths["samples"].read_text().splitlines()
    # 6 unsteered (shared) + 6 per feature at strengths 1 and 3.
    assert len(lines) == len(samples) == 30
    assert {json.loads(x)["feature"] for x in lines} == {None, "positivity", "golden_gate"}


def test_samples_are_scored_and_perplexity_is_finite(small_eval):
    _, samples, _ = small_eval
    for s in samples:
        assert 0 < s.tokens <= 40 and s.text
        assert s.perplexity is not None and math.isfinite(s.perplexity) and s.perplexity > 1.0
        assert -1.0 <= s.scores["positivity"] <= 1.0 and s.scores["golden_gate"] in (0.0, 1.0)
    base = [s for s in samples if s.feature is None]
    assert sorted(s.prompt_id for s in base) == sorted(PROMPT_IDS) and all(s.strength == 0 for s in base)


def test_same_seed_reproduces_the_baseline(server, prompts, small_eval):
    """Float32 on CPU with a fixed seed: the same unsteered request gives the same text."""
    _, samples, _ = small_eval
    cfg = dict(strengths=[0.0, 1.0], prompts=prompts[:2], samples=1, max_tokens=40, seed=0)
    _, again = asyncio.run(evaluate(server.url, server.api_key, {"positivity": None}, "smollm2-tone",
                                    {**cfg, "perplexity": False}, progress=False))
    first = {s.prompt_id: s.text for s in samples if s.feature is None}
    for s in again:
        if s.feature is None:
            assert s.text == first[s.prompt_id]


def test_positivity_and_golden_gate_move_their_scorers(small_eval):
    """At their calibrated strengths: positivity (``effect``) moves at 1; golden_gate is ``weak``
    (clear only beyond the fluency budget), so it is asked for more and must reach the topic at 3."""
    result, _, _ = small_eval
    pos = result["features"]["positivity"]["strengths"]
    gg = result["features"]["golden_gate"]["strengths"]
    assert pos["1"]["score_mean"] > pos["0"]["score_mean"] + 0.1, pos
    assert pos["1"]["vs_baseline"]["diff"] > 0.1
    assert gg["3"]["score_mean"] > gg["0"]["score_mean"], gg
    examples = result["features"]["golden_gate"]["examples"]
    assert examples["1"] != examples["0"] and examples["3"] != examples["1"]
    assert result["features"]["positivity"]["calibration"]["method"] == "effect"


def test_unknown_feature_is_an_error(server, prompts):
    cfg = dict(strengths=[0.0, 1.0], prompts=prompts[:1], samples=1, max_tokens=8)
    with pytest.raises(EvalError, match="404"):
        asyncio.run(evaluate(server.url, server.api_key, {"no_such_feature": None}, "smollm2-tone", cfg,
                             progress=False))


def test_prompting_baseline_on_the_real_engine(server, prompts):
    """``--baseline prompt``: the prompt condition sends the instruction as a system message and no
    steering, both sends both; every perplexity is after the neutral prompt; the steer condition
    is the dose-response's strength-1 outputs, the same samples."""
    cfg = dict(strengths=[0.0, 1.0], prompts=prompts[:4], samples=1, max_tokens=24, seed=0,
               baseline="prompt")
    result, samples = asyncio.run(evaluate(server.url, server.api_key, {"positivity": None}, "smollm2-tone",
                                           cfg, progress=False))
    by = {(s.condition, s.strength, s.prompt_id): s for s in samples}
    assert len(samples) == 16 and {c for c, _, _ in by} == {"steer", "prompt", "both"}
    tok = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    instruction = SCORERS["positivity"].instruction
    for p in prompts[:4]:
        neutral, prompted = by[("steer", 0.0, p.id)], by[("prompt", 0.0, p.id)]
        both, steered = by[("both", 1.0, p.id)], by[("steer", 1.0, p.id)]
        # The instruction is the prompted requests' system message (it replaces the template's
        # default one); the neutral and steered requests keep the plain prompt.
        assert instruction in tok.decode(prompted.prompt_ids)
        assert instruction not in tok.decode(neutral.prompt_ids) and steered.prompt_ids == neutral.prompt_ids
        assert both.prompt_ids == prompted.prompt_ids and both.text != prompted.text
        for s in (prompted, both):
            assert s.perplexity is not None and math.isfinite(s.perplexity) and s.perplexity > 1.0
    # ... and its perplexity is the neutral prompt's: recomputed after the neutral prompt, it is equal.
    s = by[("prompt", 0.0, prompts[0].id)]

    async def after_neutral():
        client = Client(server.url, server.api_key)
        try:
            return await perplexity(client, result["server"]["model"], by[("steer", 0.0, prompts[0].id)].prompt_ids,
                                    s.token_ids)
        finally:
            await client.close()

    assert asyncio.run(after_neutral()) == pytest.approx(s.perplexity, rel=1e-9)
    cmp = result["features"]["positivity"]["prompting"]
    one = result["features"]["positivity"]["strengths"]["1"]
    assert cmp["conditions"]["steer"]["score_mean"] == pytest.approx(one["score_mean"])
    assert cmp["conditions"]["steer"]["ppl_median"] == pytest.approx(one["ppl_median"])
    assert cmp["best"] in ("steer", "prompt", "both")
    for c in cmp["conditions"].values():
        assert c["n_prompts"] == 4 and 0.0 <= c["harmonic"] <= 1.0
