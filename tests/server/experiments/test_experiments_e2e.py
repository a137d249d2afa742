"""End to end on the real engine (session ``server``): a two-variant experiment, greedy outputs,
feedback and results, and presets as model names."""

from __future__ import annotations

import uuid

import httpx

from server.experiments import assign

MODEL = "SmolLM2-135M-Instruct"


def call(server, method, path, body=None):
    return httpx.request(method, f"{server.url}{path}", json=body, timeout=300,
                         headers={"authorization": f"Bearer {server.api_key}"})


def test_experiment_end_to_end(server):
    name = f"tone-{uuid.uuid4().hex[:8]}"  # the server's data directory may outlive the test
    spec = {"name": name, "unit": "user", "variants": [
        {"name": "control", "control": True, "weight": 1},
        {"name": "pirate", "preset": "pirate", "weight": 1}]}
    r = call(server, "POST", "/v1/experiments", spec)
    assert r.status_code == 200, r.text
    try:
        users = {v: [f"u{i}" for i in range(200) if assign.assign(name, f"user:u{i}", [1, 1]) == k][:2]
                 for k, v in enumerate(("control", "pirate"))}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about your day."}],
                "max_tokens": 16, "temperature": 0, "steering": {"experiment": name}}
        outputs, ids = {}, {}
        for variant, us in users.items():
            for u in us:
                r = call(server, "POST", "/v1/chat/completions", {**body, "user": u})
                assert r.status_code == 200, r.text
                assert r.headers["x-steer-experiment"] == name
                assert r.headers["x-steer-variant"] == variant
                out = r.json()
                assert out["experiment"] == {"name": name, "variant": variant}
                outputs.setdefault(variant, set()).add(out["choices"][0]["message"]["content"])
                ids.setdefault(variant, []).append(out["id"])
        assert len(outputs["control"]) == 1 and len(outputs["pirate"]) == 1  # greedy, sticky
        assert outputs["control"] != outputs["pirate"]

        # The preset as a model name steers the same way as the pirate variant.
        r = call(server, "POST", "/v1/chat/completions",
                 {**{k: v for k, v in body.items() if k != "steering"}, "model": f"{MODEL}:pirate"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in outputs["pirate"]

        for variant, score in (("control", [1.0, 1.5]), ("pirate", [4.0, 4.5])):
            for rid, s in zip(ids[variant], score):
                r = call(server, "POST", f"/v1/experiments/{name}/feedback",
                         {"response_id": rid, "score": s, "label": "good" if s > 3 else "bad"})
                assert r.status_code == 200, r.text
        res = call(server, "GET", f"/v1/experiments/{name}/results").json()
        by = {v["name"]: v for v in res["variants"]}
        assert by["control"]["n"] == 2 and by["pirate"]["n"] == 2
        assert by["pirate"]["score"]["mean"] == 4.25 and by["pirate"]["score"]["ci95"][0] is not None
        assert by["pirate"]["generated_tokens"]["p50"] > 0 and by["pirate"]["latency_s"]["p95"] > 0
        vs = by["pirate"]["vs_control"]
        assert vs["score_diff"] == 3.0 and 0 < vs["score_p_value"] < 0.05
        assert vs["good_rate_diff"] == 1.0 and vs["good_rate_p_value"] is not None
        metrics = httpx.get(f"{server.url}/metrics").text
        assert f'steer_experiment_requests_total{{experiment="{name}",variant="pirate"}} 2.0' in metrics
    finally:
        assert call(server, "DELETE", f"/v1/experiments/{name}").status_code == 200
