"""`steer bench --tiny`: the whole harness end to end (2 requests × 8 tokens) on the real engine.

This checks the harness and its report, not the speed: every scenario is present with finite,
positive numbers, each run generated exactly the tokens it asked for (the harness raises
otherwise), and the JSON, table and PNG are written. The server part uses the session's test
server (its unsteered requests are the baseline) rather than starting two more engines.
"""

from __future__ import annotations

import json
import math

from server import vllm_env
from clients.cli import main as steer_main


def test_steer_bench_tiny_writes_every_scenario(server, tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    rc = steer_main(["bench", "--tiny", "--out", str(out), "--url", server.url, "--api-key",
                     server.api_key])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    eng = res["engine"]["scenarios"]
    assert [r["scenario"] for r in eng] == ["S1", "S2", "S3_C1", "S3R_C1", "S4_K8"]
    for r in eng:
        assert r["tok_s"] > 0 and r["baseline_tok_s"] > 0
        assert math.isclose(r["ratio"], r["tok_s"] / r["baseline_tok_s"])
    assert eng[0]["same_engine_ratio"] is None  # S1 steers nothing: no same-engine control
    for r in eng[1:]:  # steered scenarios also ran their requests unsteered on the steering engine
        assert len(r["unsteered_samples"]) == 1 and r["same_engine_ratio"] > 0
        assert math.isclose(r["same_engine_ratio"], r["samples"][0] / r["unsteered_samples"][0])
    paired_hf = eng[1]["hf"]  # transformers timed next to S2's repeat
    assert paired_hf["tok_s"] > 0 and math.isclose(paired_hf["paired_ratio"], eng[1]["samples"][0] / paired_hf["samples"][0])
    s3 = eng[2]
    assert (s3["batch"], s3["steered_requests"], s3["distinct_configs"]) == (2, 1, 1)
    assert eng[0]["steered_requests"] == 0 and eng[1]["distinct_configs"] == 1
    assert (eng[3]["batch"], eng[3]["steered_requests"], eng[3]["distinct_configs"]) == (2, 1, 1)  # lowrank
    assert eng[4]["distinct_configs"] == 2  # distinct clamp per request

    hf = res["hf"]
    assert hf["batch"] == 2 and hf["tokens"] == 8 and hf["tok_s"] > 0

    lat = res["server"]["latency"]
    assert {(r["scenario"], r["concurrency"]) for r in lat} == {
        (s, c) for s in ("base", "S1", "S2", "S3") for c in (1, 2)}
    for r in lat:
        assert r["ttft_s"]["p50"] > 0 and r["itl_s"]["p50"] > 0 and r["itl_s"]["p99"] >= r["itl_s"]["p50"]
    s5 = res["server"]["s5"]
    assert set(s5["ttft_median_s"]) == {"unsteered", "named", "inline"}
    assert all(len(v) == 2 for v in s5["samples_s"].values())

    omp = res["openmp"]  # plugin-free engines with GNU and Intel OpenMP, taking turns
    if "skipped" in omp:  # no intel-openmp wheel on this platform
        assert vllm_env.intel_openmp_library() is None
    else:
        assert omp["gnu_tok_s"] > 0 and omp["intel_tok_s"] > 0
        assert math.isclose(omp["paired_ratio"], omp["intel_samples"][0] / omp["gnu_samples"][0])
        assert "libiomp5" in omp["mapped"]["intel"] and "libiomp5" not in omp["mapped"]["gnu"]

    claims = [row["claim"] for row in res["summary"]]
    assert any(c.startswith("S2 steered tok/s ÷ transformers+hooks") and c.endswith("paired runs") for c in claims)
    assert any(c.startswith("S2 steered tok/s over transformers+hooks") for c in claims)
    assert any(c.startswith("S4_K8 tok/s ÷ same requests unsteered") for c in claims)
    assert any(c.startswith("S5 TTFT") for c in claims)
    assert ("skipped" in omp) != any(c.startswith("no-plugin engine tok/s, Intel OpenMP") for c in claims)
    assert "steering benchmarks" in capsys.readouterr().out


def test_steer_bench_tiny_equalizers(tmp_path) -> None:
    """``--only equalizers``: the EQ part end to end on real engines (2 distinct equalizers on an
    engine with 2 slots): its rows, the slot memory, and the summary's judged claim."""
    out = tmp_path / "bench"
    assert steer_main(["bench", "--tiny", "--only", "equalizers", "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    eq = res["equalizers"]
    (row,) = eq["scenarios"]
    assert (row["scenario"], row["batch"], row["distinct_configs"], row["slots"]) == ("EQ_2", 2, 2, 2)
    assert row["tok_s"] > 0 and row["same_engine_ratio"] > 0 and row["paired_ratio"] > 0
    assert eq["slot_bytes"] == row["slot_bytes"] > 0
    claims = {r["claim"]: r for r in res["summary"]}
    judged = next(r for c, r in claims.items() if c.startswith("EQ_2: 2 distinct equalizers"))
    assert judged["target"] == ">= 0.97" and judged["met"] == (row["same_engine_ratio"] >= 0.97)
