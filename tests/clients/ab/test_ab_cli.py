"""``steer ab results``: the command prints a server's results body (HTTP faked, no engine)."""

from __future__ import annotations

from server.experiments.stats import results


def test_cli_prints_results(monkeypatch, capsys):
    import httpx

    from clients.cli import main

    spec = {"name": "e", "status": "running", "variants": [
        {"name": "control", "weight": 1.0, "control": True}, {"name": "t", "weight": 1.0}]}
    obs = [{"variant": v, "generated_tokens": 5, "latency_s": 0.2, "score": s, "label": None}
           for v, s in (("control", 1.0), ("control", 2.0), ("t", 4.0), ("t", 5.0))]
    seen = {}

    def fake_get(url, headers, timeout):
        seen["url"], seen["headers"] = url, headers
        return httpx.Response(200, json=results(spec, obs))

    monkeypatch.setattr(httpx, "get", fake_get)
    assert main(["ab", "results", "e", "--url", "http://x:1/", "--api-key", "k"]) == 0
    out = capsys.readouterr().out
    assert seen["url"] == "http://x:1/v1/experiments/e/results"
    assert seen["headers"] == {"authorization": "Bearer k"}
    assert "control (control)" in out and "sample ratio check" in out

    monkeypatch.setattr(httpx, "get", lambda *a, **k: httpx.Response(
        404, json={"error": {"message": "no experiment named 'e'"}}))
    assert main(["ab", "results", "e"]) == 1
