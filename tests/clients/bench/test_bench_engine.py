"""clients/bench/engine.py's scenario builder: what each engine scenario sends, without an engine."""

from __future__ import annotations

import pytest

from clients.bench.engine import EngineBenchConfig, equalizer_requests, s3_batch, scenarios, slot_table_bytes
from clients.bench.run import settings
from clients.cli import build_parser

D, LAYERS = 576, 30


def _hash(ea):
    return None if ea is None else next(iter(ea.values()))["hash"]


def test_s3_sweeps_up_to_the_slot_limit_with_half_the_batch_unsteered() -> None:
    c = EngineBenchConfig(model="unused", sweep=[4, 64, 300], max_slots=64, clamp_k=[8], only=["S3"])
    cfg, scen = scenarios(c, D, LAYERS)
    assert cfg.max_slots == 64
    assert list(scen) == ["S3_C4", "S3_C64"]  # 300 is capped at the slot limit, only S3 was asked for
    for n_cfg, name in ((4, "S3_C4"), (64, "S3_C64")):
        ea = scen[name]
        assert len(ea) == s3_batch(c) == 128
        assert ea[1::2] == [None] * 64  # every other request unsteered
        hashes = [_hash(x) for x in ea[0::2]]
        assert len(set(hashes)) == n_cfg
        assert hashes == [hashes[i % n_cfg] for i in range(64)]  # configs cycle over the steered half


def test_all_scenarios_by_default() -> None:
    c = EngineBenchConfig(model="unused", batch=2, sweep=[1], clamp_k=[8])
    _, scen = scenarios(c, D, LAYERS)
    assert list(scen) == ["S1", "S2", "S3_C1", "S3R_C1", "S4_K8"]


def test_s3r_sends_distinct_lowrank_configs_at_every_layer() -> None:
    c = EngineBenchConfig(model="unused", sweep=[4, 16], max_slots=64, clamp_k=[8], only=["S3R"])
    _, scen = scenarios(c, D, LAYERS)
    assert list(scen) == ["S3R_C16"]
    ea = scen["S3R_C16"]
    assert len(ea) == s3_batch(c) == 32 and ea[1::2] == [None] * 16
    assert len({_hash(x) for x in ea[0::2]}) == 16
    wire = next(iter(ea[0].values()))
    layers = wire["program"]["layers"]
    assert [x["layer"] for x in layers] == list(range(LAYERS)) and {x["k"] for x in layers} == {4}  # r = 4 rows


def test_bench_flags_for_slots_and_scenarios() -> None:
    p = build_parser()
    s = settings(p.parse_args(["bench", "--max-slots", "256", "--sweep", "16,256", "--scenarios", "s3,S2"]))
    assert (s["max_slots"], s["sweep"], s["scenarios"]) == (256, [16, 256], ["S3", "S2"])
    assert settings(p.parse_args(["bench"]))["scenarios"] is None
    assert settings(p.parse_args(["bench", "--scenarios", "s3r"]))["scenarios"] == ["S3R"]
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--scenarios", "S9"])


def test_eq_sends_n_distinct_equalizers_of_four_added_and_one_clamped_feature() -> None:
    cfg, ea = equalizer_requests(64, D, LAYERS, batch=32)
    assert (cfg.max_slots, len(ea), len({_hash(x) for x in ea})) == (32, 64, 64)
    for x in ea[:8]:  # 4 added features (an add row at their layers) and 1 clamp entry
        layers = next(iter(x.values()))["program"]["layers"]
        assert sum(row["k"] for row in layers) == 1
        assert sum(row.get("add") is not None for row in layers) in range(1, 5)  # shared layers sum
    # a slot's own tables per layer, bfloat16: add [d]; per condition its bank row (int64),
    # threshold and sign; per entry its bank row and condition (int64), alpha and beta: O(K + C)
    slot, bank = slot_table_bytes(cfg, D, LAYERS, "bfloat16")
    C, K = 4, cfg.max_features
    assert slot / LAYERS == 2 * D + C * (8 + 2 + 2) + K * (8 + 8 + 2 + 2)
    # the bank: enc/dec [F, d] and bias/cut [F], F = bank_features + the null column
    assert bank / LAYERS == (cfg.bank_features + 1) * 2 * (2 * D + 2)
    assert slot_table_bytes(cfg, D, LAYERS, "float32")[0] > slot


def test_bench_flags_for_equalizers() -> None:
    p = build_parser()
    s = settings(p.parse_args(["bench", "--equalizers", "16,256", "--equalizer-batch", "128"]))
    assert (s["equalizers"], s["equalizer_batch"]) == ([16, 256], 128)
    s = settings(p.parse_args(["bench", "--tiny"]))
    assert (s["equalizers"], s["equalizer_batch"]) == ([2], 2)
