"""clients/bench/bank_op.py on tiny sizes: it times the real op on real admitted equalizers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from clients.bench import bank_op

ROOT = Path(__file__).resolve().parents[3]
BEFORE_BANK = "98f5c6f~1"  # the slot-stacked op, the baseline docs/benchmarks.md reports


def test_tiny_run_reports_every_row_and_the_shared_bank(tmp_path) -> None:
    out = tmp_path / "op.json"
    assert bank_op.main(["--n", "6", "--d", "16", "--layers", "4", "--tokens-per-seq", "1,2",
                         "--repeats", "1", "--rounds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["tokens"]) for r in rows] == [("this", 6), ("this", 12)]
    for r in rows:
        assert r["ms_per_step"] > 0 and 1 <= r["bank_rows"] <= 6  # clamps share pack rows


def test_before_revision_is_timed_from_git(tmp_path) -> None:
    have = subprocess.run(["git", "cat-file", "-e", f"{BEFORE_BANK}^{{commit}}"], cwd=ROOT,
                          capture_output=True).returncode == 0
    if not have:
        pytest.skip("a shallow clone without the revision before the bank")
    out = tmp_path / "op.json"
    assert bank_op.main(["--n", "3", "--d", "16", "--layers", "3", "--tokens-per-seq", "1",
                         "--repeats", "1", "--rounds", "1", "--before", BEFORE_BANK,
                         "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["bank_rows"] > 0) for r in rows] == [("this", True), ("before", False)]
