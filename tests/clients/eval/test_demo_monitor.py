"""``steer demo monitor``'s page and table from a recorded result (no engine): the trace is one
span per generated token, the token the monitor fired on is outlined, the stop run's finish
reason is shown."""

from __future__ import annotations

import io
import re

from clients.eval.demo_monitor import print_table, render_html


def result() -> dict:
    def run(text, trace, fired, first, finish):
        return {"text": text, "finish_reason": finish, "token_ids": list(range(len(trace) + 1)),
                "prompt_token_ids": [1], "trace": trace,
                "monitor": {"feature": "smollm2-tone/golden_gate", "above": 40.0, "action": "flag",
                            "fired": fired, "first_token": first,
                            "peak": max(a for _, a in trace)}}
    bridge = [("The", -3.7), (" most", -2.7), (" iconic", 12.1), (" of", -1.8), (" San", 56.6), (" Francisco", 69.0)]
    bread = [("To", -2.2), (" bake", -3.5), (" salt", 17.6)]
    return {"object": "steer.demo.monitor", "created": "2026-12-01T14:28:00+00:00", "model": "SmolLM2",
            "feature": {"id": "smollm2-tone/golden_gate", "layer": 10, "description": ""},
            "settings": {"threshold": 40.0, "max_tokens": 48, "temperature": 0.0, "seed": 0},
            "rows": [{"id": "sf", "prompt": "Iconic landmark of SF?", "seed": 0,
                      "flag": run("The most iconic of San Francisco", bridge, True, 4, "length"),
                      "stop": {**run("The most iconic of San", bridge[:5], True, 4, "content_filter")}},
                     {"id": "bread", "prompt": "Bake bread?", "seed": 1,
                      "flag": run("To bake salt", bread, False, None, "length"),
                      "stop": run("To bake salt", bread, False, None, "length")}],
            "fired": 1}


def test_the_page_outlines_the_trigger_token_and_shows_the_stop():
    page = render_html(result())
    triggers = re.findall(r'<span class="tok trigger"[^>]*title="token (\d+): ([\d.]+)">([^<]*)</span>', page)
    assert triggers == [("4", "56.60", " San")]
    assert len(re.findall(r'<span class="tok', page)) == 6 + 3  # one span per traced token
    assert "fired at token 4" in page and "did not fire" in page
    assert "finish_reason content_filter" in page and "<script" not in page


def test_the_table_says_which_generations_fired():
    out = io.StringIO()
    print_table(result(), file=out)
    text = out.getvalue()
    assert "fired at token 4, peak" in text and "69.0" in text and "quiet, peak 17.6" in text
    assert "1/2 generations flagged" in text and "content_filter" in text
