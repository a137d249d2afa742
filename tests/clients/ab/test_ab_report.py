"""The offline A/B HTML report (clients.ab.report over ab_report.html.j2) and the results plot."""

from __future__ import annotations

from markupsafe import escape

from clients.ab.report import outputs_by_cell, render_html

EVIL = '<script>alert("x")</script> & co'


def _report() -> dict:
    scores = {"pirate": {"mean": 0.75, "ci95": [0.5, 1.0]}}
    return {
        "experiment": "e<1>", "model": "M", "wall_s": 1.5,
        "config": {"samples": 1, "max_tokens": 8, "temperature": 0.7, "top_p": 1.0, "seed": 3,
                   "seeds": [300009, 300010]},
        "scorers": [{"name": "pirate", "description": "pirate words", "unit": "share"}],
        "prompts": [{"id": "a", "prompt": "Hi <b>there</b>"}, {"id": "b", "prompt": "More?"}],
        "variants": [
            {"name": "control", "control": True, "steering": None, "preset": None, "n": 2,
             "mean_tokens": 8.0, "mean_latency_s": 0.25, "scores": {"pirate": {"mean": 0.0, "ci95": [None, None]}}},
            {"name": "pirate", "control": False, "steering": {"features": {"pirate": 1.0}}, "preset": "pirate",
             "n": 2, "mean_tokens": 6.5, "mean_latency_s": None,
             "scores": {"pirate": {**scores["pirate"], "vs_control": {"diff": 0.75, "p_value": 0.01}}}},
        ],
        "outputs": [
            {"variant": v, "prompt_id": p, "index": i, "seed": 0, "text": EVIL if v == "pirate" else f"plain {p}{i}",
             "tokens": 8, "finish_reason": "length", "latency_s": 0.1, "scores": {"pirate": 0.5}}
            for p in ("a", "b") for v in ("control", "pirate") for i in (1, 0)],
    }


def test_report_escapes_model_text_and_lays_out_variants_and_prompts():
    page = render_html(_report())
    assert "<script" not in page.lower() and str(escape(EVIL)) in page
    assert "Hi &lt;b&gt;there&lt;/b&gt;" in page and "<b>there</b>" not in page
    assert "<code>e&lt;1&gt;</code>" in page and "<title>Offline A/B: e&lt;1&gt;</title>" in page
    for name in ("control", "pirate"):
        assert page.count(f'<th class="variant" data-variant="{name}">') == 2  # summary + side by side
    assert page.count('data-prompt="a"') == page.count('data-prompt="b"') == 1
    assert "<code>preset pirate</code>" in page and "<code>unsteered</code>" in page
    assert '<span class="sig">Δ +0.75 (p = 0.01)</span>' in page  # p < 0.05 in red
    assert "0.75 <span class=meta>[0.5, 1]</span>" in page
    assert "2 outputs, 6.5 tok, – s" in page  # a missing number reads "–"
    assert "pirate 0.5 · 8 tok · length" in page
    assert page.index("plain a0") < page.index("plain a1")  # outputs in index order
    assert "http" not in page  # self-contained


def test_outputs_by_cell_groups_and_orders():
    by = outputs_by_cell(_report())
    assert set(by) == {"a", "b"} and set(by["a"]) == {"control", "pirate"}
    assert [o["index"] for o in by["a"]["control"]] == [0, 1]


def test_results_plot_writes_a_png(tmp_path):
    from clients.ab.plot import plot_results

    res = {"experiment": "e", "status": "running", "n": 3, "variants": [
        {"name": "control", "control": True, "score": {"n": 2, "mean": 1.5, "ci95": [1.0, 2.0]},
         "labels": {"n": 2, "good": 1, "good_rate": 0.5}},
        {"name": "t", "control": False, "score": {"n": 0, "mean": None, "ci95": [None, None]},
         "labels": {"n": 0, "good": 0, "good_rate": None}}]}
    out = plot_results(res, tmp_path / "sub" / "ab.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
