"""The playground's 403 and 429 shown where they belong, with the keys of tests/ui/auth.yaml.

Each test starts like the other playground tests (the admin key typed in), then types a
``role: user`` key as a user would and meets the server's refusal: saving a preset (403 at
**Save as preset**), running past the key's rate limit or its ``max_slots`` (429 at **Run**, with
``Retry-After``). The page's text is compared with the server's own error for the same request.
Only the ``max_slots`` test generates: the stream that holds the key's slot and the pair's
unsteered request, both ended within seconds.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import httpx
from live import MODEL, metric

USER_KEY = "sk-steer-test-user"
"""``role: user`` without a policy: may generate, not save a preset (403)."""
LIMITED_KEY = "sk-steer-test-limited"
"""``role: user``, 1 request per minute: the request after loading the models is a 429."""
ONE_SLOT_KEY = "sk-steer-test-one-slot"
"""``role: user``, ``max_slots: 1``: a second steering configuration in flight is a 429."""
FEATURE = "smollm2-tone/golden_gate"
CHAT = "/v1/chat/completions"
OTHER_SLOTS = ("auth", "model", "search", f"steering.features.{FEATURE}", "preset", "messages",
               "max_tokens", "run", "inspect")


def _use_key(page: Any, key: str) -> int:
    """Type ``key`` into the API key field and press Enter; the status of the models reload."""
    with page.expect_response(lambda r: r.url.endswith("/v1/models")) as models:
        page.get_by_label("API key").fill(key)
        page.get_by_label("API key").press("Enter")
    return models.value.status


def _add_feature(page: Any, strength: str) -> None:
    page.get_by_label("Search features").fill("bridge")
    page.get_by_label("Search features").press("Enter")
    page.get_by_role("button", name=f"Add {FEATURE}").click()
    page.get_by_label(f"{FEATURE} strength (", exact=False).fill(strength)


def _shown(status: int, error: dict[str, Any], retry_after: str | None = None) -> str:
    """How the page words a server error (server/ui/errors.js ``describe``)."""
    text = f"{status} {error['code']}: {error['message']}"
    return text + (f" (retry after {retry_after} s)" if retry_after else "")


def _slot(page: Any, key: str) -> Any:
    return page.locator(f'[data-error-for="{key}"]')


def _others_empty(page: Any, *shown_at: str) -> None:
    for key in OTHER_SLOTS:
        if key not in shown_at and _slot(page, key).count():
            assert _slot(page, key).inner_text() == "", f"an error at {key!r} too"


def _steered(response: Any) -> bool:
    return "steering" in json.loads(response.request.post_data)


def _run(page: Any) -> dict[bool, Any]:
    """Click Run and wait until both panes have ended; the chat responses the page received, by
    whether the request was the steered one (an aborted request may have none)."""
    answered: list[Any] = []
    page.on("response", lambda r: answered.append(r) if r.url.endswith(CHAT) else None)
    page.get_by_role("button", name="Run side by side").click()
    page.wait_for_function("""() => ["out-base", "out-steered"].every(
        id => !["idle", "streaming"].includes(document.getElementById(id).dataset.state))""")
    return {_steered(r): r for r in answered}


def test_saving_a_preset_with_a_user_key_shows_the_403_at_save_as_preset(page, server):
    name = f"ui-denied-{uuid.uuid4().hex[:8]}"
    assert _use_key(page, USER_KEY) == 200  # a user key may read the models and search
    _add_feature(page, "0.5")
    page.get_by_label("Preset name").fill(name)
    with page.expect_response(lambda r: r.url.endswith("/v1/presets")) as saved:
        page.get_by_role("button", name="Save as preset").click()
    assert saved.value.status == 403
    error = _slot(page, "preset")
    page.wait_for_function("""() => document.querySelector('[data-error-for="preset"]')
                              .textContent.startsWith("403")""")
    # The same request from outside the page: the same refusal, and nothing was stored.
    r = httpx.post(f"{server.url}/v1/presets", timeout=30, headers={"Authorization": f"Bearer {USER_KEY}"},
                   json=json.loads(saved.value.request.post_data))
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", r.text
    assert error.inner_text() == _shown(403, r.json()["error"])
    assert "admin" in error.inner_text()
    _others_empty(page, "preset")
    assert page.locator("#preset-status").inner_text() == ""
    assert page.locator("#model").input_value() == MODEL  # no preset selected
    stored = httpx.get(f"{server.url}/v1/presets/{name}", headers=server.headers, timeout=30)
    assert stored.status_code == 404, stored.text


def test_a_spent_rate_limit_shows_the_429_at_run_with_retry_after(page, server):
    # Loading the models spends the key's one request of the minute (on a fresh server; an
    # external one may already have refused it, at the model list), so both requests of Run are
    # refused; the first refusal stops the pair, which may abort the other before its answer.
    from playwright.sync_api import Error as PlaywrightError

    models = _use_key(page, LIMITED_KEY)
    assert models in (200, 429)
    answered = _run(page)

    assert answered and all(r.status == 429 for r in answered.values()), answered
    expected = []
    for r in answered.values():
        retry_after = r.headers["retry-after"]
        try:
            error = r.json()["error"]
        except PlaywrightError:  # its headers came, then the other's refusal aborted it: no body
            continue
        assert error["code"] == "rate_limit_exceeded" and error["param"] is None, error
        assert re.fullmatch(r"Rate limit reached for this key: 1 requests per minute\. "
                            rf"Please try again in {retry_after}s\.", error["message"]), error
        expected.append(_shown(429, error, retry_after))
    assert expected  # the refusal the page shows was read, so its body is there
    assert _slot(page, "run").inner_text() in expected  # under the Run button
    _others_empty(page, "run", *(("model",) if models == 429 else ()))
    states = {page.locator(f"#out-{w}").get_attribute("data-state") for w in ("base", "steered")}
    assert "error" in states and states <= {"error", "aborted"}, states
    assert page.locator("#out-base").inner_text() == page.locator("#out-steered").inner_text() == ""
    assert page.get_by_role("button", name="Run side by side").is_enabled()


def test_a_second_steering_configuration_past_max_slots_shows_the_429_at_run(page, server):
    headers = {"Authorization": f"Bearer {ONE_SLOT_KEY}"}
    assert _use_key(page, ONE_SLOT_KEY) == 200
    _add_feature(page, "1")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_label("Heatmap after the run").uncheck()
    held = {"model": MODEL, "messages": [{"role": "user", "content": "Count to fifty."}],
            "max_tokens": 200, "ignore_eos": True, "stream": True,
            "steering": {"features": {FEATURE: {"strength": 0.5, "mode": "add"}}}}
    with httpx.Client(timeout=120) as client, \
            client.stream("POST", f"{server.url}{CHAT}", headers=headers, json=held) as holder:
        assert holder.status_code == 200  # admitted: the key's one slot is held until it ends
        refused = _run(page)[True]
        # The same steered request from outside the page while the slot is still held.
        again = client.post(f"{server.url}{CHAT}", headers=headers,
                            json=json.loads(refused.request.post_data))
    assert refused.status == 429 and again.status_code == 429, again.text
    error = refused.json()["error"]
    assert error == again.json()["error"]
    assert (error["code"], error["param"]) == ("steering_capacity_exceeded", "steering"), error
    assert refused.headers["retry-after"] == again.headers["retry-after"] == "1"
    assert _slot(page, "run").inner_text() == _shown(429, error, "1")
    _others_empty(page, "run")
    assert page.locator("#out-steered").get_attribute("data-state") == "error"
    assert page.locator("#out-base").get_attribute("data-state") in ("aborted", "done")  # the pair stops
    deadline = time.monotonic() + 30
    while metric(server, "steer_requests_running") != 0:
        assert time.monotonic() < deadline, "the held and the unsteered request still run"
        time.sleep(0.2)
