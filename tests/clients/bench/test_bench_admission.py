"""`python -m clients.bench.admission` against the session's server: one burst of 2 per scenario.

Checks the harness (every scenario timed, overheads are differences of the medians, header
times precede first-token times), not the speed."""

from __future__ import annotations

import json
import math

from clients.bench.admission import SCENARIOS, main, micro


def test_admission_probe_times_every_scenario(server, tmp_path, capsys) -> None:
    out = tmp_path / "adm.json"
    assert main(["--url", server.url, "--api-key", server.api_key, "--concurrency", "2",
                 "--bursts", "1", "--idle", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    runs = res["runs"][server.url]
    assert set(runs) == set(SCENARIOS) and all(len(v) == 1 for v in runs.values())
    for r in (rs[0] for rs in runs.values()):
        assert 0 < r["headers_p50"] <= r["first_p50"] and r["headers_max"] <= r["first_max"]
    s = res["summary"][server.url]
    for sc in ("S2", "S3"):
        want = (runs[sc][0]["first_p50"] - runs["none"][0]["first_p50"]) * 1e3
        assert math.isclose(s["overhead_ms"][sc]["first_p50"], want)
    assert f"{server.url} S3 − none at c=2" in capsys.readouterr().out


def test_micro_times_compile_and_slot_write() -> None:
    res = micro(repeats=1, n=2, d=16, layers=3)
    assert set(res) == {"compile_base64_ms", "compile_values_ms", "slot_write_ms"}
    assert all(v > 0 and math.isfinite(v) for v in res.values())
