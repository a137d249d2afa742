"""The browser playground (server/ui/) in headless chromium against the real server and engine.

Each test drives the page as a user does (labels, keyboard, clicks) and checks what reached the
server (the requests' JSON bodies, the echoed ``x-steering-hash``), what the server did (its
``/metrics`` gauges after Stop, the stored preset, the experiment's results) and what the page
shows (streamed text, heatmap values equal to /v1/features/inspect's, errors next to their
control). Short generations (24 tokens) on the session's one engine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import pytest
from live import MODEL, metric, wait_until_idle

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
FEATURE = "smollm2-tone/golden_gate"
MAX_TOKENS = "24"

# Records every text change of the two output panes with the pane's state at that moment.
RECORD_PANES = """() => {
  window.paneLog = [];
  for (const id of ["out-base", "out-steered"]) {
    const el = document.getElementById(id);
    new MutationObserver(() => window.paneLog.push(
      {id, state: el.dataset.state, length: el.textContent.length}
    )).observe(el, {childList: true, characterData: true, subtree: true, attributes: true});
  }
}"""


def _add_feature(page: Any, query: str = "bridge", feature: str = FEATURE) -> None:
    """Search by keyboard (type, Enter) and add ``feature`` from the results."""
    page.get_by_label("Search features").fill(query)
    page.get_by_label("Search features").press("Enter")
    page.get_by_role("button", name=f"Add {feature}").click()
    page.locator(f'.slider[data-feature="{feature}"]').wait_for()


def _slider(page: Any, feature: str = FEATURE) -> Any:
    return page.get_by_label(f"{feature} strength", exact=True)


def _strength(page: Any, feature: str = FEATURE) -> Any:
    """The number field next to the slider (typed values may go beyond the slider's range)."""
    return page.get_by_label(f"{feature} strength (", exact=False)


def _wait_done(page: Any) -> None:
    page.wait_for_function("""() => ["out-base", "out-steered"].every(
        id => !["idle", "streaming"].includes(document.getElementById(id).dataset.state))""")


def _unlabelled_controls(page: Any) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll("input, select, textarea, button")]
      .filter(el => el.offsetParent !== null || el.type === "range")
      .filter(el => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                    && !el.getAttribute("aria-labelledby") && !el.textContent.trim())
      .map(el => el.outerHTML.slice(0, 80))""")


def _overflow(page: Any) -> dict[str, Any]:
    """Horizontal overflow of the page and the main controls' boxes beyond the viewport."""
    return page.evaluate("""() => {
      const w = document.documentElement.clientWidth;
      const out = [];
      for (const sel of ["#api-key", "#model", "#feature-query", "#prompt", "#run", "#stop",
                         "#sliders input[type=range]", "#out-steered", "#save-preset"]) {
        const el = document.querySelector(sel);
        const r = el.getBoundingClientRect();
        if (r.left < 0 || r.right > w + 0.5) out.push([sel, r.left, r.right, w]);
      }
      return {scroll: document.documentElement.scrollWidth, width: w, outside: out};
    }""")


def test_page_needs_no_key_shows_401_at_the_key_and_is_labelled_at_both_sizes(browser, server):
    context = browser.new_context(viewport=DESKTOP, base_url=server.url)
    page = context.new_page()
    try:
        response = page.goto("/")
        assert response.status == 200 and page.url.endswith("/ui/")
        # The page's files need no key; nothing else of the package is served.
        assert httpx.get(f"{server.url}/ui/app.js", timeout=30).status_code == 200
        hidden = httpx.get(f"{server.url}/ui/__init__.py", timeout=30)
        assert hidden.status_code == 404 and set(hidden.json()["error"]) == {"message", "type", "param", "code"}
        # No key yet: /v1/models is a 401, shown next to the API key field.
        auth_error = page.locator('[data-error-for="auth"]')
        auth_error.wait_for()
        assert auth_error.inner_text().startswith("401")
        page.get_by_label("API key").fill("sk-wrong")
        page.get_by_label("API key").press("Enter")
        page.wait_for_function("""() => document.querySelector('[data-error-for="auth"]')
                                  .textContent.includes("401")""")
        page.get_by_label("API key").fill(server.api_key)
        page.get_by_label("API key").press("Enter")
        page.locator("#model option").first.wait_for(state="attached")
        options = page.locator("#model option").evaluate_all("els => els.map(e => e.value)")
        assert options[0] == MODEL and f"{MODEL}:pirate" in options  # a bundled preset
        assert auth_error.inner_text() == ""
        assert page.evaluate("localStorage.getItem('steer.apiKey')") == server.api_key

        # Keyboard: from the key field, Tab reaches the model and then the tabs; the search
        # field takes a query and Enter.
        page.get_by_label("API key").focus()
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "model"
        _add_feature(page)
        assert page.evaluate("document.activeElement.getAttribute('aria-label')") == f"{FEATURE} strength"
        assert _unlabelled_controls(page) == []

        for viewport in (DESKTOP, PHONE):
            page.set_viewport_size(viewport)
            layout = _overflow(page)
            assert layout["scroll"] <= layout["width"] and layout["outside"] == [], (viewport, layout)
        page.get_by_role("tab", name="Experiments").focus()
        page.keyboard.press("ArrowLeft")  # wraps to the Playground tab, and back
        page.keyboard.press("ArrowRight")
        assert page.locator("#panel-experiments").is_visible()
        assert not page.locator("#panel-play").is_visible()
    finally:
        context.close()


def test_side_by_side_streams_steers_and_reads_the_heatmap(page, server, screenshots):
    _add_feature(page)
    _slider(page).focus()
    for _ in range(30):  # 30 × 0.05 by keyboard
        page.keyboard.press("ArrowRight")
    assert _strength(page).input_value() == "1.5"
    page.get_by_label("Max tokens").fill(MAX_TOKENS)
    page.get_by_label("Prompt", exact=True).fill("Describe a trip to the city.")

    sent: list[Any] = []
    answered: list[Any] = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.on("response", lambda r: answered.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.evaluate(RECORD_PANES)
    page.get_by_role("button", name="Run side by side").click()
    _wait_done(page)

    base, steered = (page.locator(f"#out-{w}") for w in ("base", "steered"))
    assert base.get_attribute("data-state") == steered.get_attribute("data-state") == "done"
    bodies = sorted((json.loads(r.post_data) for r in sent), key=lambda b: "steering" in b)
    assert len(bodies) == 2
    plain, steering = bodies
    assert steering.pop("steering") == {"features": {FEATURE: {"strength": 1.5, "mode": "add"}}}
    assert plain == steering  # same model, prompt, seed and sampling
    assert plain["stream"] is True and plain["seed"] == 0 and plain["max_tokens"] == 24
    assert plain["stream_options"] == {"include_usage": True}
    assert plain["messages"] == [{"role": "user", "content": "Describe a trip to the city."}]

    hashes = {json.loads(r.request.post_data).get("steering") is not None: r.headers.get("x-steering-hash")
              for r in answered}
    assert hashes[False] is None and hashes[True]
    assert steered.get_attribute("data-steering-hash") == hashes[True]
    meta = re.fullmatch(rf"x-steering-hash {hashes[True]} · (\d+) tokens", page.locator("#meta-steered").inner_text())
    assert meta and 0 < int(meta[1]) <= 24  # the usage chunk's completion_tokens
    # The echoed hash is the server's hash of exactly this steering.
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=120, json={
        "model": MODEL, "messages": plain["messages"], "max_tokens": 1,
        "steering": {"features": {FEATURE: {"strength": 1.5, "mode": "add"}}}})
    assert r.status_code == 200 and r.headers["x-steering-hash"] == hashes[True]

    texts = {w: page.locator(f"#out-{w}").inner_text() for w in ("base", "steered")}
    assert texts["base"] and texts["steered"] and texts["base"] != texts["steered"]
    log = page.evaluate("window.paneLog")
    for which in ("base", "steered"):
        final = len(page.evaluate(f"document.getElementById('out-{which}').textContent"))
        partial = [e for e in log if e["id"] == f"out-{which}" and e["state"] == "streaming"
                   and 0 < e["length"] < final]
        assert partial, f"{which}: no partial text was shown before the stream ended"

    # Heatmap: one row per feature, a cell per token, values equal to the server's inspect.
    for which in ("base", "steered"):
        cells = page.locator(f"#heat-{which} .heat-row[data-feature='{FEATURE}'] .cell")
        cells.first.wait_for()
        values = [float(v) for v in cells.evaluate_all("els => els.map(e => e.dataset.value)")]
        titles = cells.evaluate_all("els => els.map(e => e.title)")
        text = page.evaluate(f"document.getElementById('out-{which}').textContent")
        ref = httpx.post(f"{server.url}/v1/features/inspect", headers=server.headers, timeout=120,
                         json={"model": MODEL, "text": text, "features": [FEATURE], "layers": [],
                               "top_k": 0}).json()
        assert values == pytest.approx([t["features"][FEATURE] for t in ref["tokens"]], abs=1e-6)
        assert titles[0].startswith(f"{FEATURE} = {values[0]:.3f}")
        cells.first.hover()
    page.screenshot(path=str(screenshots / "ui-main.png"), full_page=True)

    # The same request as code, and both snippets run against the server.
    page.get_by_label("Max tokens").fill("2")
    page.get_by_role("button", name="Copy as curl").click()
    curl = page.locator("#code").input_value()
    assert f'"{FEATURE}"' in curl and server.api_key not in curl
    env = {**os.environ, "STEER_API_KEY": server.api_key}
    out = subprocess.run(["bash", "-c", curl + " -D /dev/stderr -o /dev/null"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert " 200" in out.stderr.splitlines()[0] and f"x-steering-hash: {hashes[True]}" in out.stderr.lower()
    page.get_by_role("button", name="Copy as Python").click()
    python = page.locator("#code").input_value()
    assert "extra_body=" in python and f'"{FEATURE}"' in python
    out = subprocess.run([sys.executable, "-c", python], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"'hash': '{hashes[True]}'" in out.stdout  # the snippet's echo: the same steering


def test_stop_aborts_both_requests_in_the_server(page, server):
    _add_feature(page)
    _strength(page).fill("1")
    page.get_by_label("Max tokens").fill("1000")
    page.get_by_label("Heatmap after the run").uncheck()
    page.get_by_role("button", name="Run side by side").click()
    page.wait_for_function("""() => ["out-base", "out-steered"].every(id => {
        const el = document.getElementById(id);
        return el.dataset.state === "streaming" && el.textContent.length > 0; })""")
    assert metric(server, "steer_requests_running") == 2
    page.get_by_role("button", name="Stop").click()
    _wait_done(page)
    for which in ("base", "steered"):
        assert page.locator(f"#out-{which}").get_attribute("data-state") == "aborted"
    deadline = time.monotonic() + 30
    while (metric(server, "steer_requests_running"), metric(server, "steer_engine_unfinished_requests")) != (0, 0):
        assert time.monotonic() < deadline, "the server still runs the stopped requests"
        time.sleep(0.2)
    generated = metric(server, "steer_generation_tokens_total")
    time.sleep(1.0)
    assert metric(server, "steer_generation_tokens_total") == generated  # nothing generates on
    wait_until_idle(server)  # the workers freed the steered request's slot


def test_an_out_of_range_strength_shows_the_servers_error_at_its_slider(page, server):
    _add_feature(page)
    _strength(page).fill("99")  # beyond the slider
    page.get_by_role("button", name="Run side by side").click()
    error = page.locator(f'.slider[data-feature="{FEATURE}"] .error')
    error.wait_for()
    _wait_done(page)
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
        "steering": {"features": {FEATURE: {"strength": 99, "mode": "add"}}}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"].startswith(f"steering.features.{FEATURE}")
    assert error.inner_text() == f"400{' ' + err['code'] if err['code'] else ''}: {err['message']}"
    assert page.locator('[data-error-for="run"]').inner_text() == ""  # not at the Run button
    assert page.locator("#out-steered").get_attribute("data-state") == "error"
    assert page.locator("#out-base").get_attribute("data-state") == "aborted"  # the pair stops
    # Moving the slider back clears the error.
    _slider(page).press("ArrowLeft")
    assert _strength(page).input_value() == "1.95"
    assert error.inner_text() == ""


def test_search_marks_features_whose_steering_showed_no_effect(page, server):
    """``steer pack calibrate`` tagged golden_gate_latent ``no-measured-effect``: the results say
    so next to it (and the server ranks it below the contrastive feature); the others are unmarked."""
    hits = httpx.get(f"{server.url}/v1/features/search", params={"q": "golden gate", "limit": 12},
                     headers=server.headers, timeout=30).json()["data"]
    page.get_by_label("Search features").fill("golden gate")
    page.get_by_label("Search features").press("Enter")
    rows = page.locator("#search-results li")
    rows.first.wait_for()
    shown = rows.evaluate_all("""els => els.map(e => [e.dataset.feature,
                                  !!e.querySelector('.evidence') && e.querySelector('.evidence').textContent])""")
    assert [f for f, _ in shown] == [h["id"] for h in hits]
    marked = {f for f, text in shown if text}
    assert marked == {h["id"] for h in hits if "no-measured-effect" in h.get("tags", [])}  # latents have none
    assert "smollm2-sae-l12/golden_gate_latent" in marked and FEATURE not in marked
    assert all(text == "no measured effect" for _, text in shown if text)


def test_save_the_equalizer_as_a_preset_and_select_it(page, server):
    name = f"ui-{uuid.uuid4().hex[:8]}"
    _add_feature(page)
    _strength(page).fill("0.75")
    page.get_by_label("Preset name").fill(name)
    page.get_by_role("button", name="Save as preset").click()
    status = page.locator("#preset-status")
    status.get_by_text("Saved").wait_for()
    try:
        assert page.locator("#model").input_value() == f"{MODEL}:{name}"
        stored = httpx.get(f"{server.url}/v1/presets/{name}", headers=server.headers, timeout=30).json()
        assert stored["steering"] == {"features": {FEATURE: {"strength": 0.75, "mode": "add"}}}
        assert page.get_by_role("button", name="Copy as curl").is_enabled()
        page.get_by_role("button", name="Copy as curl").click()
        assert f'"model": "{MODEL}:{name}"' in page.locator("#code").input_value()
    finally:
        httpx.delete(f"{server.url}/v1/presets/{name}", headers=server.headers, timeout=30)


def test_experiments_tab_lists_variants_results_and_sends_feedback(page, server, screenshots):
    name = f"ui-exp-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{server.url}/v1/experiments", headers=server.headers, timeout=30, json={
        "name": name, "unit": "request", "description": "golden gate vs plain",
        "variants": [{"name": "plain", "control": True},
                     {"name": "bridge", "steering": {"features": {FEATURE: 1.0}}}]})
    assert r.status_code == 200, r.text
    try:
        page.get_by_role("tab", name="Experiments").click()
        card = page.locator(f'.experiment[data-experiment="{name}"]')
        card.wait_for()
        variants = card.locator("table.variants tbody tr")
        assert variants.evaluate_all("els => els.map(e => e.dataset.variant)") == ["plain", "bridge"]
        assert "plain (control)" in variants.nth(0).inner_text()
        assert f"{FEATURE} 1" in variants.nth(1).inner_text()
        results = card.locator("table.results-table tbody tr")
        results.first.wait_for()
        assert results.locator("td.n").all_inner_texts() == ["0", "0"]

        card.get_by_label(f"Prompt for {name}").fill("Say hello.")
        card.get_by_role("button", name="Get a response").click()
        card.get_by_role("button", name="Good response (thumbs up)").wait_for()
        served = card.locator(".exp-output").get_attribute("data-variant")
        assert served in ("plain", "bridge")
        card.get_by_role("button", name="Good response (thumbs up)").click()
        card.locator(".feedback-status").get_by_text("created").wait_for()
        assert f"for variant {served}" in card.locator(".feedback-status").inner_text()
        row = card.locator(f'table.results-table tr[data-variant="{served}"]')
        page.wait_for_function("""([name, v]) => {
            const row = document.querySelector(`.experiment[data-experiment="${name}"] table.results-table tr[data-variant="${v}"]`);
            return row && row.querySelector("td.n").textContent === "1"; }""", arg=[name, served])
        assert "1/1" in row.inner_text()
        res = httpx.get(f"{server.url}/v1/experiments/{name}/results", headers=server.headers,
                        timeout=30).json()
        mine = next(v for v in res["variants"] if v["name"] == served)
        assert mine["n"] == 1 and mine["labels"] == {"n": 1, "good": 1, "good_rate": 1.0}
        assert "sample ratio p =" in card.inner_text()
        page.screenshot(path=str(screenshots / "ui-experiments.png"), full_page=True)
    finally:
        httpx.delete(f"{server.url}/v1/experiments/{name}", headers=server.headers, timeout=30)
