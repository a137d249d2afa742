"""The feature bank: distinct equalizers cost coefficients, not copies of feature rows.

256 distinct configurations steered in one batch equal their solo runs row for row (float32)
and the documented semantics (float64 reference); rows are shared by content and freed when the
last slot using them lets go; a full bank first drops rows only idle slots hold, and past that
fails the one request that does not fit (unseated), never the others."""

from __future__ import annotations

import numpy as np
import torch

from steering.config import SteeringConfig
from steering.features import Feature, StaticFeatureSource
from steering.request import SteeringCompiler
from steering.worker.bank import FeatureBank
from steering.worker.runtime import SteeringRuntime
from steering.wire import WireRecord
from tests.steering.test_runtime import reference, run_step

D, L, N_FEATURES = 32, 4, 11


def pack() -> StaticFeatureSource:
    rng = np.random.default_rng(7)
    feats = [Feature(f"eq/f{i}", 1 + i % 3, "direction", rng.standard_normal(D), scale=2.0)
             for i in range(N_FEATURES - 1)]
    feats.append(Feature("eq/sae", 2, "sae", rng.standard_normal(D), encoder=rng.standard_normal(D),
                         bias=0.1, threshold=0.2))
    return StaticFeatureSource(feats)


def equalizers(n: int, slots: int, seed: int = 1):
    """n distinct configurations: 4 features added and 1 clamped, strengths of their own."""
    comp = SteeringCompiler(SteeringConfig(max_slots=slots), D, L, pack())
    names = [f"f{i}" for i in range(N_FEATURES - 1)] + ["sae"]
    rng, out, seen = np.random.default_rng(seed), [], set()
    while len(out) < n:
        pick = rng.choice(names, size=5, replace=False)
        spec = {str(f): round(float(rng.uniform(-1.5, 1.5)), 4) for f in pick[:4]}
        spec[str(pick[4])] = {"mode": "clamp", "strength": round(float(rng.uniform(-1.5, 1.5)), 4)}
        c = comp.compile({"features": spec})
        if c.table_hash not in seen:
            seen.add(c.table_hash)
            out.append(c)
    return out


def make_runtime(slots: int, bank: int = 64, dtype=torch.float32) -> SteeringRuntime:
    return SteeringRuntime(SteeringConfig(max_slots=slots, max_features=4, bank_features=bank),
                           num_layers=L, hidden_size=D, max_tokens=1024, dtype=dtype,
                           device=torch.device("cpu"), host_gating=True)


def step(rt: SteeringRuntime, slots: list[int], n_sched: list[int], x: torch.Tensor) -> torch.Tensor:
    """The stream after every layer's op, for requests on ``slots`` (one-tensor layers)."""
    R, h = len(slots), x.clone()
    for layer in range(L):
        run_step(rt, slots, n_sched, [0] * R, [10**6] * R, [0] * R, h, None, layer)
    return h


def admit(rt: SteeringRuntime, rid: str, compiled) -> int:
    rs = rt.admit(rid, WireRecord.from_extra_args(compiled.extra_args()))
    assert not rs.unseated
    return rs.slot


def test_256_distinct_equalizers_in_one_batch_equal_their_solo_runs() -> None:
    n, per = 256, 2
    eqs = equalizers(n, n)
    rt = make_runtime(n)
    slots = [admit(rt, f"r{i}", c) for i, c in enumerate(eqs)]
    assert sorted(slots) == list(range(1, n + 1))
    # 256 configurations, but each layer's bank holds only the rows of the clamped features there
    # (a direction's row is shared whatever its strength; adds are each slot's own add row)
    for layer, bank in rt.banks.items():
        assert bank.used <= N_FEATURES, (layer, bank.used)
    assert sum(b.used for b in rt.banks.values()) >= 3
    x = torch.randn(n * per + 5, D, generator=torch.Generator().manual_seed(3)) * 4
    together = step(rt, [0, *slots], [5] + [per] * n, x)
    assert torch.equal(together[:5], x[:5])  # unsteered rows: bit for bit
    for i, (slot, c) in enumerate(zip(slots, eqs)):
        rows = slice(5 + i * per, 5 + (i + 1) * per)
        solo = step(rt, [slot], [per], x[rows])
        torch.testing.assert_close(together[rows], solo, rtol=1e-5, atol=1e-5)
        for t in range(per):  # and the documented semantics, layer after layer
            want = x[rows][t].double().numpy()
            for layer in range(L):
                want = reference(c.program, want, layer)
            np.testing.assert_allclose(together[rows][t].numpy(), want, rtol=1e-4, atol=1e-4)


def test_rows_are_shared_by_content_and_freed_with_their_last_slot() -> None:
    comp = SteeringCompiler(SteeringConfig(max_slots=4), D, L, pack())
    a = comp.compile({"features": {"f0": {"mode": "clamp", "strength": 1.0}}})
    b = comp.compile({"features": {"f0": {"mode": "clamp", "strength": -0.5},
                                   "f3": {"mode": "scale", "strength": 2.0}}})  # f0, f3: layer 1
    rt = make_runtime(4)
    sa, sb = admit(rt, "a", a), admit(rt, "b", b)
    bank, tab = rt.banks[1], rt.tables[1]
    assert bank.used == 2 and bank.hi == 3  # f0's row once, f3's once; column 0 is the null row
    assert tab.col[sa, 0] == tab.col[sb, 0] and tab.beta[sa, 0] != tab.beta[sb, 0]
    f3 = int(tab.col[sb, 1])
    rt.release(["b"])  # the slot keeps its program for reuse: rows stay
    assert bank.used == 2
    rt._clear_slot(sb)  # dropped: f3's row is nobody's now and is zeroed; f0's stays for slot a
    assert bank.used == 1 and bank.hi == 2 and torch.count_nonzero(tab.enc[f3]) == 0
    assert tab.cut[f3] == float("-inf") and torch.count_nonzero(tab.enc[tab.col[sa, 0]]) > 0


def test_a_full_bank_drops_idle_rows_then_fails_only_the_request_that_does_not_fit() -> None:
    comp = SteeringCompiler(SteeringConfig(max_slots=4), D, L, StaticFeatureSource([]))
    rng = np.random.default_rng(5)

    def clamp_two():  # two fresh rows at layer 1
        return comp.compile({"vectors": [
            {"layer": 1, "values": rng.standard_normal(D).tolist(), "mode": "clamp", "target": 1.0},
            {"layer": 1, "values": rng.standard_normal(D).tolist(), "mode": "ablate"}]})

    rt = make_runtime(4, bank=4)
    p1, p2, p3 = clamp_two(), clamp_two(), clamp_two()
    admit(rt, "r1", p1)
    s2 = admit(rt, "r2", p2)
    assert rt.banks[1].used == 4
    rt.release(["r1"])  # slot s1 idle, its rows kept for reuse
    s3 = admit(rt, "r3", p3)  # the bank is full: r1's idle rows are dropped for it
    assert rt.banks[1].used == 4 and s3 != s2
    assert rt.allocator.acquire("again", p1.table_hash)[1]  # p1 must be written again
    rt.allocator.release("again")
    # now every row is held by a running request: the next new configuration cannot fit
    rs = rt.admit("r4", WireRecord.from_extra_args(clamp_two().extra_args()))
    assert rs.unseated and rs.slot == 0 and rt.take_unseated(["r4"]) == ["r4"]
    assert rt.banks[1].used == 4  # nothing of the refused program stayed
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    for slot, p in ((s2, p2), (s3, p3)):  # the running ones still steer exactly as alone
        got = step(rt, [slot], [4], x)
        for t in range(4):
            want = x[t].double().numpy()
            for layer in range(L):
                want = reference(p.program, want, layer)
            np.testing.assert_allclose(got[t].numpy(), want, rtol=1e-5, atol=1e-5)


def test_bank_hands_out_the_lowest_free_column_and_tracks_its_high_water() -> None:
    bank = FeatureBank(4)
    assert [bank.acquire(k)[0] for k in (b"a", b"b", b"c")] == [1, 2, 3] and bank.hi == 4
    assert bank.acquire(b"b") == (2, False)
    assert not bank.release(2) and bank.release(2)  # two references
    assert bank.hi == 4 and bank.acquire(b"d") == (2, True)  # the hole is reused first
    assert bank.release(3) and bank.hi == 3
    assert not bank.release(0)  # the null column is never handed out or freed


def test_a_condition_reads_a_bank_row_shared_by_every_slot_with_that_condition() -> None:
    comp = SteeringCompiler(SteeringConfig(max_slots=4), D, L, pack())
    a, b = (comp.compile({"features": {"f0": {"mode": "clamp", "strength": s,
                                              "when": {"feature": "f3", "above": th}}}})
            for s, th in ((1.0, 0.3), (-1.0, 0.9)))  # f0 and f3 both at layer 1
    rt = make_runtime(4)
    sa, sb = admit(rt, "a", a), admit(rt, "b", b)
    tab = rt.tables[1]
    assert rt.banks[1].used == 2  # f0's entry row and f3's readout row, each once
    assert tab.ccol[sa, 0] == tab.ccol[sb, 0] != 0 and tab.cthr[sa, 0] != tab.cthr[sb, 0]
    assert torch.count_nonzero(tab.dec[tab.ccol[sa, 0]]) == 0  # a readout writes nothing
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(2)) * 4
    got = step(rt, [sa, sb], [3, 3], x)
    seen = set()
    for rows, p in ((slice(0, 3), a), (slice(3, 6), b)):
        (cond,) = p.program.conditions
        for t in range(3):  # the gate as the semantics say: f3's readout at layer 1, before steering
            want = x[rows][t].double().numpy()
            pre = float(cond.enc.astype(np.float64) @ want) + cond.bias
            act = 0.0 if cond.rectify and pre <= cond.theta else pre
            fired = cond.sign * (act - cond.threshold) > 0
            seen.add(fired)
            want = reference(p.program, want, 1) if fired else want
            np.testing.assert_allclose(got[rows][t].numpy(), want, rtol=1e-5, atol=1e-5)
    assert seen == {True, False}  # both sides of a gate were exercised
