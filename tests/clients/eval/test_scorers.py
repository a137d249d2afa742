"""Text scorers on known texts: exact values where the rule is simple, orderings where it is a lexicon."""

from __future__ import annotations

import pytest

from clients.eval.scorers import FEATURE_SCORERS, SCORERS, scorer_for, words

BUNDLED = ["formality", "positivity", "enthusiasm", "hedging", "verbosity", "humor", "pirate", "french",
           "golden_gate", "refusal", "code"]


def test_every_scorer_has_metadata_and_returns_float_on_empty_text():
    assert {*BUNDLED, "repetition"} <= set(SCORERS)
    for name, s in SCORERS.items():
        assert s.name == name and s.description and s.unit
        assert s("") == 0.0 and isinstance(s(""), float)


def test_words_keeps_inner_apostrophes_and_accents():
    assert words("Don’t stop, c'est très—bien 42!") == ["don't", "stop", "c'est", "très", "bien"]


def test_positivity_is_vader_compound():
    s = SCORERS["positivity"]
    assert s("What a wonderful day! I love it.") > 0.8
    assert s("This is awful, I hate everything.") < -0.7
    assert s("The table is in the room.") == 0.0
    assert s("I love it.") == pytest.approx(0.6369, abs=1e-4)  # VADER's published value for this text


def test_golden_gate_is_a_topic_mention():
    s = SCORERS["golden_gate"]
    assert s.binary
    assert s("We drove across the Golden Gate Bridge.") == 1.0
    assert s("San Francisco is foggy.") == 1.0
    assert s("The old bridge over the river.") == 1.0
    assert s("Good teachers bridge the gap between theory and practice.") == 0.0
    assert s("I like golden retrievers and gates.") == 0.0


def test_pirate_rate_per_100_words():
    s = SCORERS["pirate"]
    # "Arr", "matey", "ye", "sailin'", "seas", "treasure" in 9 words → 6 hits.
    assert s("Arr, matey! Ye be sailin' the seas for treasure.") == pytest.approx(100 * 6 / 9)
    assert s("Hello friend, my day is fine, thank you.") == 0.0


def test_code_ranks_code_above_prose():
    s = SCORERS["code"]
    src = "Use `sorted(xs)`:\n```python\ndef f(xs):\n    return sorted(xs)\n```"
    assert s(src) > 50
    assert s("Put the books on the shelf from the shortest to the tallest.") == 0.0


def test_french_function_word_share():
    s = SCORERS["french"]
    # je, suis, c'est, la, et, le, est → 7 of 11 words.
    assert s("Je suis content, c'est la vie et le soleil est beau.") == pytest.approx(7 / 11)
    assert s("I am happy, this is life and the sun is nice.") == 0.0


def test_formality_orders_registers():
    s = SCORERS["formality"]
    formal = s("I would be pleased to assist you with this matter. Kindly provide further details.")
    neutral = s("The report lists the results of the survey.")
    casual = s("hey lol i'm gonna grab some stuff, u coming?")
    assert formal > neutral > casual
    assert formal > 10 and casual < -30


def test_hedging_counts_hedges():
    s = SCORERS["hedging"]
    # might, possibly, perhaps, I think, it depends → 5 hedges in 9 words.
    assert s("It might possibly rain, perhaps. I think it depends.") == pytest.approx(100 * 5 / 9)
    assert s("Take the job. It pays well.") == 0.0


def test_refusal_phrases():
    s = SCORERS["refusal"]
    for text in ["I'm sorry, but I can't help with that.", "I cannot comply with that request.",
                 "As an AI, I do not have weekends.", "Unfortunately, I am unable to assist with this."]:
        assert s(text) == 1.0, text
    for text in ["Sure, here is the recipe.", "I can help with that.", "Sorry to hear that you are tired."]:
        assert s(text) == 0.0, text


def test_verbosity_is_word_count():
    assert SCORERS["verbosity"]("One two, three-four five.") == 5.0


def test_humor_and_enthusiasm():
    h, e = SCORERS["humor"], SCORERS["enthusiasm"]
    joke = "Haha, why did the chicken cross the road? That joke is so funny!"
    assert h(joke) > 20 and h("Cats are small domesticated mammals.") == 0.0
    assert e("WOW! This is SO amazing! I am thrilled!") == pytest.approx(100 * 8 / 8)  # 3 !, so, amazing, thrilled, WOW, SO
    assert e("That is a plan. I have no strong feelings about it.") == 0.0


def test_repetition_share_of_repeated_trigrams():
    s = SCORERS["repetition"]
    # 10 words → 8 trigrams; unique: (the cat sat) (cat sat the) (sat the cat) → 1 − 3/8.
    assert s("the cat sat the cat sat the cat sat the") == pytest.approx(1 - 3 / 8)
    assert s("every word here is different from the others") == 0.0


@pytest.mark.parametrize("name,expected", [
    ("golden_gate", "golden_gate"), ("smollm2-tone/pirate", "pirate"),
    ("smollm2-sae-l12/golden_gate_latent", "golden_gate"), ("french_latent", "french"),
    ("L12:123", None), ("nonexistent", None),
])
def test_scorer_for(name, expected):
    s = scorer_for(name)
    assert (s.name if s else None) == expected


def test_every_bundled_feature_maps_to_its_scorer():
    for f in BUNDLED:
        assert FEATURE_SCORERS[f] == f and scorer_for(f) is SCORERS[f]
