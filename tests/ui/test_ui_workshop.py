"""The playground's "New feature" panel (issue #31) in headless chromium against the real server:
a bad name is refused beside its field with nothing started; eight example pairs (the README's
docs/examples/workshop-ocean.json) make ``custom/<name>`` through the server's workshop with a
live progress bar, the dose curve drawn from the job's calibration record, and the feature put on
the equalizer, where a steered run uses it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx

OCEAN = json.loads((Path(__file__).parents[2] / "docs/examples/workshop-ocean.json").read_text())
JOB_TIMEOUT_MS = 900_000  # training and calibrating on a loaded 2-core CPU


def _fill(page, name: str) -> None:
    page.get_by_label("Feature name").fill(name)
    page.get_by_label("Description").fill(OCEAN["description"])
    page.get_by_label("Example pairs (optional)").fill(
        "\n".join(f"{e['positive']} || {e['negative']}" for e in OCEAN["examples"]))
    page.get_by_label("Method").select_option("mean_diff")


def test_new_feature_panel_trains_calibrates_and_adds_the_feature(page, server, screenshots):
    _fill(page, "no/slash")
    page.get_by_role("button", name="Start").click()
    err = page.locator('#workshop [data-error-for="name"]')
    err.wait_for()
    assert "400" in err.text_content() and "name" in err.text_content()
    assert page.locator("#workshop-progress").is_hidden()

    name = f"uiocean{uuid.uuid4().hex[:6]}"
    _fill(page, name)
    page.get_by_role("button", name="Start").click()
    page.locator("#workshop-progress").wait_for()
    assert err.text_content() == ""
    page.get_by_role("status").filter(has_text="running").wait_for(timeout=JOB_TIMEOUT_MS)
    try:
        page.locator("#workshop-result svg.dose-curve").wait_for(timeout=JOB_TIMEOUT_MS)
        feature = f"custom/{name}"
        page.locator(f'.slider[data-feature="{feature}"]').wait_for()
        assert page.locator("#workshop-progress").get_attribute("value") == "1"
        # the curve drawn is the job's record
        entry = httpx.get(f"{server.url}/v1/features/{feature}", headers=server.headers, timeout=30).json()
        curve = entry["calibration"]["effect"]["curve"]
        title = page.locator("#workshop-result svg.dose-curve title").text_content()
        for row in curve:
            assert f"strength {row['strength']:g}: score {row['score']:g}" in title  # JS number text
        assert page.locator("#workshop-result svg polyline").count() == 2
        # a steered run with the new feature at strength 1
        page.get_by_label(f"{feature} strength (", exact=False).fill("1")
        page.screenshot(path=str(screenshots / "ui-workshop.png"), full_page=True)
        page.get_by_role("button", name="Run side by side").click()
        page.wait_for_function("""() => ["out-base", "out-steered"].every(
            id => document.getElementById(id).dataset.state === "done")""")
        assert page.locator("#out-steered").text_content() != page.locator("#out-base").text_content()
    finally:
        httpx.delete(f"{server.url}/v1/features/custom/{name}", headers=server.headers, timeout=30)
    assert 'steer_workshop_jobs_total{status="done"}' in httpx.get(f"{server.url}/metrics", timeout=30).text
