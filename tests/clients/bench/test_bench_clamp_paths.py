"""clients/bench/clamp_paths.py in a tiny grid: both clamp paths timed on every cell, and they agree."""

from __future__ import annotations

import json

import torch

from clients.bench.clamp_paths import main, run
from steering.worker import runtime


def test_tiny_grid_times_both_paths_and_they_agree(tmp_path) -> None:
    out = tmp_path / "paths.json"
    assert main(["--d", "16", "--tokens", "1,5", "--slots", "2,6", "--k", "3", "--dtype", "float32",
                 "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["tokens"], r["n_hi"]) for r in res["rows"]] == [(1, 2), (1, 6), (5, 2), (5, 6)]
    for r in res["rows"]:
        assert r["columns_us"] > 0 and r["gathered_us"] > 0
        assert r["max_abs_diff"] < 1e-4
    saved = runtime.GATHER_COLUMNS_PER_ENTRY  # run() flips the module constant while timing, then restores it
    run(8, [2], [3], [2], torch.float32, 1, log=lambda _: None)
    assert runtime.GATHER_COLUMNS_PER_ENTRY == saved
