"""``steer demo ablation``: the HTML report (unit) and one run on the session's real server."""

from __future__ import annotations

import json
import re

import pytest
from markupsafe import escape

from clients.eval.demo import DEFAULT_PROMPTS, DemoError, merge_split_chars, response_span, summarize_demo, variants
from clients.eval.demo_cli import command_line, config_from_args
from clients.eval.demo_view import heatmap_html, render_html
from clients.eval.harness import load_prompts
from clients.eval.scorers import scorer_for

EVIL = '<script>alert("x")</script> & the Golden Gate'


def _output(text: str, acts: list[float], hit: bool) -> dict:
    toks = [f" w{i}" for i in range(len(acts))]
    toks[0] = "<script>"
    return {"text": text, "finish_reason": "length", "generated_tokens": len(acts), "score": float(hit),
            "hit": hit, "tokens": list(zip(toks, acts)), "mean_activation": sum(acts) / len(acts),
            "max_activation": max(acts), "steering": None}


def _result() -> dict:
    vs = variants("smollm2-tone/golden_gate", 1.5)
    rows = [{"id": "p0", "prompt": "Bridges? </h3><b>", "seed": 7, "outputs": {
        "baseline": _output(EVIL, [10.0, 60.0, -5.0], True),
        "ablated": _output("Paris <i>is</i> nice", [-3.0, 1.0, 0.0], False),
        "amplified": _output("Golden Gate Golden Gate", [70.0, 51.6, 34.4], True)}}]
    return {"object": "steer.demo.ablation", "created": "2026-01-01T00:00:00+00:00", "model": "M",
            "feature": {"id": "smollm2-tone/golden_gate", "layer": 10, "kind": "direction",
                        "description": "GGB", "scale": 34.4},
            "scorer": {"name": "golden_gate", "description": "d", "unit": "share of outputs", "binary": True},
            "settings": {"amplify": 1.5, "amplify_target": 51.6, "max_tokens": 8, "temperature": 0.7,
                         "top_p": 1.0, "repetition_penalty": 1.1, "seed": 7},
            "variants": [{"name": v.name, "title": v.title, "steering": v.steering} for v in vs],
            "rows": rows, "summary": summarize_demo(rows, [v.name for v in vs]),
            "command": "steer demo ablation --out 'a b.html'"}


def test_variants_are_baseline_ablate_and_clamp_on_all_tokens():
    base, abl, amp = variants("pack/f", 2.5)
    assert base.steering is None
    assert abl.steering == {"features": {"pack/f": {"mode": "ablate"}}, "apply_to": "all"}
    assert amp.steering == {"features": {"pack/f": {"mode": "clamp", "strength": 2.5}}, "apply_to": "all"}
    # A calibrated feature (scale 0.5 u): amplify 1.5 u is strength 3 in its own units.
    amp = variants("pack/f", 1.5, 3.0)[2]
    assert amp.steering["features"]["pack/f"]["strength"] == 3.0 and amp.title == "Amplified (clamp to 1.5 u)"


def test_summary_rates_and_means():
    s = _result()["summary"]
    assert (s["baseline"]["topic_rate"], s["ablated"]["topic_rate"], s["amplified"]["topic_rate"]) == (1.0, 0.0, 1.0)
    assert s["ablated"]["topic_hits"] == 0 and s["ablated"]["n"] == 1
    assert s["amplified"]["mean_activation"] == pytest.approx((70.0 + 51.6 + 34.4) / 3)
    assert s["baseline"]["mean_peak_activation"] == 60.0


def test_html_has_three_columns_heatmap_and_escapes_model_text():
    page = render_html(_result())
    assert "<script" not in page.lower()  # neither the fabricated output nor anything of ours
    assert str(escape(EVIL)) in page  # autoescaped by the Jinja2 template
    assert "&lt;/h3&gt;&lt;b&gt;" in page and "Paris &lt;i&gt;is&lt;/i&gt; nice" in page
    for name in ("baseline", "ablated", "amplified"):
        assert page.count(f'class="col variant-{name}"') == 1
    spans = re.findall(r'<span class="tok" style="background:rgba\(([\d.,]+)\)" title="([^"]+)">([^<]*)</span>', page)
    assert len(spans) == 9  # 3 tokens x 3 columns
    assert ("&lt;script&gt;" in [t for _, _, t in spans])
    titles = [t for _, t, _ in spans]
    assert "60.00 (+1.74× scale)" in titles and "-5.00 (-0.15× scale)" in titles
    # Stronger activation, more opaque colour; negative values in the other (blue) hue.
    alpha = {t: float(c.split(",")[-1]) for c, t, _ in spans}
    assert alpha["60.00 (+1.74× scale)"] > alpha["10.00 (+0.29× scale)"] > 0
    assert next(c for c, t, _ in spans if t.startswith("-5.00")).startswith("49,130,189")
    assert 'class="legend"' in page
    assert "100% (1/1)" in page and "0% (0/1)" in page  # topic rate per variant
    assert "steer demo ablation --out &#39;a b.html&#39;" in page
    assert "http://" not in page and "https://" not in page  # self-contained: no external assets


def test_heatmap_escapes_tokens_and_titles():
    out = heatmap_html([('"><b>', 1.0)], 0.0)
    assert "<b>" not in out and "&lt;b&gt;" in out and 'title="1.00"' in out


def test_response_span_strips_template_and_stop_token():
    def toks(ids):
        return [{"token_id": i, "token": "<|im_end|>" if i == 2 else f"t{i}"} for i in ids]

    prompt = [1, 5, 6, 7]
    inspected = toks(prompt + [20, 21, 22, 2, 198])
    assert [t["token_id"] for t in response_span(inspected, prompt, [20, 21, 22, 2], "stop")] == [20, 21, 22]
    assert [t["token_id"] for t in response_span(inspected, prompt, [20, 21, 22], "length")] == [20, 21, 22]
    # Re-tokenized differently (e.g. merged tokens): everything before the closing template tokens.
    inspected2 = toks(prompt + [30, 22, 2]) + [{"token_id": 198, "token": "\n"}]
    assert [t["token_id"] for t in response_span(inspected2, prompt, [20, 21, 22], "length")] == [30, 22]
    with pytest.raises(DemoError):
        response_span(inspected, [1, 5, 9], [20], "length")


def test_tokens_of_one_multibyte_character_merge_into_one_span():
    text = "Hi 🌉 bridge"
    toks = [("Hi", 1.0), (" \ufffd", 2.0), ("\ufffd", 5.0), (" bridge", 9.0)]
    assert merge_split_chars(toks, text) == [("Hi", 1.0), (" 🌉", 5.0), (" bridge", 9.0)]
    assert merge_split_chars(toks, "something else") == toks  # not the text: left alone
    clean = [("a", 1.0), ("b", 2.0)]
    assert merge_split_chars(clean, "ab") is clean


def test_shipped_prompts_are_on_topic_and_other_features_need_their_own(tmp_path):
    prompts = load_prompts(DEFAULT_PROMPTS)
    assert len(prompts) >= 8
    from clients.cli import build_parser

    args = build_parser().parse_args(["demo", "ablation", "--feature", "pirate"])
    with pytest.raises(DemoError, match="--prompts is required"):
        config_from_args(args)
    f = tmp_path / "p.txt"
    f.write_text("Ahoy?\nWhere is the treasure?\n")
    args = build_parser().parse_args(["demo", "ablation", "--feature", "smollm2-tone/pirate", "--prompts", str(f),
                                      "--api-key", "secret", "--url", "http://h:1"])
    cfg = config_from_args(args)
    assert [p.prompt for p in cfg.prompts] == ["Ahoy?", "Where is the treasure?"]
    cmd = command_line(args)
    assert "secret" not in cmd and "--url http://h:1" in cmd and "--feature smollm2-tone/pirate" in cmd


def test_demo_on_the_real_engine(server, tmp_path, capsys):
    """Two on-topic prompts, all three variants through HTTP; report, JSON and the effect."""
    from clients.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello?\n")
    rc = main(["demo", "ablation", "--url", server.url, "--api-key", server.api_key, "--feature", "no_such_feature",
               "--prompts", str(prompts), "--out", str(tmp_path / "x.html")])
    assert rc == 1 and "no_such_feature" in capsys.readouterr().err and not (tmp_path / "x.html").exists()

    out, js = tmp_path / "demo.html", tmp_path / "demo.json"
    rc = main(["demo", "ablation", "--url", server.url, "--api-key", server.api_key, "--limit-prompts", "2",
               "--max-tokens", "24", "--seed", "3", "--out", str(out), "--json", str(js)])
    assert rc == 0
    page = out.read_text()
    res = json.loads(js.read_text())
    for name in ("baseline", "ablated", "amplified"):
        assert page.count(f'class="col variant-{name}"') == 2
    assert page.count('<span class="tok" ') >= 3 * 2 * 10  # a heatmap span per generated token

    s = res["summary"]
    assert set(s) == {"baseline", "ablated", "amplified"}
    for v in s.values():
        assert v["n"] == 2 and 0.0 <= v["topic_rate"] <= 1.0
    scorer = scorer_for("golden_gate")
    for row in res["rows"]:
        outs = row["outputs"]
        # The steering was applied as asked, and the hit is the shared scorer's verdict on the text.
        assert outs["baseline"]["steering"] is None
        assert outs["ablated"]["steering"]["applied"] == [
            {"feature": "smollm2-tone/golden_gate", "layer": 10, "mode": "ablate", "strength": 0.0}]
        assert outs["amplified"]["steering"]["applied"][0]["mode"] == "clamp"
        for o in outs.values():
            assert o["hit"] == (scorer(o["text"]) == 1.0)
            assert o["generated_tokens"] == 24 or o["finish_reason"] == "stop"
            # The heatmap covers the output: its tokens spell the generated text.
            assert "".join(t for t, _ in o["tokens"]).strip() == o["text"].strip()
        # Same seed, different steering: the three outputs differ.
        assert len({o["text"] for o in outs.values()}) == 3
    # The effect, by the unsteered model's own reading of each output: amplified > baseline > ablated.
    # (Held for each of seeds 0-5 in float32; seed 3 reads 12.6 > 3.4 > -2.4, the widest margins.)
    assert s["amplified"]["mean_activation"] > s["baseline"]["mean_activation"] > s["ablated"]["mean_activation"]
    assert s["ablated"]["topic_rate"] <= s["baseline"]["topic_rate"]
