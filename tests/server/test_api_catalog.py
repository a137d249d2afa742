"""Feature catalog, inspect and named-feature steering over HTTP with the bundled packs."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

MODEL = "SmolLM2-135M-Instruct"
TONE = ["formality", "positivity", "enthusiasm", "hedging", "verbosity", "humor", "pirate",
        "french", "golden_gate", "refusal", "code"]


def get(server, path, **params):
    return httpx.get(f"{server.url}{path}", params=params, timeout=120,
                     headers={"authorization": f"Bearer {server.api_key}"})


def post(server, path, body):
    return httpx.post(f"{server.url}{path}", json=body, timeout=300,
                      headers={"authorization": f"Bearer {server.api_key}"})


def test_packs_listed_with_fingerprint(server):
    r = get(server, "/v1/packs")
    assert r.status_code == 200
    packs = {p["name"]: p for p in r.json()["data"]}
    assert {"smollm2-tone", "smollm2-sae-l12"} <= set(packs)
    fp = packs["smollm2-tone"]["model"]["fingerprint"]
    assert fp["hidden_size"] == 576 and fp["num_layers"] == 30
    assert packs["smollm2-sae-l12"]["saes"][0]["d_sae"] == 4608


def test_features_filter_and_paginate(server):
    all_ = get(server, "/v1/features", pack="smollm2-tone", limit=500).json()
    assert {f["name"] for f in all_["data"]} == set(TONE) and all_["total"] == 11
    page = get(server, "/v1/features", pack="smollm2-tone", limit=4, offset=8).json()
    assert [f["id"] for f in page["data"]] == [f["id"] for f in all_["data"][8:12]]
    assert page["has_more"] is False and len(page["data"]) == 3
    assert get(server, "/v1/features", limit=2).json()["has_more"] is True
    at12 = get(server, "/v1/features", layer=12, limit=500).json()["data"]
    assert at12 and all(f["layer"] == 12 for f in at12)
    r = get(server, "/v1/features", pack="nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "pack"


def test_feature_lookup_and_search(server):
    f = get(server, "/v1/features/smollm2-tone/golden_gate").json()
    assert f["layer"] == 10 and f["kind"] == "direction" and f["calibration"]["scale"] > 0
    assert get(server, "/v1/features/golden_gate").json()["id"] == "smollm2-tone/golden_gate"
    r = get(server, "/v1/features/no_such_feature")
    assert r.status_code == 404 and r.json()["error"]["param"] == "name"
    hits = get(server, "/v1/features/search", q="bridge").json()["data"]
    assert hits and hits[0]["id"] == "smollm2-tone/golden_gate"


def test_named_feature_steering_changes_output_and_echoes(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about your day."}],
            "max_tokens": 24, "temperature": 0, "return_token_ids": True}
    base = post(server, "/v1/chat/completions", body).json()
    steered = post(server, "/v1/chat/completions", {**body, "steering": {"features": {"pirate": 1.0}}})
    assert steered.status_code == 200
    s = steered.json()
    assert s["steering"]["applied"] == [{"feature": "smollm2-tone/pirate", "layer": 10, "mode": "add",
                                         "strength": 1.0}]
    assert s["choices"][0]["token_ids"] != base["choices"][0]["token_ids"]


def test_named_clamp_holds_on_every_token(server):
    c = get(server, "/v1/features/golden_gate").json()["calibration"]["scale"]
    body = {"model": MODEL, "prompt": "Tell me about your day.", "max_tokens": 8, "temperature": 0,
            "return_token_ids": True, "ignore_eos": True,
            "steering": {"features": {"golden_gate": {"strength": 0.5, "mode": "clamp"},
                                      "formality": 0.3},
                         "return_activations": True}}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    acts = out["steering"]["activations"]
    n_prompt = len(out["prompt_token_ids"])
    assert sorted(a["position"] for a in acts) == list(range(n_prompt + 8 - 1))
    for a in acts:
        assert a["layer"] == 10
        assert a["features"]["smollm2-tone/golden_gate"] == pytest.approx(0.5 * c, abs=1e-2)
        assert "smollm2-tone/formality" in a["features"]  # add-mode feature, read from the stream


def test_inspect_reports_sae_latents_and_features(server):
    bridge = post(server, "/v1/features/inspect", {
        "text": "We walked across the Golden Gate Bridge in San Francisco at sunset.",
        "features": ["golden_gate", "french"], "top_k": 5})
    assert bridge.status_code == 200, bridge.text
    b = bridge.json()
    assert b["layers"] == [10, 12]
    toks = b["tokens"]
    assert [t["position"] for t in toks] == list(range(len(toks)))
    for t in toks[1:]:
        lat = t["sae"]["smollm2-sae-l12/L12"]
        assert 0 < len(lat) <= 5
        assert all(x["act"] > 0 and isinstance(x["label"], str) for x in lat)
        assert [x["act"] for x in lat] == sorted((x["act"] for x in lat), reverse=True)
    neutral = post(server, "/v1/features/inspect", {
        "text": "The recipe needs two cups of flour and a pinch of salt.", "features": ["golden_gate"],
        "top_k": 1}).json()
    gg = lambda res: np.mean([t["features"]["golden_gate"] for t in res["tokens"][1:]])  # noqa: E731
    assert gg(b) > gg(neutral) + 5.0


def test_inspect_under_steering_shows_the_clamp(server):
    r = post(server, "/v1/features/inspect", {
        "text": "Hello there, how are you?", "features": ["smollm2-tone/positivity"], "layers": [12],
        "steering": {"features": {"positivity": {"strength": -0.5, "mode": "clamp"}}}})
    assert r.status_code == 200, r.text
    c = get(server, "/v1/features/positivity").json()["calibration"]["scale"]
    for t in r.json()["tokens"]:
        assert t["features"]["smollm2-tone/positivity"] == pytest.approx(-0.5 * c, abs=1e-2)


@pytest.mark.parametrize("body,status,param", [
    ({"text": "hi", "features": ["nope"]}, 400, "features[0]"),
    ({"text": "hi", "layers": [3]}, 400, "layers"),
    ({"features": ["golden_gate"]}, 400, "messages"),
    ({"text": "hi", "features": ["golden_gate"], "model": "other"}, 404, "model"),
])
def test_inspect_bad_input(server, body, status, param):
    r = post(server, "/v1/features/inspect", body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
