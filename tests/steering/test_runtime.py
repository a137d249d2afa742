"""The batched op against a per-token reference of the documented semantics."""

import numpy as np
import pytest
import torch

from steering.config import SteeringConfig
from steering.features import Feature, StaticFeatureSource
from steering.request import SteeringCompiler
from steering.worker import readouts, runtime
from steering.worker.runtime import SteeringRuntime, set_runtime
from steering.wire import WireRecord

D, L, S, K = 12, 3, 4, 3


def reference(program, x, layer):
    """x [d] float64 → x after the program at layer (the module docstring's semantics)."""
    lp = program.layers.get(layer)
    if lp is None:
        return x
    if lp.add is not None:
        x = x + lp.add
    delta = np.zeros_like(x)
    for k in range(lp.num_entries):
        pre = float(lp.enc[k] @ x) + lp.bias[k]
        act = 0.0 if (lp.rectify[k] and pre <= lp.theta[k]) else pre
        delta += (lp.alpha[k] * act + lp.beta[k]) * lp.dec[k].astype(np.float64)
    return x + delta


def make_runtime(host_gating=True):
    return SteeringRuntime(
        SteeringConfig(max_slots=S, max_features=K), num_layers=L, hidden_size=D, max_tokens=64,
        dtype=torch.float64, device=torch.device("cpu"), host_gating=host_gating,
    )


def programs():
    rng = np.random.default_rng(3)
    feats = StaticFeatureSource(
        [
            Feature("f/dir", 1, "direction", rng.standard_normal(D), scale=2.0),
            Feature("f/sae", 1, "sae", rng.standard_normal(D), encoder=rng.standard_normal(D),
                    bias=0.1, threshold=0.3),
        ]
    )
    c = SteeringCompiler(SteeringConfig(max_slots=S, max_features=K), D, L, feats)
    v = rng.standard_normal(D)
    return [
        c.compile({"vectors": [{"layer": 1, "values": v.tolist(), "scale": 0.7}]}),
        c.compile({"features": {"dir": {"strength": 1.5, "mode": "clamp"}, "sae": {"strength": 2.0, "mode": "clamp"}}}),
        c.compile({"features": {"dir": {"strength": 3.0, "mode": "scale"}},
                   "vectors": [{"layer": 1, "values": v.tolist(), "mode": "ablate"},
                               {"layer": 2, "values": v.tolist()}]}),
    ]


def run_step(rt, slots_per_req, n_sched, computed, prompt, apply_to, h, r, layer, readout=()):
    rt.begin_step(np.array(slots_per_req), np.array(apply_to), np.array(n_sched),
                  np.array(computed), np.array(prompt), list(readout))
    set_runtime(rt)
    try:
        torch.ops.steering.steer_(h, r, layer)
    finally:
        set_runtime(None)
        rt.end_step()


@pytest.mark.parametrize("host_gating,gather", [(True, False), (True, True), (False, False)])
def test_mixed_batch_matches_reference(host_gating, gather, monkeypatch):
    if gather:  # every step takes the gathered clamp path, in blocks of 2 tokens
        monkeypatch.setattr(runtime, "GATHER_COLUMNS_PER_ENTRY", 0)
        monkeypatch.setattr(runtime, "GATHER_CHUNK", 2)
    rt = make_runtime(host_gating)
    progs = programs()
    slots = []
    for i, p in enumerate(progs):
        slot, fresh = rt.allocator.acquire(f"r{i}", p.table_hash)
        assert fresh
        rt.write_slot(slot, p.program)
        slots.append(slot)
    # requests: unsteered, prog0, prog1, prog2, prog1 again (shared slot)
    req_slots = [0, slots[0], slots[1], slots[2], slots[1]]
    req_prog = [None, progs[0], progs[1], progs[2], progs[1]]
    n_sched = [3, 2, 1, 4, 1]
    T = sum(n_sched)
    for layer in range(L):
        h = torch.randn(T, D, dtype=torch.float64)
        r = torch.randn(T, D, dtype=torch.float64)
        x0 = (h + r).numpy().copy()
        run_step(rt, req_slots, n_sched, [0] * 5, [100] * 5, [0] * 5, h, r, layer)
        got = (h + r).numpy()
        t = 0
        for prog, n in zip(req_prog, n_sched):
            for _ in range(n):
                want = x0[t] if prog is None else reference(prog.program, x0[t], layer)
                # tables hold float32: the reference rounds the same way except the summed add vector
                np.testing.assert_allclose(got[t], want, rtol=1e-6, atol=1e-6)
                t += 1


def test_a_full_bank_takes_the_gathered_path_and_keeps_the_semantics(monkeypatch):
    """Past GATHER_COLUMNS_PER_ENTRY used bank columns per entry a token reads, entries are
    computed from each token's gathered bank rows, in blocks of GATHER_CHUNK tokens; the result
    is the reference's, and slot-0 tokens stay exact."""
    n = 2 * runtime.GATHER_COLUMNS_PER_ENTRY + 6  # distinct raw clamp vectors: one bank row each;
    # the scale + ablate program below reads 2 entries at layer 1
    rt = SteeringRuntime(SteeringConfig(max_slots=n + 1, max_features=K), num_layers=L,
                         hidden_size=D, max_tokens=2 * runtime.GATHER_CHUNK + 64,
                         dtype=torch.float64, device=torch.device("cpu"), host_gating=True)
    rng = np.random.default_rng(11)
    c = SteeringCompiler(SteeringConfig(max_slots=n + 1, max_features=K), D, L, StaticFeatureSource([]))
    clamps = [c.compile({"vectors": [{"layer": 1, "values": rng.standard_normal(D).tolist(),
                                      "mode": "clamp", "target": float(rng.uniform(-2, 2))}]})
              for _ in range(n)]
    for slot, p in enumerate(clamps, start=1):
        rt.write_slot(slot, p.program)
    assert rt.banks[1].hi == n + 1  # one row per distinct vector, the null column 0
    three = programs()[2]
    rt.write_slot(n + 1, three.program)

    def columns_unused(*a):
        raise AssertionError("the bank-columns path ran with a bank past GATHER_COLUMNS_PER_ENTRY")

    monkeypatch.setattr(rt.entries.columns, "apply", columns_unused)
    req_slots, req_prog = [0, n, n + 1, 1], [None, clamps[-1], three, clamps[0]]
    n_sched = [40, runtime.GATHER_CHUNK, 30, 3]  # spans three gathered blocks
    T = sum(n_sched)
    for layer in range(L):
        h = torch.randn(T, D, dtype=torch.float64)
        r = torch.randn(T, D, dtype=torch.float64)
        h0, x0 = h.clone(), (h + r).numpy().copy()
        run_step(rt, req_slots, n_sched, [0] * 4, [10**6] * 4, [0] * 4, h, r, layer)
        assert torch.equal(h[:40], h0[:40])
        got, t = (h + r).numpy(), 0
        for prog, m in zip(req_prog, n_sched):
            for _ in range(m):
                want = x0[t] if prog is None else reference(prog.program, x0[t], layer)
                np.testing.assert_allclose(got[t], want, rtol=1e-6, atol=1e-6)
                t += 1


def test_unsteered_tokens_bitwise_untouched():
    rt = make_runtime()
    p = programs()[1]
    slot, _ = rt.allocator.acquire("a", p.table_hash)
    rt.write_slot(slot, p.program)
    h = torch.randn(4, D, dtype=torch.float64)
    r = torch.randn(4, D, dtype=torch.float64)
    h0 = h.clone()
    run_step(rt, [0, slot], [2, 2], [0, 0], [9, 9], [0, 0], h, r, 1)
    assert torch.equal(h[:2], h0[:2])
    assert not torch.equal(h[2:], h0[2:])


def test_clamp_holds_exactly_for_direction_features():
    rt = make_runtime()
    rng = np.random.default_rng(5)
    feats = StaticFeatureSource([Feature("f/dir", 1, "direction", rng.standard_normal(D), scale=2.0)])
    c = SteeringCompiler(SteeringConfig(max_slots=S, max_features=K), D, L, feats)
    p = c.compile({"features": {"dir": {"strength": 1.5, "mode": "clamp"}}})
    slot, _ = rt.allocator.acquire("a", p.table_hash)
    rt.write_slot(slot, p.program)
    h = torch.randn(5, D, dtype=torch.float64) * 10
    r = torch.randn(5, D, dtype=torch.float64)
    run_step(rt, [slot], [5], [0], [9], [0], h, r, 1)
    lp = p.program.layers[1]
    act = (h + r).numpy() @ lp.enc[0].astype(np.float64)
    # the float32 table rounds the unit direction: |e|² = 1 ± 1e-7
    np.testing.assert_allclose(act, 1.5 * 2.0, rtol=1e-6)


def test_apply_to_masks_prompt_or_generated_tokens():
    rt = make_runtime()
    p = programs()[0]
    slot, _ = rt.allocator.acquire("a", p.table_hash)
    rt.write_slot(slot, p.program)
    # one request, 4 tokens at positions 3..6, prompt length 5: positions 3,4 prompt; 5,6 generated
    for apply_to, changed in [(0, [1, 1, 1, 1]), (1, [1, 1, 0, 0]), (2, [0, 0, 1, 1])]:
        h = torch.randn(4, D, dtype=torch.float64)
        r = torch.zeros(4, D, dtype=torch.float64)
        h0 = h.clone()
        run_step(rt, [slot], [4], [3], [5], [apply_to], h, r, 1)
        assert [int(not torch.equal(h[i], h0[i])) for i in range(4)] == changed


def test_stale_tokens_cleared_between_steps():
    rt = make_runtime(host_gating=False)
    p = programs()[0]
    slot, _ = rt.allocator.acquire("a", p.table_hash)
    rt.write_slot(slot, p.program)
    h, r = torch.randn(6, D, dtype=torch.float64), torch.zeros(6, D, dtype=torch.float64)
    run_step(rt, [slot], [6], [0], [9], [0], h, r, 1)
    # next step: 2 unsteered tokens, but the op sees a padded batch of 6 (like a CUDA graph)
    h = torch.randn(6, D, dtype=torch.float64)
    h0 = h.clone()
    run_step(rt, [0], [2], [0], [9], [0], h, r, 1)
    assert torch.equal(h, h0)


def test_rewriting_a_slot_clears_old_layers():
    rt = make_runtime()
    a, b = programs()[2], programs()[0]  # a touches layers 1,2; b only layer 1
    slot, _ = rt.allocator.acquire("x", a.table_hash)
    rt.write_slot(slot, a.program)
    rt.allocator.release("x")
    rt.write_slot(slot, b.program)
    assert torch.count_nonzero(rt.tables[2].add[slot]) == 0
    assert torch.count_nonzero(rt.tables[1].col[slot]) == 0
    # the old program's rows were this slot's only: back in the bank, zeroed
    assert rt.banks[1].hi == 1 and torch.count_nonzero(rt.tables[1].enc) == 0
    h, r = torch.randn(2, D, dtype=torch.float64), torch.zeros(2, D, dtype=torch.float64)
    h0 = h.clone()
    run_step(rt, [slot], [2], [0], [9], [0], h, r, 2)
    assert torch.equal(h, h0)


@pytest.mark.parametrize("first", range(3))
@pytest.mark.parametrize("second", range(3))
def test_a_rewritten_slot_holds_exactly_what_a_fresh_one_would(first, second):
    """write_slot touches only the rows the old or the new program uses; the result must be
    table-for-table what writing the new program into an unused slot gives."""
    progs = programs()
    used, fresh = make_runtime(), make_runtime()
    used.write_slot(2, progs[first].program)
    used.write_slot(2, progs[second].program)
    fresh.write_slot(2, progs[second].program)
    for layer in used.tables:
        a, b = slot_view(used, 2, layer), slot_view(fresh, 2, layer)
        for name in a:
            assert torch.equal(a[name], b[name]), (layer, name)
    assert (used.slot_add == fresh.slot_add).all() and (used.slot_entries == fresh.slot_entries).all()


def slot_view(rt, slot, layer):
    """What a slot means at a layer, independent of which bank columns hold its rows; checks
    that the bank holds exactly the rows some slot points at (the others zero)."""
    tab = rt.tables[layer]
    cols = tab.col[slot]
    view = {n: getattr(tab, n)[slot] for n in ("add", "alpha", "beta", "cond", "cthr", "csign")}
    view.update({n: getattr(tab, n)[cols] for n in ("enc", "dec", "bias", "cut")})
    view.update({"c" + n: getattr(tab, n)[tab.ccol[slot]] for n in ("enc", "bias", "cut")})
    unused = torch.ones(tab.enc.shape[0], dtype=torch.bool)
    unused[tab.col.unique()] = unused[tab.ccol.unique()] = False
    assert torch.count_nonzero(tab.enc[unused]) == 0 and torch.count_nonzero(tab.dec[unused]) == 0
    assert bool((tab.cut[unused] == float("-inf")).all())
    return view


def test_readout_files_entry_activations_and_captured_streams():
    rt = make_runtime()
    clamp = programs()[1]  # two clamp entries at layer 1
    clamp.return_activations = True
    rs = rt.admit("internal-A", WireRecord.from_extra_args(clamp.extra_args(readout_key="req-A")))
    # a capture-only request: no program, no slot, its layer-2 stream is filed
    empty = WireRecord(hash="0", readout=True, readout_key="req-B", capture=(2,),
                       program={"d": D, "layers": []})
    rb = rt.admit("internal-B", empty)
    assert rb.slot == 0 and rt.allocator.busy == 1
    for layer in range(L):
        h = torch.randn(5, D, dtype=torch.float64)
        r = torch.randn(5, D, dtype=torch.float64)
        run_step(rt, [rs.slot, 0], [3, 2], [0, 7], [9, 9], [0, 0], h, r, layer,
                 readout=[(0, rs), (1, rb)])
        if layer == 2:
            x_b = (h + r)[3:].numpy().copy()
    a = rt.pop_readout("req-A")
    assert sorted((k, lay, pos) for k, lay, pos, _ in a) == [("act", 1, p, ) for p in range(3)]
    for _, _, _, vals in a:
        assert len(vals) == 2  # both entries of the slot at layer 1
    b = rt.pop_readout("req-B")
    assert [(k, lay, pos) for k, lay, pos, _ in b] == [("resid", 2, 7), ("resid", 2, 8)]
    np.testing.assert_allclose(np.array([v for *_, v in b]), x_b)
    assert rt.pop_readout("req-B") is None
    rt.release(["internal-A", "internal-B"])
    assert rt.allocator.busy == 0


# -- unseated requests and readout bytes (issue 16) ---------------------------------------------
def distinct_wires(n):
    c = SteeringCompiler(SteeringConfig(max_slots=S, max_features=K), D, L)
    rng = np.random.default_rng(11)
    return [c.compile({"vectors": [{"layer": 1, "values": rng.standard_normal(D).tolist()}]}).wire()
            for _ in range(n)]


def test_a_request_without_a_free_slot_runs_unsteered_and_is_reported():
    rt = make_runtime()
    wires = distinct_wires(S + 1)
    for i, w in enumerate(wires[:S]):
        assert rt.admit(f"cmpl-{i}-abcd1234", w).slot > 0
    rs = rt.admit("cmpl-extra-abcd1234", wires[S])  # the gate let one too many through
    assert rs.slot == 0 and rs.unseated and rt.unseated_total == 1
    assert rt.allocator.busy == S  # nobody else's slot was touched
    # the API server asks by its own ids; the worker's suffix and n > 1 prefixes still match
    assert rt.take_unseated(["cmpl-0", "cmpl-extra"]) == ["cmpl-extra"]
    assert rt.take_unseated(["cmpl-extra"]) == []  # reported once
    rt.release([f"cmpl-{i}-abcd1234" for i in range(S)] + ["cmpl-extra-abcd1234"])
    assert rt.allocator.busy == 0 and not rt.requests


def test_a_program_that_cannot_be_written_fails_its_request_only():
    rt = make_runtime()
    good = distinct_wires(1)[0]
    bad = good.model_copy(update={"hash": "bad", "program": {"d": D, "layers": [{"layer": 1}]}})
    rs = rt.admit("r-bad", bad)
    assert rs.slot == 0 and rs.unseated and rt.allocator.busy == 0
    assert not rt.slot_add.any() and not rt.slot_entries.any()
    assert rt.admit("r-good", good).slot > 0


def test_a_malformed_record_is_refused_by_the_shim_not_raised():
    from types import SimpleNamespace

    from steering.worker.vllm_shim import _seat

    rt = make_runtime()
    rs = _seat(rt, "r1", SimpleNamespace(extra_args={"steering": {"v": 99}}))
    assert rs is not None and rs.slot == 0 and rs.unseated
    assert _seat(rt, "r2", SimpleNamespace(extra_args=None)) is None  # unsteered: untouched
    assert rt.take_unseated(["r1"]) == ["r1"]


def readout_request(rt, key, positions=3, layer_count=L):
    clamp = programs()[1]  # two clamp entries at layer 1
    clamp.return_activations = True
    rs = rt.admit(f"internal-{key}", WireRecord.from_extra_args(clamp.extra_args(readout_key=key)))
    for layer in range(layer_count):
        h = torch.randn(positions, D, dtype=torch.float64)
        r = torch.randn(positions, D, dtype=torch.float64)
        run_step(rt, [rs.slot], [positions], [0], [positions], [0], h, r, layer, readout=[(0, rs)])
    return clamp, rs


def test_readout_bytes_match_the_api_servers_bound_and_are_freed():
    from steering.request import readout_record_bytes

    rt = make_runtime()
    clamp, _ = readout_request(rt, "req-A", positions=3)
    assert rt.readout_bytes == 3 * readout_record_bytes(2) == clamp.readout_bytes(3)
    records = rt.pop_readout("req-A")
    assert [len(v) for *_, v in records] == [2, 2, 2] and isinstance(records[0][3], list)
    assert rt.readout_bytes == 0 and not rt.readouts
    readout_request(rt, "req-B")
    assert rt.drop_readout("req-B") > 0 and rt.readout_bytes == 0
    assert rt.pop_readout("req-B") is None


def test_unread_readouts_expire_after_their_request_ended(monkeypatch):
    rt = make_runtime()
    readout_request(rt, "req-A")
    monkeypatch.setattr(readouts, "READOUT_TTL_S", 0.0)
    rt.release([])  # the request is still running: its readout is kept
    assert "req-A" in rt.readouts
    rt.release(["internal-req-A"])  # ended; the TTL counts from here
    import time
    time.sleep(0.01)
    rt.release([])
    assert not rt.readouts and rt.readout_bytes == 0 and rt.allocator.busy == 0


def test_over_the_hard_cap_the_oldest_readout_is_dropped_and_says_so():
    from steering.request import readout_record_bytes

    rt = make_runtime()
    rt.readouts.max_bytes = 4 * readout_record_bytes(2)
    readout_request(rt, "old", positions=3)
    readout_request(rt, "new", positions=3)
    assert rt.readout_bytes <= rt.cfg.max_readout_bytes
    assert rt.pop_readout("old") == runtime.READOUT_DROPPED  # never a silently short readout
    assert len(rt.pop_readout("new")) == 3
    assert rt.readout_bytes == 0


@pytest.mark.parametrize("host_gating", [True, False])
def test_256_distinct_equalizers_in_one_batch_each_row_equals_its_solo_run(host_gating):
    """256 requests, each its own equalizer (4 named features added, 1 clamped, its own
    strengths), in ONE float32 batch of 2 tokens each: every row equals the same request run
    alone (a batch of one), at every steered layer."""
    d, layers, s, k, n_req = 64, 2, 256, 5, 256
    rng = np.random.default_rng(7)
    feats = [Feature(f"eq/f{i}", i % layers, "direction", rng.standard_normal(d), scale=1.0)
             for i in range(11)]
    cfg = SteeringConfig(max_slots=s, max_features=k)
    comp = SteeringCompiler(cfg, d, layers, StaticFeatureSource(feats))
    progs, seen = [], set()
    while len(progs) < n_req:
        pick = rng.choice(11, size=5, replace=False)
        spec = {f"f{i}": round(float(rng.uniform(-2, 2)), 3) for i in pick[:4]}
        spec[f"f{pick[4]}"] = {"mode": "clamp", "strength": round(float(rng.uniform(-2, 2)), 3)}
        p = comp.compile({"features": spec})
        if p.table_hash not in seen:
            seen.add(p.table_hash)
            progs.append(p)

    def make(slots):
        return SteeringRuntime(SteeringConfig(max_slots=slots, max_features=k), num_layers=layers,
                               hidden_size=d, max_tokens=2 * n_req, dtype=torch.float32,
                               device=torch.device("cpu"), host_gating=host_gating)

    batch, solo = make(s), make(1)
    slots = []
    for i, p in enumerate(progs):
        slot, fresh = batch.allocator.acquire(f"r{i}", p.table_hash)
        assert fresh
        batch.write_slot(slot, p.program)
        slots.append(slot)
    for layer in range(layers):
        h = torch.randn(2 * n_req, d)
        r = torch.randn(2 * n_req, d)
        h_in = h.clone()
        run_step(batch, slots, [2] * n_req, [0] * n_req, [10] * n_req, [0] * n_req, h, r, layer)
        for i, p in enumerate(progs):
            solo.write_slot(1, p.program)
            hs = h_in[2 * i: 2 * i + 2].clone()
            run_step(solo, [1], [2], [0], [10], [0], hs, r[2 * i: 2 * i + 2], layer)
            torch.testing.assert_close(h[2 * i: 2 * i + 2], hs, rtol=1e-5, atol=1e-5)
        assert not torch.equal(h, h_in)  # the batch was steered at this layer
