"""End to end on the real engine (session ``server``): a two-variant experiment, greedy outputs,
feedback and results (and their plot), streamed chunks, presets as model names, and the offline
``steer ab run``."""

from __future__ import annotations

import json
import uuid

import httpx
from markupsafe import escape

from clients.cli import main
from server.experiments import assign

MODEL = "SmolLM2-135M-Instruct"


def call(server, method, path, body=None):
    return httpx.request(method, f"{server.url}{path}", json=body, timeout=300,
                         headers={"authorization": f"Bearer {server.api_key}"})


def auth(server):
    return {"authorization": f"Bearer {server.api_key}"}


def test_experiment_end_to_end(server, tmp_path):
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

        # Streamed: the first chunk carries the experiment field, chat and text completions alike.
        for path, extra in (("/v1/chat/completions", {"messages": body["messages"]}),
                            ("/v1/completions", {"prompt": "Once upon a time"})):
            with httpx.stream("POST", f"{server.url}{path}", timeout=300, headers=auth(server), json={
                    "model": MODEL, "max_tokens": 4, "temperature": 0, "stream": True,
                    "user": users["pirate"][0], "steering": {"experiment": name}, **extra}) as s:
                assert s.status_code == 200 and s.headers["x-steer-variant"] == "pirate"
                events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[0])["experiment"] == {"name": name, "variant": "pirate"}, path

        # steer ab results --plot over real HTTP.
        png = tmp_path / "results.png"
        assert main(["ab", "results", name, "--url", server.url, "--api-key", server.api_key or "",
                     "--plot", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    finally:
        assert call(server, "DELETE", f"/v1/experiments/{name}").status_code == 200


def test_offline_run_real_engine(server, tmp_path, capsys):
    """``steer ab run``: 3 prompts through 2 variants with the same seeds on the real engine."""
    name = f"offline-{uuid.uuid4().hex[:8]}"
    spec = {"name": name, "variants": [{"name": "control", "control": True},
                                       {"name": "pirate", "preset": "pirate"}]}
    assert call(server, "POST", "/v1/experiments", spec).status_code == 200
    try:
        prompts = [{"id": "day", "prompt": "Tell me about your day."},
                   {"id": "cook", "prompt": "How do I boil an egg?"},
                   {"id": "city", "prompt": "Describe a city at night & its <lights>."}]
        pfile = tmp_path / "prompts.jsonl"
        pfile.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        out = tmp_path / "report"
        assert main(["ab", "run", "--experiment", name, "--prompts", str(pfile), "--url", server.url,
                     "--api-key", server.api_key or "", "--max-tokens", "12", "--seed", "7",
                     "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        page = (out / "report.html").read_text()

        from clients.eval.scorers import SCORERS

        by = {v["name"]: v for v in report["variants"]}
        assert set(by) == {"control", "pirate"} and by["control"]["n"] == by["pirate"]["n"] == 3
        for v in by.values():
            assert set(v["scores"]) == set(SCORERS)
            assert all(isinstance(v["scores"][s]["mean"], float) for s in SCORERS)
            assert 0 < v["mean_tokens"] <= 12
        assert set(by["pirate"]["scores"]["pirate"]["vs_control"]) == {"diff", "p_value"}
        texts = {(o["variant"], o["prompt_id"]): o["text"] for o in report["outputs"]}
        seeds = {(o["variant"], o["prompt_id"]): o["seed"] for o in report["outputs"]}
        for p in prompts:
            assert seeds[("control", p["id"])] == seeds[("pirate", p["id"])]
            assert texts[("control", p["id"])] != texts[("pirate", p["id"])], p["id"]

        assert page.count('data-variant="control"') == 2 and page.count('data-variant="pirate"') == 2
        for p in prompts:
            assert f'data-prompt="{p["id"]}"' in page
        assert "Describe a city at night &amp; its &lt;lights&gt;." in page
        for o in report["outputs"]:
            assert str(escape(o["text"])) in page  # Jinja2 autoescape (markupsafe)
        assert "pirate" in capsys.readouterr().out  # the summary table
        # Offline runs are not exposures of the live experiment.
        assert call(server, "GET", f"/v1/experiments/{name}/results").json()["n"] == 0
    finally:
        assert call(server, "DELETE", f"/v1/experiments/{name}").status_code == 200
