"""steer pack gen-data: which generated answers become training pairs (binary and rate scorers),
and one small real run through the session's server that writes pairs the scorer agrees with."""

from __future__ import annotations

import asyncio
import hashlib
import json
from argparse import Namespace

from clients.eval.gendata import TRAIN_PROMPTS, GenConfig, generate_concept, select_pairs, write_data
from clients.eval.gendata_cli import gendata_cmd
from clients.eval.harness import Client, Prompt, load_prompts
from clients.eval.scorers import SCORERS


P = [Prompt("a", "Tell me about boats."), Prompt("b", "What is soup?")]


def test_binary_scorer_keeps_only_an_on_topic_positive_and_an_off_topic_negative():
    gg = SCORERS["golden_gate"]
    instructed = [["Boats sail under the Golden Gate Bridge in San Francisco.", "Boats float."],
                  ["Soup is warm.", "Soup is a liquid food."]]
    plain = [["Boats float on water.", "The Golden Gate Bridge is red."], ["Soup is food.", "Soup."]]
    pairs = select_pairs(P, instructed, plain, gg, margin=0.5)
    assert len(pairs) == 1  # prompt b: no instructed answer is on topic
    (p,) = pairs
    assert p["prompt"] == P[0].prompt and "Golden Gate" in p["positive"] and p["negative"] == "Boats float on water."
    assert (p["pos_score"], p["neg_score"], p["prompt_id"]) == (1.0, 0.0, "a")


def test_rate_scorer_needs_the_best_instructed_answer_above_every_plain_one_by_the_margin():
    sc = SCORERS["pirate"]
    arr = "Arr matey, ye be sailin' the seas, me hearties, yo ho ho!"
    instructed = [[arr, "Boats are nice."], ["Soup, matey.", "Soup is hot."]]
    plain = [["Boats are vessels.", "Ships carry cargo."], ["Soup, matey, arr ye.", "Soup is broth."]]
    pairs = select_pairs(P, instructed, plain, sc, margin=0.5)
    # prompt b: a plain answer scores at least as high as the best instructed one
    assert [p["prompt_id"] for p in pairs] == ["a"] and pairs[0]["positive"] == arr
    assert pairs[0]["pos_score"] > pairs[0]["neg_score"]
    assert select_pairs(P, instructed, plain, sc, margin=1e6) == []


def test_write_data_records_the_file_sha256(tmp_path):
    rows = [{"prompt": "p", "positive": "x", "negative": "y"}]
    path = write_data(tmp_path, "pirate", rows, {"scorer": "pirate"})
    meta = json.loads((tmp_path / "pirate.meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and meta["file"] == "pirate.jsonl"
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows


def test_a_real_generation_run_writes_pairs_its_scorer_agrees_with(server, tmp_path):
    """french on 6 training prompts, 2 answers each way, through the real engine."""
    prompts = load_prompts(TRAIN_PROMPTS, 6)

    async def go():
        client = Client(server.url, server.api_key)
        try:
            return await generate_concept(client, {"name": "french"}, prompts,
                                          GenConfig(samples=2, max_tokens=24, concurrency=6), progress=False)
        finally:
            await client.close()

    pairs, meta = asyncio.run(go())
    assert meta["prompts"] == 6 and meta["kept"] == len(pairs) and meta["scorer"] == "french"
    assert meta["instruction"] == SCORERS["french"].instruction and meta["generator"]["samples"] == 2
    sc = SCORERS["french"]
    for p in pairs:
        assert p["prompt"] in {q.prompt for q in prompts}
        pos, neg = sc(p["positive"]), sc(p["negative"])
        assert pos > neg and (round(pos, 4), round(neg, 4)) == (p["pos_score"], p["neg_score"])


def test_the_command_refuses_an_unknown_concept(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pack: {name: t}\nconcepts:\n  - name: french\n    pairs: [[a, b], [c, d], [e, f], [g, h]]\n")
    args = Namespace(recipe=str(recipe), out=str(tmp_path / "d"), features="pirate", samples=1, max_tokens=8,
                     temperature=0.9, margin=0.5, seed=1, concurrency=1, prompts=str(TRAIN_PROMPTS), quiet=True,
                     url="http://127.0.0.1:9", api_key=None, serve_args="")
    assert gendata_cmd(args) == 1
    assert "no concept pirate" in capsys.readouterr().err
